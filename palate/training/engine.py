"""accelerate set-up: devices and processes, the supported engines, experiment trackers, and
the start of a training stage (run directory, seeds, precision)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from palate.config import Config
from palate.errors import ConfigError
from palate.rundir import RunDir
from palate.training.precision import resolve_precision
from palate.training.rng import seed_everything
from palate.training.settings import StageConfig, Tracker

__all__ = [
    "begin_stage",
    "check_engine",
    "flat_hparams",
    "make_accelerator",
    "maybe_no_sync",
    "start_trackers",
]


def make_accelerator(tracker: Tracker, project_dir: str | Path) -> Any:
    """An ``accelerate.Accelerator`` (devices, processes) with an optional experiment tracker.

    Mixed precision is handled by :func:`palate.training.precision.autocast`, not by
    accelerate, so bf16 on CPU works the same way everywhere.
    """
    from accelerate import Accelerator  # heavy: loaded only when a stage trains

    log_with = None if tracker == "none" else tracker
    return Accelerator(log_with=log_with, project_dir=str(project_dir))


def check_engine(distributed_type: Any) -> None:
    """palate's trainers are data-parallel: weights, optimiser state and checkpoints replicated
    (written by rank 0). DeepSpeed ZeRO and FSDP shard them, which the checkpoints would lose
    silently, so they are refused (docs/scaling.md)."""
    name = str(getattr(distributed_type, "value", distributed_type))
    if name in ("DEEPSPEED", "FSDP", "MEGATRON_LM"):
        raise ConfigError(
            f"accelerate config: distributed_type {name} is not supported yet — palate's "
            "checkpoints and final weights are written by rank 0 and are not sharding-aware. "
            "Launch with data parallelism (examples/accelerate/ddp.yaml, or none); see "
            "docs/scaling.md"
        )


def begin_stage(cfg: StageConfig) -> tuple[Any, RunDir, torch.device, str]:
    """(accelerator, run directory, device, precision) for a training stage: the run directory
    and its resolved config written by the main process, every RNG seeded with ``cfg.seed``."""
    acc = make_accelerator(cfg.tracker, cfg.output_dir)
    check_engine(acc.distributed_type)
    run = RunDir(cfg.output_dir)
    if acc.is_main_process:
        run.create(cfg)
    acc.wait_for_everyone()
    seed_everything(cfg.seed)
    return acc, run, acc.device, resolve_precision(cfg.precision, acc.device)


def flat_hparams(cfg: Config) -> dict[str, int | float | str | bool]:
    """A config as flat ``a.b: scalar`` pairs (what trackers accept as hyper-parameters)."""
    out: dict[str, int | float | str | bool] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(value, bool | int | float | str):
            out[prefix.rstrip(".")] = value
        else:
            out[prefix.rstrip(".")] = json.dumps(value)

    walk("", cfg.model_dump(mode="json"))
    return out


def start_trackers(accelerator: Any, tracker: Tracker, project: str, cfg: Config) -> None:
    """Start the experiment tracker (if any) with the config as hyper-parameters."""
    if tracker != "none":
        accelerator.init_trackers(project, config=flat_hparams(cfg))


@contextlib.contextmanager
def maybe_no_sync(accelerator: Any, model: Any, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on micro-batches that do not end an accumulation window."""
    if sync or accelerator.num_processes == 1:
        yield
    else:
        with accelerator.no_sync(model):
            yield

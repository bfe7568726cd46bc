"""Training plumbing shared by SFT, the reward model and PPO.

Precision (bf16 autocast where the hardware has it), LoRA via peft, dropout off, optimizer and
learning-rate schedule, exact checkpoint/resume (weights, optimizer, scheduler, RNG, position),
and accelerate set-up (devices, multi-process, trackers). The RLHF maths lives in the stage
modules; this is the part every trainer needs and none should repeat.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from palate.config import Config
from palate.errors import ConfigError

__all__ = [
    "LoraSettings",
    "OptimSettings",
    "autocast",
    "bf16_supported",
    "build_optimizer",
    "disable_dropout",
    "make_accelerator",
    "resolve_precision",
    "restore_rng",
    "rng_state",
    "seed_everything",
]


class LoraSettings(Config):
    """LoRA adapters (peft). Used when ``finetune: lora``."""

    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: float = Field(32.0, gt=0, description="Scaling numerator (effective scale alpha/r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Modules to adapt: 'all-linear' or a list of module names (q_proj, ...).",
    )


class OptimSettings(Config):
    """Optimiser and learning-rate schedule."""

    lr: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warm-up: cosine, linear (to 0) or constant."
    )
    warmup_ratio: float = Field(
        0.05, ge=0, le=1, description="Fraction of optimiser steps spent warming up linearly."
    )
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the global gradient norm to this (null = no clipping)."
    )


# --------------------------------------------------------------------------- precision


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 autocast is fast on ``device`` (CUDA with bf16, or a CPU with AVX512-BF16/AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """``auto`` → ``bf16`` where supported, else ``fp32``; explicit values are checked."""
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ConfigError(f"precision {precision!r}: expected auto, bf16 or fp32")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast for ``precision == 'bf16'`` (weights and optimiser stay fp32)."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# --------------------------------------------------------------------------- models


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (RLHF convention: log-probs must be deterministic)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    cfg = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop"):
        if cfg is not None and isinstance(getattr(cfg, key, None), float):
            setattr(cfg, key, 0.0)


def apply_lora(model: Any, settings: LoraSettings, task_type: str = "CAUSAL_LM") -> Any:
    """Wrap ``model`` with fresh LoRA adapters (peft)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type=task_type,
    )
    return get_peft_model(model, cfg)


def build_optimizer(
    params: list[torch.nn.Parameter], settings: OptimSettings, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW plus warm-up and the chosen decay, as a per-step LambdaLR."""
    from transformers import get_scheduler

    opt = torch.optim.AdamW(
        params, lr=settings.lr, weight_decay=settings.weight_decay, betas=settings.betas
    )
    warmup = int(round(settings.warmup_ratio * total_steps))
    name = {"constant": "constant_with_warmup"}.get(settings.schedule, settings.schedule)
    sched = get_scheduler(
        name, optimizer=opt, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1)
    )
    return opt, sched


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# --------------------------------------------------------------------------- RNG and checkpoints


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(
    ckpt: Path,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write optimizer/scheduler/RNG state, then ``state.json`` last (the completeness marker)."""
    ckpt.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            **(extra or {}),
        },
        ckpt / "trainer.pt",
    )
    tmp = ckpt / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, ckpt / "state.json")


def load_training_state(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state.json contents, trainer.pt contents) of a complete checkpoint."""
    state = json.loads((ckpt / "state.json").read_text())
    blob = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False)
    return state, blob


def prune_checkpoints(checkpoints: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    done = sorted(p for p in checkpoints.glob("step-*") if (p / "state.json").is_file())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- accelerate


def make_accelerator(tracker: str, project_dir: str | Path) -> Any:
    """An ``accelerate.Accelerator`` (devices, processes) with an optional experiment tracker.

    Mixed precision is handled by :func:`autocast`, not by accelerate, so bf16 on CPU works the
    same way everywhere.
    """
    from accelerate import Accelerator

    log_with = None if tracker in ("none", "", None) else tracker
    return Accelerator(log_with=log_with, project_dir=str(project_dir))


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


def start_trackers(accelerator: Any, tracker: str, project: str, cfg: Config) -> None:
    """Start the experiment tracker (if any) with the config as hyper-parameters."""
    if tracker not in ("none", "", None):
        accelerator.init_trackers(project, config=flat_hparams(cfg))


@contextlib.contextmanager
def maybe_no_sync(accelerator: Any, model: Any, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on micro-batches that do not end an accumulation window."""
    if sync or accelerator.num_processes == 1:
        yield
    else:
        with accelerator.no_sync(model):
            yield

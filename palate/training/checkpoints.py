"""Exact checkpoint and resume: the weights (written by the stage), then optimiser, scheduler
and RNG state, ``state.json`` last as the completeness marker; older checkpoints pruned.
Resuming restores all of it and drops the metrics rows written after the checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from palate.progress import console
from palate.rundir import MetricsLogger, RunDir
from palate.training.engine import start_trackers
from palate.training.rng import rank_rng, restore_rng, rng_state
from palate.training.settings import StageConfig

__all__ = [
    "load_training_state",
    "prune_checkpoints",
    "resume_training",
    "save_training_state",
    "write_checkpoint",
]


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


def prune_checkpoints(run: RunDir, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints of ``run``."""
    for old in run.complete_checkpoints()[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def write_checkpoint(
    run: RunDir,
    step: int,
    *,
    save_weights: Callable[[Path], None],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """One stage's checkpoint of ``step`` (called by the main process): ``save_weights(path)``,
    then optimiser/scheduler/RNG state and ``extra`` (``state.json`` last, holding ``step`` and
    ``state``); all but the newest ``keep`` checkpoints pruned. Returns the checkpoint's path."""
    path = run.checkpoint_dir(step)
    path.mkdir(parents=True, exist_ok=True)
    save_weights(path)
    save_training_state(
        path,
        optimizer=optimizer,
        scheduler=scheduler,
        state={"step": step, **state},
        extra=extra,
    )
    prune_checkpoints(run, keep)
    return path


def resume_training(
    *,
    acc: Any,
    run: RunDir,
    ckpt: Path | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    total: int,
    cfg: StageConfig,
    project: str,
    restore: Callable[[Path, dict[str, Any]], None] | None = None,
    unit: str = "step",
) -> tuple[int, MetricsLogger]:
    """Restore a checkpoint (if any) and open the metrics log and tracker.

    From ``ckpt``: the optimiser, scheduler and RNG state, plus whatever the stage keeps
    beyond them (``restore(ckpt, trainer_blob)``: PPO's weights, KL controller, ...). Returns
    (the step to start from, a :class:`palate.rundir.MetricsLogger` that dropped the rows the
    interrupted run wrote after ``ckpt``).
    """
    step = 0
    if ckpt is not None:
        state, blob = load_training_state(ckpt)
        if restore is not None:
            restore(ckpt, blob)
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        restore_rng(rank_rng(blob, acc.process_index, acc.num_processes, cfg.seed))
        step = state["step"]
        if acc.is_main_process:
            console.print(f"resuming from {ckpt} ({unit} {step}/{total})")
    metrics = MetricsLogger(
        run.metrics_path,
        resume_step=step if ckpt is not None else None,
        accelerator=acc if cfg.tracker != "none" else None,
        enabled=acc.is_main_process,  # one log, written by rank 0
    )
    start_trackers(acc, cfg.tracker, project, cfg)
    return step, metrics

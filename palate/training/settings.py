"""The settings every training stage shares, under the same names: LoRA, the optimiser, the
stage's seed/precision/checkpoints/tracker, and batching for the step-based stages."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from palate.config import Config

__all__ = [
    "LoraSettings",
    "OptimSettings",
    "StageConfig",
    "StageSettings",
    "Tracker",
    "TrainSettings",
]


class LoraSettings(Config):
    """LoRA adapters (peft). Used when ``finetune: lora``."""

    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, gt=0, description="Scaling numerator (effective scale alpha/r).")
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
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon (added to √v̂).")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warm-up: cosine, linear (to 0) or constant."
    )
    warmup_ratio: float = Field(
        0.05, ge=0, le=1, description="Fraction of optimiser steps spent warming up linearly."
    )
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the global gradient norm to this (null = no clipping)."
    )


# Experiment trackers accelerate can log to.
Tracker = Literal[
    "none",
    "tensorboard",
    "wandb",
    "trackio",
    "mlflow",
    "comet_ml",
    "aim",
    "clearml",
    "dvclive",
    "swanlab",
]


class StageSettings(Config):
    """What every training stage (SFT, reward model, PPO) has, under the same names."""

    seed: int = Field(
        0, description="Seed for the data split and order, initialisation and sampling."
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="bf16 autocast where the hardware supports it (auto), or force one."
    )
    checkpoint_every: int = Field(
        50, ge=1, description="Save a resumable checkpoint every N optimiser steps."
    )
    keep_checkpoints: int = Field(2, ge=1, description="How many recent checkpoints to keep.")
    resume: bool = Field(True, description="Continue from the newest checkpoint in output_dir.")
    tracker: Tracker = Field("none", description="Experiment tracker (via accelerate).")


class StageConfig(StageSettings):
    """A training stage's config: its settings plus the run directory it writes."""

    output_dir: str = Field(description="Run directory.")


class TrainSettings(Config):
    """Batching and schedule (shared by the step-based training stages: SFT, reward model)."""

    epochs: int = Field(1, ge=1, description="Passes over the training data.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimiser steps (overrides epochs)."
    )
    batch_size: int = Field(4, ge=1, description="Examples per micro-batch (per process).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimiser step.")
    log_every: int = Field(1, ge=1, description="Write a metrics row every N steps.")

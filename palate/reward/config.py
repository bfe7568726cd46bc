"""Configs of ``palate reward train|eval|score``.

:class:`RewardRecipe` is how a reward model is trained (everything but the comparisons file and
the output directory); :class:`RewardConfig` adds those two for ``palate reward train``, and
``palate run`` supplies them itself.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from palate.config import Config
from palate.training import LoraSettings, OptimSettings, StageConfig, StageSettings, TrainSettings

__all__ = [
    "RewardConfig",
    "RewardEvalConfig",
    "RewardLossSettings",
    "RewardRecipe",
    "RewardScoreConfig",
    "RewardTrainSettings",
]


class RewardLossSettings(Config):
    """Loss options (see ``preference_loss``)."""

    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Move targets toward 1/2 by this much (noisy raters)."
    )
    center_coef: float = Field(
        0.0, ge=0, description="Weight of (r_chosen + r_rejected)^2, keeping scores near 0."
    )
    use_margin: bool = Field(
        True, description="Use each comparison's `margin` field as a Bradley-Terry margin."
    )


class RewardTrainSettings(TrainSettings):
    """Batching (in pairs) and schedule for reward-model training."""

    batch_size: int = Field(8, ge=1, description="Comparison pairs per micro-batch (per process).")
    group_by_length: bool = Field(
        True, description="Batch pairs of similar length together (less padding, faster)."
    )
    eval_every: int = Field(
        0, ge=0, description="Evaluate every N steps as well as at each epoch end (0 = epochs)."
    )
    forward_chunks: int = Field(
        2,
        ge=1,
        description="Sort a batch's 2B sequences (chosen and rejected) by length and run them "
        "as this many forwards: less padding than one forward over all.",
    )


def _rm_optim() -> OptimSettings:
    return OptimSettings(lr=5e-5, warmup_ratio=0.1)


class RewardRecipe(StageSettings):
    """How a reward model is trained: everything but the comparisons and the run directory."""

    model: str = Field("minilm-l6", description="Backbone spec (causal LM or encoder).")
    eval_data: str | None = Field(
        None, description="Held-out comparisons; default: split eval_fraction off `data`."
    )
    eval_fraction: float = Field(
        0.2, ge=0, lt=1, description="Fraction of `data` held out (seeded) when no eval_data."
    )
    split_by: Literal["comparison", "prompt"] = Field(
        "comparison",
        description="Hold out comparisons at random, or whole prompts (every comparison of a "
        "held-out prompt: use it when prompts have several pairs, else held-out accuracy is "
        "optimistic).",
    )
    max_examples: int | None = Field(None, ge=1, description="Use only the first N comparisons.")
    split_seed: int | None = Field(
        None, description="Seed for the held-out split alone (default: `seed`)."
    )
    ensemble: int = Field(
        1,
        ge=1,
        description="Train this many models (seeds seed, seed+1, ...; same split) and average "
        "their scores: more accurate and calibrated, K times the cost.",
    )
    freeze_layers: int = Field(
        0,
        ge=0,
        description="Freeze the embeddings and the lowest N transformer blocks (full "
        "fine-tuning): faster steps, less forgetting on small preference sets.",
    )
    max_length: int = Field(
        384, ge=16, description="Max tokens per (prompt, response); prompts cut from the left."
    )
    pooling: Literal["cls", "mean"] = Field(
        "cls",
        description="Encoders: the model's [CLS] pooler (cls) or the mask-averaged token states "
        "(mean, how sentence-embedding models like MiniLM were trained).",
    )
    head_init: Literal["normal", "zero"] = Field(
        "normal",
        description="Scalar head init: normal (small random) or zero (seed-independent start).",
    )
    finetune: Literal["full", "lora"] = Field(
        "full", description="Train all weights (default) or LoRA adapters plus the head."
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings.")
    optim: OptimSettings = Field(default_factory=_rm_optim, description="Optimiser.")
    loss: RewardLossSettings = Field(default_factory=RewardLossSettings, description="Loss.")
    train: RewardTrainSettings = Field(default_factory=RewardTrainSettings, description="Training.")
    normalize: bool = Field(
        True, description="Shift scores so the chosen training responses average 0."
    )
    normalize_examples: int = Field(
        256, ge=1, description="How many chosen training responses form that reference set."
    )


class RewardConfig(RewardRecipe, StageConfig):
    """Config for ``palate reward train``."""

    data: str = Field(description="Comparisons JSONL or HH-RLHF file.")


class RewardEvalConfig(Config):
    """Config for ``palate reward eval``."""

    model: str = Field(description="A trained reward model directory (e.g. RUN/final).")
    data: str = Field(description="Comparisons to evaluate on (JSONL or HH file).")
    max_examples: int | None = Field(None, ge=1, description="Use only the first N comparisons.")
    batch_size: int = Field(16, ge=1, description="Sequences scored together.")
    bins: int = Field(10, ge=2, description="Bins for the expected calibration error.")
    output_dir: str | None = Field(None, description="Write eval.json (and nothing else) here.")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="Autocast for scoring.")


class RewardScoreConfig(Config):
    """Config for ``palate reward score``."""

    model: str = Field(description="A trained reward model directory (e.g. RUN/final).")
    data: str = Field(description="JSONL of {prompt, response} rows to score.")
    output: str = Field(description="Output JSONL: the input rows plus a `reward` field.")
    batch_size: int = Field(16, ge=1, description="Sequences scored together.")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="Autocast for scoring.")

"""Configs of ``palate reward train|eval|score``.

:class:`RewardRecipe` is how a reward model is trained (everything but the comparisons file and
the output directory); :class:`RewardConfig` adds those two for ``palate reward train``, and
``palate run`` supplies them itself.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from palate.config import ADDED_LATER, Config
from palate.sampling import SamplingConfig
from palate.training import LoraSettings, OptimSettings, StageConfig, StageSettings, TrainSettings

__all__ = [
    "RewardConfig",
    "RewardEvalConfig",
    "RewardLossSettings",
    "RewardNormalization",
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
    group_by_prompt: bool = Field(
        False,
        description="Batch each prompt's comparisons together (prompts shuffled, then the pairs "
        "within each): a reply in several pairs of a batch is encoded once, so K replies to a "
        "prompt cost K forwards instead of K(K-1). InstructGPT trained on all K-choose-2 "
        "comparisons of a prompt as one batch element for this reason. Overrides "
        "group_by_length.",
        json_schema_extra=ADDED_LATER,
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


class RewardNormalization(Config):
    """The affine map ``gain · raw + offset`` fitted after training and saved with the model.

    With a ``policy`` (``palate run`` sets the run's initial policy), the reference set is that
    policy's own samples on ``prompts``, made mean 0 and std 1 — as in Ziegler et al. 2019
    (openai/lm-human-preferences, ``normalize_before``) and Huang et al. 2024 ("The N+
    Implementation Details of RLHF with PPO"): PPO's KL coefficient, the missing-EOS penalty and
    the value clip then mean the same at every reward model. Without one, the responses (chosen
    and rejected) of the first ``samples`` training comparisons stand in for the policy's.
    """

    enabled: bool = Field(True, description="Fit and apply the normalisation.")
    policy: str | None = Field(
        None,
        description="The initial policy (model spec or directory) whose samples form the "
        "reference set; null: the training comparisons' responses.",
    )
    prompts: str | None = Field(
        None, description="Prompts to sample the policy on; default: the comparisons' prompts."
    )
    responses: str | None = Field(
        None,
        description="Or a JSONL of (prompt, response) rows already sampled from the initial "
        "policy (``palate run`` passes the pairs stage's samples when their sampling is PPO's).",
    )
    samples: int = Field(256, ge=2, description="Size of the reference set.")
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=1.0),
        description="How the policy is sampled (use PPO's settings).",
    )
    batch_size: int = Field(16, ge=1, description="Prompts sampled together.")
    target_mean: float = Field(0.0, description="Mean of the reference rewards after the map.")
    target_std: float = Field(1.0, gt=0, description="Their standard deviation after the map.")


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
    sources: dict[Literal["human", "ai", "simulated"], float] = Field(
        default_factory=dict,
        description="Loss weight per label source (a comparison's `source`: human, ai, "
        "simulated; default 1 each); 0 drops that source's comparisons (training and "
        "held-out), e.g. {ai: 0.5} or {simulated: 0}.",
    )
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
    pooling: Literal["cls", "mean", "last", "mean_last"] = Field(
        "cls",
        description="Encoders: the model's [CLS] pooler (cls), the mask-averaged token states "
        "(mean, how sentence-embedding models like MiniLM were trained), the closing [SEP] "
        "state (last: it sees how the reply ends and how long it is), or mean + last (mean_last).",
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
    normalize: RewardNormalization = Field(
        default_factory=RewardNormalization,
        description="Make rewards mean 0, std 1 on the initial policy's samples.",
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

"""Config of ``palate sft``.

:class:`SFTRecipe` is how a model is fine-tuned (everything but the model and the output
directory); :class:`SFTConfig` adds those for ``palate sft``, and ``palate run`` supplies them
itself.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from palate.training import LoraSettings, OptimSettings, StageConfig, StageSettings, TrainSettings

__all__ = ["SFTConfig", "SFTRecipe", "SFTTrainSettings"]


class SFTTrainSettings(TrainSettings):
    """Batching and schedule for SFT."""

    fast_lm_head: bool = Field(
        True,
        description="Apply the LM head only at response positions (faster; off under DDP).",
    )


class SFTRecipe(StageSettings):
    """How a model is fine-tuned on demonstrations: everything but the model and run directory."""

    data: str = Field(
        description="Demonstrations JSONL (a comparisons/HH file also works: chosen replies)."
    )
    eval_data: str | None = Field(
        None, description="Held-out demonstrations; default: split eval_fraction off `data`."
    )
    eval_fraction: float = Field(
        0.1, ge=0, lt=1, description="Fraction of `data` held out when eval_data is not given."
    )
    max_examples: int | None = Field(
        None, ge=1, description="Use only the first N demonstrations of `data` (before the split)."
    )
    max_length: int = Field(
        512, ge=8, description="Max tokens of prompt + response; prompts are cut from the left."
    )
    finetune: Literal["lora", "full"] = Field(
        "lora", description="Train LoRA adapters (default) or all weights."
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings.")
    optim: OptimSettings = Field(default_factory=OptimSettings, description="Optimiser.")
    train: SFTTrainSettings = Field(default_factory=SFTTrainSettings, description="Training.")
    save: Literal["merged", "adapter"] = Field(
        "merged",
        description="LoRA only: save final/ as a plain merged HF model, or as the adapter alone.",
    )
    sample_prompts: int = Field(
        4, ge=0, description="Held-out prompts answered (greedy) after each epoch, for a look."
    )
    sample_max_new_tokens: int = Field(64, ge=1, description="Length of those sample answers.")


class SFTConfig(SFTRecipe, StageConfig):
    """Config for ``palate sft``."""

    model: str = Field(
        "smollm2-135m-instruct", description="Model spec to fine-tune (see `palate models list`)."
    )

"""Settings of an AI judge (shared by ``palate judge``, ``palate cai``, runs and PPO's
``reward.judge``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from palate.config import Config
from palate.feedback.remote import RemoteSettings

__all__ = ["JudgeSettings"]


class JudgeSettings(Config):
    """An AI judge: which model answers, under which principles, and how position bias is
    removed."""

    backend: Literal["local", "openai"] = Field(
        "local",
        description="local: a causal LM in this process (any palate model spec); openai: an "
        "OpenAI-compatible chat-completions server (vLLM, llama.cpp, Ollama, hosted APIs).",
    )
    model: str = Field(
        "smollm2-135m-instruct",
        description="The judge model: a palate model spec (local) or the server's model name.",
    )
    remote: RemoteSettings = Field(
        default_factory=RemoteSettings, description="backend=openai: the server."
    )
    constitution: str | None = Field(
        None, description="Constitution YAML (default: palate's, palate/assets/constitution.yaml)."
    )
    principles: list[str] | None = Field(
        None, description="Use only these principles (names; default: all of the criteria)."
    )
    criteria: list[str] | None = Field(
        None, description="Use only principles of these criteria (e.g. [harmlessness])."
    )
    principle_mode: Literal["sample", "all"] = Field(
        "sample",
        description="sample: one principle drawn per pair (seeded; as Constitutional AI); "
        "all: every principle asked and the soft labels averaged.",
    )
    both_orders: bool = Field(
        True,
        description="Judge each pair in both orders and average P(A) with 1 − P(B first): "
        "removes position bias (a judge that always picks the first answer gives 0.5).",
    )
    tie_band: float = Field(
        0.0, ge=0, le=0.5, description="Answer 'tie' when |P(a) − 0.5| < tie_band (if allowed)."
    )
    batch_size: int = Field(8, ge=1, description="local: conversations per forward pass.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="local: bf16 autocast where supported (auto) or fp32."
    )
    max_tokens: int = Field(
        2048, ge=16, description="local: keep at most this many (final) tokens of a prompt."
    )
    seed: int = Field(0, description="Seed of the principle drawn per pair.")

    @model_validator(mode="after")
    def _remote_url(self) -> JudgeSettings:
        if self.backend == "openai" and not self.remote.url:
            raise ValueError("backend=openai needs remote.url (e.g. http://127.0.0.1:8080/v1)")
        return self

    @property
    def rater_name(self) -> str:
        """The judge's rater name in a labeling store: ``ai:<model>``."""
        model = self.model.rstrip("/").rsplit("/", 2)
        return "ai:" + "/".join(model[-2:])[-100:]

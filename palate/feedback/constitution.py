"""A constitution: the written principles an AI judge and SL-CAI work under.

As in Constitutional AI (Bai et al. 2022b), each principle is a comparison question for
AI feedback ("Which response is less harmful?") and a critique request + revision request for
self-revision. palate ships a default (``palate/assets/constitution.yaml``: harmlessness,
honesty, helpfulness); a user's file has the same shape. Each principle names its
``criterion`` so a run can route, e.g., red-team prompts to the harmlessness principles.
"""

from __future__ import annotations

import random
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from palate.config import Config, load_config
from palate.errors import ConfigError

__all__ = ["DEFAULT_CONSTITUTION", "Constitution", "Principle", "load_constitution"]

DEFAULT_CONSTITUTION = Path(__file__).resolve().parents[1] / "assets" / "constitution.yaml"


class Principle(Config):
    """One principle of a constitution."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Unique id (letters, digits, - and _); stored with every label it produced.",
    )
    criterion: str = Field(
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="What it is about (harmlessness, honesty, helpfulness, ...).",
    )
    comparison: str = Field(
        min_length=1, description="The question the judge answers about responses (A) and (B)."
    )
    critique: str = Field(
        min_length=1, description="Critique request for the assistant's last response (SL-CAI)."
    )
    revision: str = Field(
        min_length=1, description="Revision request: rewrite fixing the critique (SL-CAI)."
    )
    rating: str | None = Field(
        None, description="Optional 1-9 rating question (the judge used directly as a reward)."
    )

    @field_validator("comparison", "critique", "revision", "rating")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be blank")
        return v.strip() if v is not None else v


class Constitution(Config):
    """A named list of principles."""

    name: str = Field("custom", description="A name for reports.")
    principles: list[Principle] = Field(min_length=1, description="The principles.")

    @model_validator(mode="after")
    def _unique(self) -> Constitution:
        seen: set[str] = set()
        for p in self.principles:
            if p.name in seen:
                raise ValueError(f"principle name {p.name!r} appears twice")
            seen.add(p.name)
        return self

    def select(
        self, names: list[str] | None = None, criteria: list[str] | None = None
    ) -> list[Principle]:
        """The principles named (all when ``names`` is None), then only those of ``criteria``;
        a clear error when a name is unknown or nothing is left."""
        chosen = list(self.principles)
        if names:
            known = {p.name: p for p in self.principles}
            missing = [n for n in names if n not in known]
            if missing:
                raise ConfigError(
                    f"constitution {self.name!r}: no principle named {missing} "
                    f"(has {sorted(known)})"
                )
            chosen = [known[n] for n in names]
        if criteria:
            chosen = [p for p in chosen if p.criterion in criteria]
        if not chosen:
            have = sorted({p.criterion for p in self.principles})
            raise ConfigError(
                f"constitution {self.name!r}: no principle for criteria {criteria} "
                f"(criteria: {have})"
            )
        return chosen

    def sample(self, rng: random.Random, names: list[str] | None = None) -> Principle:
        return rng.choice(self.select(names))


def load_constitution(path: str | Path | None = None) -> Constitution:
    """Read a constitution YAML file (palate's default when ``path`` is None). Errors name the
    file and the field (``principles.2.critique: Field required``)."""
    return load_config(Constitution, path or DEFAULT_CONSTITUTION)

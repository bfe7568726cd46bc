"""Simulated raters: a noisy panel that labels with the gold preference.

Each simulated rater picks a response with Bradley-Terry noise,
``P(A) = σ((g(A) − g(B) + bias_r(A, B)) / temperature)`` where g is the gold
(:mod:`palate.eval.gold`). They label through the same store (:mod:`palate.label.store`) as
people, so agreement statistics work for them too.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from pydantic import Field
from sqlalchemy import select

from palate.config import ADDED_LATER, Config
from palate.errors import ConfigError
from palate.eval.gold import gold_scorer
from palate.label.db import Campaign, Pair, User, open_db
from palate.label.store import (
    LabelIn,
    create_user,
    flip,
    next_assignment,
    set_attributes,
    submit_label,
)
from palate.reward.model import ScoreFn
from palate.text import letter_words, word_count

__all__ = [
    "PanelConfig",
    "SimulatedRaters",
    "choose",
    "label_with_panel",
]


class PanelConfig(Config):
    """A panel of simulated raters."""

    raters: int = Field(3, ge=1, description="How many simulated raters.")
    temperature: float = Field(
        0.3, gt=0, description="Bradley-Terry noise: P(A) = σ((g_A − g_B + bias) / temperature)."
    )
    length_bias: float = Field(
        0.0, description="Spread of per-rater bias per 10 words of length difference (σ)."
    )
    length_bias_mean: float = Field(
        0.0,
        description="A bias per 10 words of length difference that every rater shares (added "
        "to each rater's own): > 0 the panel likes longer answers, < 0 shorter ones, whatever "
        "the gold says — a taste the reward model learns and PPO can exploit.",
        json_schema_extra=ADDED_LATER,
    )
    tie_band: float = Field(
        0.0, ge=0, description="Answer 'tie' when |g_A − g_B| is below this (and ties allowed)."
    )
    seed: int = Field(0, description="Seed of the raters' biases and choices.")
    random_raters: int = Field(
        0,
        ge=0,
        description="Extra raters who click at random, fast (`sim-random-N`): what rater-quality "
        "checks must catch.",
        json_schema_extra=ADDED_LATER,
    )
    first_raters: int = Field(
        0,
        ge=0,
        description="Extra raters who always pick the response shown first, fast (`sim-first-N`).",
        json_schema_extra=ADDED_LATER,
    )
    words_per_second: float = Field(
        4.0,
        gt=0,
        description="Reading speed of the careful raters: each label's recorded time is the "
        "words of prompt and both responses at this speed, times a log-normal factor (σ 0.3); "
        "the random and first-side raters take 1-3 s.",
        json_schema_extra=ADDED_LATER,
    )
    attributes: dict[str, str] = Field(
        default_factory=dict,
        description="Attributes every rater of this panel carries (e.g. {group: north}).",
        json_schema_extra=ADDED_LATER,
    )


def choose(
    g_a: float, g_b: float, len_diff: float, bias: float, cfg: PanelConfig, rng: random.Random
) -> str:
    """One simulated rater's answer for scores g_a, g_b (``a``, ``b`` or ``tie``)."""
    if cfg.tie_band and abs(g_a - g_b) < cfg.tie_band:
        return "tie"
    z = (g_a - g_b + bias * len_diff / 10) / cfg.temperature
    p_a = 1 / (1 + math.exp(-max(-50.0, min(50.0, z))))
    return "a" if rng.random() < p_a else "b"


def label_with_panel(
    db_url: str,
    campaign: str,
    cfg: PanelConfig,
    gold: ScoreFn | None = None,
    prefix: str = "sim",
) -> dict[str, Any]:
    """Label ``campaign`` with a simulated panel through the labeling store (same assignment
    path as people); raters are created as users ``sim-0`` … (``prefix``-0 …) if missing, then
    ``sim-random-0`` … and ``sim-first-0`` … for the spammers the config asks for. ``gold``
    scores responses (default: the default :class:`GoldRubric`). Each label records a simulated
    time (:attr:`PanelConfig.words_per_second`)."""
    gold = gold or gold_scorer()
    rng = random.Random(cfg.seed)
    clock = random.Random(cfg.seed + 1_000_003)  # times: not drawn from the choices' stream
    factory = open_db(db_url)
    n = 0
    with factory() as db:
        camp = db.scalar(select(Campaign).where(Campaign.name == campaign))
        if camp is None:
            raise ConfigError(f"{db_url}: no campaign named {campaign!r}")
        pairs = list(db.scalars(select(Pair).where(Pair.campaign_id == camp.id)))
        g_a = gold([p.prompt for p in pairs], [p.response_a for p in pairs])
        g_b = gold([p.prompt for p in pairs], [p.response_b for p in pairs])
        scored = {
            p.id: (
                float(a),
                float(b),
                len(letter_words(p.response_a)) - len(letter_words(p.response_b)),
            )
            for p, a, b in zip(pairs, g_a, g_b, strict=True)
        }
        load = {
            p.id: word_count(p.prompt) + word_count(p.response_a) + word_count(p.response_b)
            for p in pairs
        }

        def user(name: str) -> User:
            u = db.scalar(select(User).where(User.name == name))
            if u is None:
                u = create_user(db, name, kind="simulated", attributes=cfg.attributes)[0]
            elif cfg.attributes and (u.attributes or {}) != cfg.attributes:
                set_attributes(db, u, cfg.attributes)
            return u

        # (user, length bias, behaviour): careful raters first, then the spammers
        raters: list[tuple[User, float, str]] = []
        for i in range(cfg.raters):
            own = rng.gauss(0.0, cfg.length_bias) if cfg.length_bias else 0.0
            raters.append((user(f"{prefix}-{i}"), cfg.length_bias_mean + own, "careful"))
        raters += [(user(f"{prefix}-random-{i}"), 0.0, "random") for i in range(cfg.random_raters)]
        raters += [(user(f"{prefix}-first-{i}"), 0.0, "first") for i in range(cfg.first_raters)]
        active = list(raters)
        while active:
            for rater in list(active):
                u, bias, behaviour = rater
                a = next_assignment(db, camp, u, rng)
                if a is None:
                    active.remove(rater)
                    continue
                ga, gb, dlen = scored[a.pair_id]
                if behaviour == "careful":
                    ans = choose(ga, gb, dlen, bias, cfg, rng)
                    if ans == "tie" and "tie" not in camp.answers:
                        ans = "a" if ga >= gb else "b"
                    shown = flip(ans, a.swapped)
                    seconds = load[a.pair_id] / cfg.words_per_second
                    seconds *= math.exp(clock.gauss(0.0, 0.3))
                else:
                    shown = "a" if behaviour == "first" else rng.choice("ab")
                    seconds = clock.uniform(1.0, 3.0)
                submit_label(db, a, u, LabelIn(answer=shown, seconds=round(seconds, 2)))
                n += 1
    return {"campaign": campaign, "labels": n, "raters": len(raters)}


@dataclass
class SimulatedRaters:
    """Panels of simulated raters labelling one campaign in turn: one panel, or one per rater
    group, each with its own gold and user-name prefix (``sim``, ``sim-<group>``)."""

    panels: list[tuple[str, PanelConfig, ScoreFn]]  # (user-name prefix, panel, gold)

    def label(self, db_url: str, campaign: str) -> dict[str, Any]:
        done = [label_with_panel(db_url, campaign, p, g, prefix=x) for x, p, g in self.panels]
        return {
            "campaign": campaign,
            "labels": sum(d["labels"] for d in done),
            "raters": sum(d["raters"] for d in done),
        }

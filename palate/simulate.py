"""Simulated raters: a *gold* preference you can read, and a noisy panel that labels with it.

As AlpacaFarm did for cheap, reproducible RLHF experiments: the gold scoring function is a
rubric of measurable text features, and each simulated rater picks a response with
Bradley-Terry noise, ``P(A) = σ((g(A) − g(B) + bias_r(A, B)) / temperature)``. They label through
the same store (:mod:`palate.label.store`) as people, so agreement statistics work for them too.
The gold function is for evaluation; the reward model only ever sees the panel's labels.

The rubric cannot be satisfied by degenerate output: empty responses, responses cut off
mid-sentence, repetitive ones, ones that ignore the prompt and ones that parrot it back all
score low (tested).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field

from palate.config import Config
from palate.data import Prompt, prompt_contents, prompt_text
from palate.reward.model import ScoreFn
from palate.safety import is_refusal

__all__ = [
    "GoldConfig",
    "GoldRubric",
    "PanelConfig",
    "gold_features",
    "gold_score",
    "gold_scorer",
    "label_with_panel",
]


_WORD = re.compile(r"[A-Za-z']+")
_STOP = {
    "the",
    "a",
    "an",
    "and",
    "or",
    "of",
    "to",
    "in",
    "is",
    "are",
    "it",
    "you",
    "i",
    "me",
    "my",
    "your",
    "for",
    "on",
    "with",
    "that",
    "this",
    "be",
    "can",
    "do",
    "what",
    "how",
    "please",
}


class GoldRubric(Config):
    """The gold preference: a weighted sum of text features (each roughly in [-1, 1])."""

    length_target: int = Field(40, ge=1, description="Preferred length in words.")
    length_weight: float = Field(1.0, description="Weight of closeness to length_target.")
    sentiment_weight: float = Field(
        1.0, description="Weight of VADER compound sentiment (positive, warm replies win)."
    )
    keywords: list[str] = Field(default_factory=list, description="Words that earn a bonus.")
    keyword_weight: float = Field(0.5, description="Bonus per distinct keyword present (max 2).")
    relevance_weight: float = Field(
        1.0, description="Weight of overlap between the prompt's and the response's content words."
    )
    refusal_weight: float = Field(
        1.0, description="Penalty for refusal phrases (where refusing is wrong)."
    )
    refusal_right: list[str] = Field(
        default_factory=list,
        description="Criteria whose prompts should be refused (e.g. [harmlessness] for red-team "
        "prompts; a prompt's criterion comes from prompts.criterion / prompts.more): there a "
        "refusal earns refusal_bonus instead of the penalty.",
    )
    refusal_bonus: float = Field(
        1.0, description="Bonus for a refusal where refusing is right (see refusal_right)."
    )
    repetition_weight: float = Field(2.0, description="Penalty × fraction of repeated trigrams.")
    echo_weight: float = Field(
        2.0, description="Penalty × fraction of the response's trigrams copied from the prompt."
    )
    truncation_penalty: float = Field(
        1.0, description="Penalty when the response does not end a sentence (cut off)."
    )
    empty_score: float = Field(-5.0, description="Score of an empty response.")


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


_VADER: Any = None


def _sentiment(text: str) -> float:
    global _VADER
    if _VADER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _VADER = SentimentIntensityAnalyzer()
    return float(_VADER.polarity_scores(text)["compound"])


def gold_features(prompt: Prompt, response: str, rubric: GoldRubric) -> dict[str, float]:
    """Each feature of the rubric for one response (for reports and debugging)."""
    words = _words(response)
    n = len(words)
    trigrams = [tuple(words[i : i + 3]) for i in range(max(0, n - 2))]
    repeated = 1 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0
    p_words = _words(prompt_contents(prompt))
    p_trigrams = {tuple(p_words[i : i + 3]) for i in range(max(0, len(p_words) - 2))}
    echo = sum(t in p_trigrams for t in trigrams) / len(trigrams) if trigrams else 0.0
    content_p = {w for w in p_words if w not in _STOP and len(w) > 2}
    content_r = {w for w in words if w not in _STOP and len(w) > 2}
    relevance = len(content_p & content_r) / len(content_p) if content_p else 0.0
    stripped = response.strip()
    return {
        "words": float(n),
        "length": math.exp(-abs(math.log((n + 1) / (rubric.length_target + 1)))) if n else 0.0,
        "sentiment": _sentiment(response) if n else 0.0,
        "keywords": float(min(2, sum(k.lower() in words for k in rubric.keywords))),
        "relevance": min(1.0, 2 * relevance),
        "refusal": float(is_refusal(response)),
        "repetition": repeated,
        "echo": echo,
        "truncated": float(bool(stripped) and stripped[-1] not in ".!?\"')]*:;"),
    }


def gold_score(
    prompt: Prompt, response: str, rubric: GoldRubric | None = None, criterion: str | None = None
) -> float:
    """The gold preference score of one response (higher is better); ``criterion`` is the
    prompt's (a refusal is rewarded where the rubric says refusing is right)."""
    rubric = rubric or GoldRubric()
    if not response.strip():
        return rubric.empty_score
    f = gold_features(prompt, response, rubric)
    refusal = rubric.refusal_bonus if criterion in rubric.refusal_right else -rubric.refusal_weight
    return (
        rubric.length_weight * f["length"]
        + rubric.sentiment_weight * f["sentiment"]
        + rubric.keyword_weight * f["keywords"]
        + rubric.relevance_weight * f["relevance"]
        + refusal * f["refusal"]
        - rubric.repetition_weight * f["repetition"]
        - rubric.echo_weight * f["echo"]
        - rubric.truncation_penalty * f["truncated"]
    )


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
    )
    first_raters: int = Field(
        0,
        ge=0,
        description="Extra raters who always pick the response shown first, fast (`sim-first-N`).",
    )
    words_per_second: float = Field(
        4.0,
        gt=0,
        description="Reading speed of the careful raters: each label's recorded time is the "
        "words of prompt and both responses at this speed, times a log-normal factor (σ 0.3); "
        "the random and first-side raters take 1-3 s.",
    )
    attributes: dict[str, str] = Field(
        default_factory=dict,
        description="Attributes every rater of this panel carries (e.g. {group: north}).",
    )


class GoldConfig(Config):
    """The gold preference: the rubric, or a named reward model scoring in its place."""

    rubric: GoldRubric = Field(default_factory=GoldRubric, description="The gold rubric.")
    criteria: dict[str, GoldRubric] = Field(
        default_factory=dict,
        description="A rubric per prompt criterion (e.g. {harmlessness: {refusal_bonus: 2, "
        "relevance_weight: 0}} for red-team prompts): the fields set there replace those of "
        "`rubric` for that criterion's prompts; other criteria use `rubric` as it is.",
    )
    reward_model: str | None = Field(
        None,
        description="Use this trained reward model's score as the gold instead of the rubric "
        "(e.g. a bigger RM standing in for people).",
    )

    def rubric_for(self, criterion: str | None) -> GoldRubric:
        """The rubric a prompt of ``criterion`` is judged by: ``rubric`` with that criterion's
        fields (those set in ``criteria``) in their place."""
        own = self.criteria.get(criterion or "")
        if own is None:
            return self.rubric
        return self.rubric.model_copy(update={k: getattr(own, k) for k in own.model_fields_set})


def gold_scorer(
    gold: GoldConfig | GoldRubric | None = None, criteria: Mapping[str, str] | None = None
) -> ScoreFn:
    """A batched ``score(prompts, responses) -> list[float]`` for the gold preference.
    ``criteria``: each prompt's criterion by its text (:func:`palate.data.prompt_text`), for a
    rubric with ``refusal_right``."""
    if isinstance(gold, GoldConfig) and gold.reward_model:
        from palate.reward import load_reward_model

        rm = load_reward_model(gold.reward_model)

        def rm_score(prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
            return [float(x) for x in rm.score(list(prompts), list(responses))]

        return rm_score
    config = gold if isinstance(gold, GoldConfig) else GoldConfig(rubric=gold or GoldRubric())
    criteria = criteria or {}
    rubrics = {c: config.rubric_for(c) for c in config.criteria}  # other criteria: the base

    def score(prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        out = []
        for p, r in zip(prompts, responses, strict=True):
            c = criteria.get(prompt_text(p)) if criteria else None
            out.append(gold_score(p, r, rubrics.get(c or "", config.rubric), c))
        return out

    return score


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
    from sqlalchemy import select

    from palate.errors import ConfigError
    from palate.label.db import Campaign, Pair, User, open_db
    from palate.label.quality import _words as words_read
    from palate.label.store import (
        LabelIn,
        create_user,
        flip,
        next_assignment,
        set_attributes,
        submit_label,
    )

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
            p.id: (float(a), float(b), len(_words(p.response_a)) - len(_words(p.response_b)))
            for p, a, b in zip(pairs, g_a, g_b, strict=True)
        }
        load = {
            p.id: words_read(p.prompt) + words_read(p.response_a) + words_read(p.response_b)
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

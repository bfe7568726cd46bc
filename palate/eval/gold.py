"""The *gold* preference: a rubric you can read (or a named reward model in its place).

As AlpacaFarm did for cheap, reproducible RLHF experiments: the gold scoring function is a
rubric of measurable text features. The simulated raters (:mod:`palate.raters.simulated`) label
with it, under Bradley-Terry noise; evaluation judges policies by it. The reward model only ever
sees the raters' labels.

The rubric cannot be satisfied by degenerate output: empty responses, responses cut off
mid-sentence, repetitive ones, ones that ignore the prompt and ones that parrot it back all
score low (tested).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field

from palate.config import ADDED_LATER, Config
from palate.data import Prompt, prompt_contents, prompt_text
from palate.reward import load_reward_model
from palate.reward.model import ScoreFn
from palate.text import is_refusal, letter_words

__all__ = [
    "GoldConfig",
    "GoldRubric",
    "gold_features",
    "gold_score",
    "gold_scorer",
]


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
        json_schema_extra=ADDED_LATER,
    )
    refusal_bonus: float = Field(
        1.0,
        description="Bonus for a refusal where refusing is right (see refusal_right).",
        json_schema_extra=ADDED_LATER,
    )
    repetition_weight: float = Field(2.0, description="Penalty × fraction of repeated trigrams.")
    echo_weight: float = Field(
        2.0, description="Penalty × fraction of the response's trigrams copied from the prompt."
    )
    truncation_penalty: float = Field(
        1.0, description="Penalty when the response does not end a sentence (cut off)."
    )
    empty_score: float = Field(-5.0, description="Score of an empty response.")


_VADER: Any = None


def _sentiment(text: str) -> float:
    global _VADER
    if _VADER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _VADER = SentimentIntensityAnalyzer()
    return float(_VADER.polarity_scores(text)["compound"])


def gold_features(prompt: Prompt, response: str, rubric: GoldRubric) -> dict[str, float]:
    """Each feature of the rubric for one response (for reports and debugging)."""
    words = letter_words(response)
    n = len(words)
    trigrams = [tuple(words[i : i + 3]) for i in range(max(0, n - 2))]
    repeated = 1 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0
    p_words = letter_words(prompt_contents(prompt))
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


class GoldConfig(Config):
    """The gold preference: the rubric, or a named reward model scoring in its place."""

    rubric: GoldRubric = Field(default_factory=GoldRubric, description="The gold rubric.")
    criteria: dict[str, GoldRubric] = Field(
        default_factory=dict,
        description="A rubric per prompt criterion (e.g. {harmlessness: {refusal_bonus: 2, "
        "relevance_weight: 0}} for red-team prompts): the fields set there replace those of "
        "`rubric` for that criterion's prompts; other criteria use `rubric` as it is.",
        json_schema_extra=ADDED_LATER,
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

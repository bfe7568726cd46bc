"""Score functions: ``score(prompts, responses)`` callables from a configured reward source —
PPO's reward, evaluation's proxy, the pipeline's raters."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Protocol

import torch

from palate.errors import ConfigError
from palate.feedback.judge import JudgeScorer, load_judge
from palate.reward.model import RewardModelScorer, ScoreFn, load_reward_model
from palate.reward.routed import RoutedScorer

__all__ = ["ScoreSource", "load_score_fn"]


class ScoreSource(Protocol):
    """Where scores come from (:class:`palate.ppo.RewardSource` is one): exactly one of a
    reward model directory, a function ``module:name`` or an AI judge's settings
    (:class:`palate.feedback.JudgeSettings`); ``routes`` maps criteria to their own models."""

    @property
    def model(self) -> str | None: ...

    @property
    def function(self) -> str | None: ...

    @property
    def judge(self) -> Any: ...

    @property
    def routes(self) -> dict[str, str]: ...

    @property
    def batch_size(self) -> int: ...


def load_score_fn(
    source: ScoreSource,
    device: torch.device,
    precision: str,
    criteria: Mapping[str, str] | None = None,
) -> ScoreFn:
    """A ``score(prompts, responses)`` callable for the configured reward source: a
    :class:`palate.reward.RewardModelScorer` for a reward model, the named function, or an AI
    judge's ratings (:class:`palate.feedback.JudgeScorer`). With ``source.routes``, a
    :class:`palate.reward.RoutedScorer` over one model per criterion; ``criteria`` maps each
    prompt's text to its criterion."""
    if source.function:
        module_name, _, name = source.function.partition(":")
        try:
            fn: ScoreFn = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"reward.function {source.function!r}: {err}") from err
        return fn
    if source.judge is not None:
        # lazy: palate.feedback's package imports evaluation, which imports palate.reward

        return JudgeScorer(load_judge(source.judge))
    assert source.model is not None  # RewardSource checks that exactly one is set

    def scorer(path: str) -> RewardModelScorer:
        rm = load_reward_model(path)
        for module in rm.modules():
            module.to(device).requires_grad_(False)
        rm.precision = precision
        return RewardModelScorer(rm, batch_size=source.batch_size)

    if not source.routes:
        return scorer(source.model)
    if criteria is None:
        raise ConfigError("reward.routes: the prompts' criteria are needed to route them")
    routes = {c: scorer(path) for c, path in source.routes.items()}
    return RoutedScorer(routes, scorer(source.model), criteria)

"""One reward model per prompt criterion: each prompt is scored by its criterion's model.

Llama 2 (Touvron et al. 2023, §3.2.2) trains a safety reward model and a helpfulness reward
model apart, because the two goals pull against each other inside one model: a refusal is the
best answer to "how do I make a pipe bomb?" and a poor one to "how do I kill a Python
process?". One reward model trained on both kinds of label learns a refusal's value averaged
over the prompts it saw. Routing by the prompt's criterion (its ``metadata.criterion`` in the
prompts file: helpfulness, harmlessness, ...) gives each prompt the model trained on labels of
its own kind. Llama 2 also switches to the safety model when its score is low on any prompt;
here the route is the prompt's tag alone.

Each routed model carries its own normalisation (fitted on the policy's samples of its own
criterion's prompts), so every prompt's reward is in one unit: a standard deviation of what
the initial policy scores on prompts like it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from palate.data import Prompt, prompt_text
from palate.reward.model import RewardModelScorer, ScoreFn

__all__ = ["RoutedScorer", "reward_models"]


class RoutedScorer:
    """A :data:`ScoreFn` that scores each prompt with ``routes[criterion]`` (``default`` for a
    criterion without a route, or a prompt whose criterion is unknown).

    ``criterion_of`` maps a prompt's :func:`~palate.data.prompt_text` to its criterion.
    """

    def __init__(
        self,
        routes: Mapping[str, ScoreFn],
        default: ScoreFn,
        criterion_of: Mapping[str, str],
    ):
        self.routes = dict(routes)
        self.default = default
        self.criterion_of = dict(criterion_of)

    def route(self, prompt: Prompt) -> str | None:
        """The criterion whose model scores ``prompt`` (None: the default model)."""
        c = self.criterion_of.get(prompt_text(prompt))
        return c if c in self.routes else None

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        out = torch.zeros(len(prompts))  # (N,) in the input order
        groups: dict[str | None, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(self.route(p), []).append(i)
        for c, idx in groups.items():
            fn = self.default if c is None else self.routes[c]
            got = fn([prompts[i] for i in idx], [responses[i] for i in idx])
            out[idx] = torch.as_tensor(got, dtype=torch.float32).detach().cpu().reshape(-1)
        return out


def reward_models(score_fn: Any) -> list[Any]:
    """The palate reward models (or ensembles) behind a scorer: one for a
    :class:`~palate.reward.RewardModelScorer`, each route's and the default's for a
    :class:`RoutedScorer`, none for a plain function."""

    if isinstance(score_fn, RewardModelScorer):
        return [score_fn.reward_model]
    if isinstance(score_fn, RoutedScorer):
        return [
            m for fn in (score_fn.default, *score_fn.routes.values()) for m in reward_models(fn)
        ]
    return []

"""Reward normalisation: the affine map that makes the initial policy's rewards mean 0, std 1.

Follows Ziegler et al. 2019 (openai/lm-human-preferences: ``normalize_before``, gain and bias
fitted on the initial policy's samples) and Huang et al. 2024 ("The N+ Implementation Details of
RLHF with PPO", reward normalisation). The map is fitted once, after training, and saved with
the model (``gain`` and ``offset`` in ``palate_reward.json``), so every consumer — PPO, the
evaluation's proxy, ``palate reward score`` — sees the same units: one unit is one standard
deviation of what the policy produced before RL. PPO's β, the missing-EOS penalty and the
value clip are in those units.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from palate.data import Comparison, Prompt, prompt_text, read_records, read_samples
from palate.errors import DataError
from palate.reward.config import RewardNormalization
from palate.sampling import load_sampler, sample_with_progress

__all__ = ["fit_normalisation", "reference_set"]


class Affine(Protocol):
    """A scorer with a stored normalisation (a reward model or an ensemble)."""

    gain: float
    offset: float

    def score(
        self, prompts: Sequence[Prompt], responses: Sequence[str], *, batch_size: int = 16
    ) -> torch.Tensor: ...


def fit_normalisation(
    scorer: Affine,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    *,
    target_mean: float = 0.0,
    target_std: float = 1.0,
    batch_size: int = 16,
) -> dict[str, float]:
    """Set ``scorer.gain`` and ``scorer.offset`` so its rewards on (prompts, responses) have
    mean ``target_mean`` and (population) std ``target_std``; returns the raw moments.

    gain = target_std / std(raw), offset = target_mean − gain · mean(raw). A reference set on
    which the model gives every response the same score leaves the gain at 1 (only a shift).
    """
    if len(responses) < 2:
        raise DataError(f"reward normalisation needs at least 2 responses, got {len(responses)}")
    scorer.gain, scorer.offset = 1.0, 0.0
    raw = scorer.score(prompts, responses, batch_size=batch_size).double()  # (N,)
    mean, std = float(raw.mean()), float(raw.std(unbiased=False))
    gain = target_std / std if std > 1e-6 else 1.0
    scorer.gain, scorer.offset = gain, target_mean - gain * mean
    return {"raw_mean": mean, "raw_std": std, "gain": gain, "offset": scorer.offset}


def reference_set(
    settings: RewardNormalization,
    comparisons: Sequence[Comparison],
    *,
    precision: str,
    seed: int,
) -> tuple[list[Prompt], list[str], str]:
    """(prompts, responses, where they came from): the responses normalisation is fitted on.

    In order of preference: ``responses`` (rows already sampled from the initial policy), fresh
    samples of ``policy`` on ``prompts`` (default: the comparisons' prompts, each once), or the
    chosen and rejected responses of the first training comparisons.
    """
    n = settings.samples
    if settings.responses:
        rows = read_samples(settings.responses)  # an empty reply is a sample too
        rows = random.Random(seed).sample(rows, min(n, len(rows)))
        return [r.prompt for r in rows], [r.response for r in rows], settings.responses
    if settings.policy:
        return (*_policy_samples(settings, comparisons, precision, seed), settings.policy)
    ref = list(comparisons)[: (n + 1) // 2]
    prompts = [c.prompt for c in ref for _ in (0, 1)][:n]
    responses = [r for c in ref for r in (c.chosen, c.rejected)][:n]
    return prompts, responses, "training comparisons"


def _policy_samples(
    settings: RewardNormalization,
    comparisons: Sequence[Comparison],
    precision: str,
    seed: int,
) -> tuple[list[Prompt], list[str]]:

    pool: list[Any]
    if settings.prompts:
        pool = [r.prompt for r in read_records(settings.prompts, "prompts").records]
    else:  # each distinct prompt of the comparisons once
        seen: dict[str, Prompt] = {}
        for c in comparisons:
            seen.setdefault(prompt_text(c.prompt), c.prompt)
        pool = list(seen.values())
    if not pool:
        raise DataError("reward normalisation: no prompts to sample the policy on")
    rng = random.Random(seed)
    prompts = [pool[i % len(pool)] for i in range(settings.samples)]
    rng.shuffle(prompts)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_sampler(settings.policy or "", precision, device)
    gens = sample_with_progress(
        "normalise",
        model,
        tok,
        prompts,
        settings.sampling,
        seed=seed,
        batch_size=settings.batch_size,
        precision=precision,
    )
    return prompts, [g.text for g in gens]

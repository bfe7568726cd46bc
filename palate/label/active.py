"""Choosing which pairs people label: active learning for preference collection.

Labels are the expensive part of RLHF, so when there are more candidate pairs than the labelling
budget, pick the ones the reward model would learn most from:

* ``random`` — a uniform sample (unbiased: the only choice whose labels also estimate how good
  the reward model is on the policy's own answers);
* ``uncertainty`` — pairs whose predicted preference P(a ≻ b) = σ(r_a − r_b) is nearest ½
  (uncertainty sampling, Lewis & Gale 1994);
* ``disagreement`` — pairs on which an ensemble of reward models disagrees most, the spread of
  the members' P_m(a ≻ b) (query by committee, Seung et al. 1992; the ensembles of Christiano
  et al. 2017, who chose comparisons by the variance of the ensemble's predictions);
* a ``random_share`` of every budget drawn uniformly first, the rest by the chosen rule, so a
  share of labels stays an unbiased sample for evaluation.

The rules are pure functions of the reward scores; where the scores come from is the caller's
business (``palate run``'s rounds score candidates with the reward model of the last round).
"""

from __future__ import annotations

import random
from typing import Literal

import numpy as np

__all__ = ["Selection", "preference_probs", "select_pairs"]

Selection = Literal["random", "uncertainty", "disagreement"]


def preference_probs(scores_a: np.ndarray, scores_b: np.ndarray) -> np.ndarray:
    """P_m(a ≻ b) = σ(r_a − r_b) per ensemble member and pair (Bradley-Terry).
    ``scores_a``/``scores_b``: (M, N) rewards of the pairs' two answers by M members (M = 1 for
    a single reward model); returns (M, N)."""
    a = np.atleast_2d(np.asarray(scores_a, dtype=float))
    b = np.atleast_2d(np.asarray(scores_b, dtype=float))
    if a.shape != b.shape:
        raise ValueError(f"scores of a {a.shape} and b {b.shape} differ in shape")
    return 1.0 / (1.0 + np.exp(-(a - b)))


def select_pairs(
    n_pairs: int,
    budget: int,
    method: Selection = "random",
    *,
    probs: np.ndarray | None = None,
    random_share: float = 0.0,
    seed: int = 0,
) -> dict[int, str]:
    """The ``budget`` pairs (of ``n_pairs`` candidates) to label: index → why it was chosen
    ("all" when the budget covers every pair, "random" for the uniform share, else ``method``),
    in index order.

    ``probs``: (M, N) members' P(a ≻ b) (:func:`preference_probs`), needed by ``uncertainty``
    (uses the members' mean) and ``disagreement`` (their standard deviation; needs M ≥ 2).
    ``random_share`` of the budget is drawn uniformly first. Ties are broken by a seeded shuffle,
    so equal candidates are not chosen by their position."""
    if not 0.0 <= random_share <= 1.0:
        raise ValueError(f"random_share {random_share}: expected 0 to 1")
    if budget >= n_pairs:
        return dict.fromkeys(range(n_pairs), "all")
    rng = random.Random(seed)
    order = list(range(n_pairs))
    rng.shuffle(order)
    n_random = budget if method == "random" else round(budget * random_share)
    chosen = dict.fromkeys(order[:n_random], "random")
    rest = order[n_random:]
    if n_random < budget:
        key = _priority(method, probs, n_pairs)  # (N,) higher = more useful to label
        # stable sort on the shuffled order: ties keep the random order
        rest = sorted(rest, key=lambda i: -key[i])
        chosen.update(dict.fromkeys(rest[: budget - n_random], method))
    return dict(sorted(chosen.items()))


def _priority(method: Selection, probs: np.ndarray | None, n_pairs: int) -> np.ndarray:
    if probs is None:
        raise ValueError(f"select {method!r}: needs the reward model's predicted preferences")
    p = np.atleast_2d(np.asarray(probs, dtype=float))  # (M, N)
    if p.shape[1] != n_pairs:
        raise ValueError(f"select {method!r}: {p.shape[1]} predictions for {n_pairs} pairs")
    if method == "uncertainty":
        return -np.abs(p.mean(axis=0) - 0.5)  # nearest ½ first
    if method == "disagreement":
        if p.shape[0] < 2:
            raise ValueError("select 'disagreement': needs an ensemble (≥ 2 reward models)")
        return p.std(axis=0)  # members' spread
    raise ValueError(f"select {method!r}: expected random, uncertainty or disagreement")

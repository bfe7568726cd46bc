"""Win rates and their uncertainty: paired wins, a bootstrap 95% interval, the
length-controlled win rate, and how often two scorers order two answers alike.

Plain functions of per-prompt scores (no model): every comparison in palate (``palate run``'s
eval stage, ``palate eval``, rater populations, XSTest and sycophancy rates) uses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "rate",
    "share_above_half",
    "bootstrap_mean",
    "length_controlled_win_rate",
    "order_agreement",
    "pairwise_wins",
    "win_rate",
    "win_rates",
]


def pairwise_wins(
    new: Sequence[float] | np.ndarray, old: Sequence[float] | np.ndarray
) -> np.ndarray:
    """1 where ``new`` scores above ``old``, ½ on ties, else 0 (one per prompt). Scores of
    different shapes are an error (numpy would broadcast them silently)."""
    a, b = np.asarray(new, dtype=float), np.asarray(old, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"pairwise_wins needs scores of one shape (got {a.shape} and {b.shape})")
    return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


def order_agreement(
    delta: Sequence[float] | np.ndarray, gold_delta: Sequence[float] | np.ndarray
) -> float | None:
    """How often score differences ``delta`` (e.g. a reward model's, answer x minus answer y)
    have the sign of the gold's ``gold_delta``; pairs the gold ties are left out (None if all)."""
    d, g = np.asarray(delta, dtype=float), np.asarray(gold_delta, dtype=float)
    decided = g != 0
    return float((np.sign(d) == np.sign(g))[decided].mean()) if decided.any() else None


def bootstrap_mean(
    values: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """Mean of per-prompt values with a percentile-bootstrap interval over prompts (scipy)."""
    # scipy.stats imports in ~1 s; loaded only when a CI is computed
    from scipy.stats import bootstrap

    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("bootstrap_mean needs at least one value")
    mean = float(x.mean())
    if x.size < 2 or np.all(x == x[0]):
        return {"mean": mean, "low": mean, "high": mean, "n": int(x.size)}
    res = bootstrap(
        (x,),
        np.mean,
        confidence_level=confidence,
        n_resamples=resamples,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    ci = res.confidence_interval
    return {"mean": mean, "low": float(ci.low), "high": float(ci.high), "n": int(x.size)}


def win_rate(
    new: Sequence[float],
    old: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """Fraction of prompts where ``new`` scores above ``old`` (ties count half), with a
    percentile-bootstrap interval over prompts."""
    m = bootstrap_mean(
        pairwise_wins(new, old), confidence=confidence, resamples=resamples, seed=seed
    )
    return {"win_rate": m["mean"], "low": m["low"], "high": m["high"], "n": m["n"]}


def length_controlled_win_rate(
    wins: Sequence[float] | np.ndarray,
    len_new: Sequence[float],
    len_old: Sequence[float],
    *,
    resamples: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """The win rate with the length advantage regressed out, as AlpacaEval's length-controlled
    win rate (Dubois et al. 2024): fit ``P(win) = σ(a + b·tanh(Δ/σ_Δ))`` on the per-prompt wins
    (ties ½) with Δ = len_new − len_old, and report ``σ(a)``: the win rate when both answers
    are equally long. A policy that only got longer has a raw win rate above ½ and an LC win rate
    near ½. Percentile-bootstrap interval over prompts (refits); a small L2 penalty on b keeps
    the fit finite when length separates wins perfectly."""
    # scipy.optimize: loaded only for this fit
    from scipy.optimize import minimize

    w = np.asarray(wins, dtype=float)
    delta = np.asarray(len_new, dtype=float) - np.asarray(len_old, dtype=float)
    if w.shape != delta.shape or w.size < 2:
        raise ValueError("length-controlled win rate needs ≥ 2 prompts with wins and lengths")
    scale = float(delta.std()) or 1.0
    x = np.tanh(delta / scale)

    def fit(idx: np.ndarray) -> float:
        ww, xx = w[idx], x[idx]

        def loss(theta: np.ndarray) -> float:
            z = theta[0] + theta[1] * xx
            # soft-target binary cross-entropy, −[w log σ(z) + (1 − w) log σ(−z)]
            bce = np.logaddexp(0, -z) * ww + np.logaddexp(0, z) * (1 - ww)
            return float(bce.sum() + 1e-2 * theta[1] ** 2) / len(ww)

        a = minimize(loss, np.zeros(2), method="BFGS").x[0]
        return float(1 / (1 + np.exp(-a)))

    rate = fit(np.arange(w.size))
    rng = np.random.default_rng(seed)
    boots = sorted(fit(rng.integers(0, w.size, w.size)) for _ in range(resamples))
    lo = boots[int((1 - confidence) / 2 * resamples)]
    hi = boots[min(resamples - 1, int((1 + confidence) / 2 * resamples))]
    return {"lc_win_rate": rate, "low": lo, "high": hi, "n": int(w.size)}


def win_rates(
    wins: Sequence[float] | np.ndarray, len_new: Sequence[int], len_old: Sequence[int], seed: int
) -> dict[str, Any]:
    """From per-prompt wins (ties ½): the win rate with its bootstrap interval and the
    length-controlled win rate ({n, win_rate, low, high, lc_win_rate, lc_low, lc_high})."""
    out: dict[str, Any] = {"n": len(wins)}
    if len(wins) == 0:
        return out
    m = bootstrap_mean(wins, seed=seed)
    out.update({"win_rate": m["mean"], "low": m["low"], "high": m["high"]})
    if len(wins) >= 2:
        lc = length_controlled_win_rate(wins, len_new, len_old, seed=seed)
        out.update({"lc_win_rate": lc["lc_win_rate"], "lc_low": lc["low"], "lc_high": lc["high"]})
    return out


def share_above_half(values: Sequence[float]) -> float:
    """Share of values above ½, ties counting half (e.g. P(the true answer) per item)."""
    return float(pairwise_wins(values, [0.5] * len(values)).mean())


def rate(hits: Sequence[bool], seed: int = 0) -> dict[str, float]:
    """The share of hits with its bootstrap 95% interval: {rate, low, high, n}."""
    r = win_rate([float(h) for h in hits], [0.5] * len(hits), seed=seed)
    return {"rate": r["win_rate"], "low": r["low"], "high": r["high"], "n": r["n"]}

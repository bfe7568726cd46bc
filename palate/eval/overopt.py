"""Over-optimisation: gold and proxy reward against the distance travelled from the initial
policy, with the functional forms of Gao, Schulman & Hilton (2022), "Scaling laws for reward
model overoptimization".

With d = √KL(π ‖ π_init):

- best-of-n: ``R_bon(d) = d · (α − β·d)``, where for n samples KL_bon = log n − (n − 1)/n
  (the analytic bound, exact for continuous rewards without ties);
- RL (PPO): ``R_rl(d) = d · (α − β·log d)``.

Both are linear in (α, β), so they are fitted by least squares on (d, R − R(0)) points. The gold
peak is where dR/dd = 0: d* = α / (2β) for best-of-n, d* = exp(α/β − 1) for RL; a policy past
its peak has been over-optimised (proxy still rising, gold falling).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field, model_validator
from scipy.special import comb

from palate.config import Config
from palate.sampling import sample_with_progress

if TYPE_CHECKING:
    from palate.data import Prompt
    from palate.reward.model import ScoreFn
    from palate.sampling import SamplingConfig

__all__ = [
    "Fit",
    "OveroptSettings",
    "best_of_n_curve",
    "bon_kl",
    "bon_kl_sampled",
    "fit_bon",
    "fit_rl",
    "study",
]


class OveroptSettings(Config):
    """Over-optimisation study (:func:`palate.eval.overopt.study`): best-of-n on the initial policy's
    samples and PPO's checkpoints, gold and proxy against √KL, with Gao et al.'s fits."""

    prompts: int = Field(16, ge=1, description="Held-out prompts sampled for best-of-n.")
    samples: int = Field(64, ge=2, description="Samples per prompt (N ≥ the largest n).")
    ns: list[int] = Field(
        default_factory=lambda: [1, 2, 4, 8, 16, 32, 64],
        description="The n of best-of-n (1 is the initial policy itself).",
    )

    @model_validator(mode="after")
    def _ns(self) -> OveroptSettings:
        if 1 not in self.ns or max(self.ns) > self.samples or min(self.ns) < 1:
            raise ValueError("overopt.ns must include 1 and lie within 1..overopt.samples")
        return self


def bon_kl(n: int) -> float:
    """KL(best-of-n ‖ π) = log n − (n − 1)/n (Stiennon et al. 2020, appendix; Gao et al.)."""
    if n < 1:
        raise ValueError("n must be at least 1")
    return math.log(n) - (n - 1) / n


@dataclass
class Fit:
    """A fitted curve R(d) = d·(α − β·g(d)) and its peak."""

    form: str  # "bon" or "rl"
    alpha: float
    beta: float
    r2: float  # coefficient of determination of the fit

    def __call__(self, d: float) -> float:
        if d <= 0:
            return 0.0
        g = d if self.form == "bon" else math.log(d)
        return d * (self.alpha - self.beta * g)

    @property
    def peak_d(self) -> float | None:
        """d at the maximum of R (None when the curve has no interior maximum: β ≤ 0)."""
        if self.beta <= 0:
            return None
        if self.form == "bon":
            return self.alpha / (2 * self.beta)
        return math.exp(self.alpha / self.beta - 1)

    @property
    def peak_kl(self) -> float | None:
        d = self.peak_d
        return None if d is None else d * d

    @property
    def peak_gain(self) -> float | None:
        d = self.peak_d
        return None if d is None else self(d)


def _fit(form: str, d: Sequence[float], r: Sequence[float]) -> Fit:
    dd = np.asarray(d, dtype=float)
    rr = np.asarray(r, dtype=float)
    if dd.shape != rr.shape or dd.size < 2:
        raise ValueError("need at least two (d, R) points of equal length")
    if np.any(dd < 0):
        raise ValueError("d = √KL must be non-negative")
    keep = dd > 0  # d = 0 carries no information about α, β (R(0) = 0 by construction)
    dd, rr = dd[keep], rr[keep]
    if dd.size < 2:
        raise ValueError("need at least two points with d > 0")
    g = dd if form == "bon" else np.log(dd)
    design = np.stack([dd, -dd * g], axis=1)  # R = α·d − β·d·g(d)
    (alpha, beta), *_ = np.linalg.lstsq(design, rr, rcond=None)
    pred = design @ np.array([alpha, beta])
    ss_res = float(((rr - pred) ** 2).sum())
    ss_tot = float(((rr - rr.mean()) ** 2).sum())
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return Fit(form, float(alpha), float(beta), r2)


def fit_bon(d: Sequence[float], gain: Sequence[float]) -> Fit:
    """Fit R_bon(d) = d(α − βd) to gains over the initial policy at distances d."""
    return _fit("bon", d, gain)


def fit_rl(d: Sequence[float], gain: Sequence[float]) -> Fit:
    """Fit R_rl(d) = d(α − β log d) to gains over the initial policy at distances d."""
    return _fit("rl", d, gain)


def _rank_weights(n_samples: int, n: int) -> np.ndarray:
    """P(the best of n draws without replacement from N is the i-th smallest), i = 1..N:
    C(i−1, n−1) / C(N, n)."""

    i = np.arange(1, n_samples + 1)
    return comb(i - 1, n - 1) / comb(n_samples, n)


def bon_kl_sampled(n_samples: int, n: int) -> float:
    """KL(best-of-n ‖ π) on N samples taken as π's support (uniform): best-of-n drawn *with*
    replacement picks the i-th ranked sample with p_i = (i/N)^n − ((i−1)/N)^n, and KL = Σ p_i
    log(N p_i). It approaches the analytic log n − (n−1)/n from below as N grows."""
    i = np.arange(1, n_samples + 1)
    p = (i / n_samples) ** n - ((i - 1) / n_samples) ** n
    p = p[p > 0]
    return float(np.sum(p * np.log(p * n_samples)))


def best_of_n_curve(
    proxy: Sequence[Sequence[float]], gold: Sequence[Sequence[float]], ns: Sequence[int]
) -> list[dict[str, float]]:
    """Gold and proxy of best-of-n (chosen by the proxy) for each n, averaged over prompts.

    ``proxy[j]``/``gold[j]``: scores of prompt j's N samples from the initial policy. For each n
    the expectation over all subsets of n of the N samples is exact (the unbiased estimator of
    Nakano et al. 2021, appendix): the best of a subset by proxy is the i-th ranked sample with
    probability C(i−1, n−1)/C(N, n). Returns rows {n, kl, kl_sampled, d, proxy, gold}; ``d`` uses
    the analytic KL."""
    rows = []
    n_samples = min(len(p) for p in proxy)
    for n in ns:
        if not 1 <= n <= n_samples:
            raise ValueError(f"n={n}: need 1 ≤ n ≤ {n_samples} samples per prompt")
        w = _rank_weights(n_samples, n)
        g_tot = p_tot = 0.0
        for p_scores, g_scores in zip(proxy, gold, strict=True):
            order = np.argsort(np.asarray(p_scores[:n_samples], dtype=float), kind="stable")
            g_tot += float(np.dot(w, np.asarray(g_scores[:n_samples], dtype=float)[order]))
            p_tot += float(np.dot(w, np.asarray(p_scores[:n_samples], dtype=float)[order]))
        kl = bon_kl(n)
        rows.append(
            {
                "n": n,
                "kl": kl,
                "kl_sampled": bon_kl_sampled(n_samples, n),
                "d": math.sqrt(kl),
                "proxy": p_tot / len(proxy),
                "gold": g_tot / len(proxy),
            }
        )
    return rows


def study(
    initial: Any,
    tok: Any,
    prompts: Sequence[Prompt],
    sampling: SamplingConfig,
    gold: ScoreFn,
    proxy: ScoreFn,
    points: Sequence[dict[str, Any]],
    settings: OveroptSettings,
    *,
    seed: int = 1,
    batch_size: int = 16,
    precision: str = "fp32",
) -> dict[str, Any]:
    """The over-optimisation study: best-of-n (chosen by ``proxy``) on ``settings.samples``
    answers of the initial policy to each of the first ``settings.prompts`` prompts, and
    ``points`` — policies optimised further ({kl, gold, proxy}, the first being the initial
    policy at KL 0) — as gold and proxy gains against d = √KL, each fitted with Gao et al.'s
    form. Returns {bon, rl, fits, bon_gold_best_n, prompts, samples}. ``palate run`` passes
    its PPO checkpoints as points, ``palate eval`` its policies."""
    prompts, samples, ns = prompts[: settings.prompts], settings.samples, settings.ns

    each = [p for p in prompts for _ in range(samples)]
    gens = sample_with_progress(
        "best-of-n samples",
        initial,
        tok,
        each,
        sampling,
        seed=seed,
        batch_size=batch_size,
        precision=precision,
    )
    texts = [g.text for g in gens]
    p_scores = [float(x) for x in proxy(each, texts)]
    g_scores = [float(x) for x in gold(each, texts)]
    rows = best_of_n_curve(
        [p_scores[i : i + samples] for i in range(0, len(each), samples)],
        [g_scores[i : i + samples] for i in range(0, len(each), samples)],
        sorted(ns),
    )
    base = rows[0]
    for r in rows:
        r["gold_gain"], r["proxy_gain"] = r["gold"] - base["gold"], r["proxy"] - base["proxy"]
    start = points[0]
    rl = [
        {
            **{k: p[k] for k in ("update", "name") if k in p},
            "kl": p["kl"],
            "d": max(p["kl"], 0.0) ** 0.5,
            "gold_gain": p["gold"] - start["gold"],
            "proxy_gain": p["proxy"] - start["proxy"],
        }
        for p in points
    ]

    def fitted(f: Fit) -> dict[str, Any]:
        keys = ("alpha", "beta", "r2", "peak_d", "peak_kl", "peak_gain")
        return {k: getattr(f, k) for k in keys}

    fits: dict[str, Any] = {}
    for key in ("gold", "proxy"):
        fits[f"bon_{key}"] = fitted(
            fit_bon([r["d"] for r in rows], [r[f"{key}_gain"] for r in rows])
        )
        if sum(r["d"] > 0 for r in rl) >= 2:
            fits[f"rl_{key}"] = fitted(fit_rl([r["d"] for r in rl], [r[f"{key}_gain"] for r in rl]))
    best = max(rows, key=lambda r: r["gold"])
    return {
        "bon": rows,
        "rl": rl,
        "fits": fits,
        "bon_gold_best_n": best["n"],
        "prompts": len(prompts),
        "samples": samples,
    }

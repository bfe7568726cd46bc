"""Over-optimisation maths: the best-of-n KL, Gao et al.'s fits, the length-controlled win rate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from palate.eval.overopt import bon_kl, fit_bon, fit_rl
from palate.eval.stats import length_controlled_win_rate


def test_best_of_n_kl_hand_computed() -> None:
    assert bon_kl(1) == 0.0
    assert bon_kl(2) == pytest.approx(math.log(2) - 0.5)  # 0.19315
    assert bon_kl(64) == pytest.approx(4.158883 - 63 / 64, abs=1e-6)
    with pytest.raises(ValueError):
        bon_kl(0)


def test_best_of_n_kl_matches_sampling() -> None:
    """Sampled check of the bound: best-of-n over a uniform categorical of 10,000 outcomes
    (ties negligible) has KL to the base distribution ≈ log n − (n−1)/n."""
    m, n = 10_000, 8
    # P(best-of-n = the k-th smallest of m) = (k/m)^n − ((k−1)/m)^n
    k = np.arange(1, m + 1)
    p = (k / m) ** n - ((k - 1) / m) ** n
    kl = float(np.sum(p * np.log(p * m)))
    assert kl == pytest.approx(bon_kl(n), abs=2e-3)


@pytest.mark.parametrize("form,alpha,beta", [("bon", 1.2, 0.3), ("rl", 0.8, 0.25)])
def test_fits_recover_known_coefficients(form: str, alpha: float, beta: float) -> None:
    rng = np.random.default_rng(0)
    d = np.linspace(0.1, 5, 40)
    g = d if form == "bon" else np.log(d)
    gain = d * (alpha - beta * g) + rng.normal(0, 0.01, d.size)
    fit = (fit_bon if form == "bon" else fit_rl)(list(d), list(gain))
    assert fit.alpha == pytest.approx(alpha, abs=0.02) and fit.beta == pytest.approx(beta, abs=0.02)
    assert fit.r2 > 0.99
    peak = alpha / (2 * beta) if form == "bon" else math.exp(alpha / beta - 1)
    assert fit.peak_d == pytest.approx(peak, rel=0.05)
    assert fit(fit.peak_d) >= max(fit(x) for x in d)  # it is the maximum


def test_no_peak_when_gold_keeps_rising() -> None:
    fit = fit_bon([1, 2, 3], [1.0, 2.0, 3.0])
    assert fit.beta == pytest.approx(0.0, abs=1e-9) or fit.peak_d is None or fit.peak_d > 3


def test_length_controlled_win_rate_removes_a_pure_length_advantage() -> None:
    rng = np.random.default_rng(1)
    n = 600
    len_old = rng.normal(40, 8, n)
    delta = rng.normal(8, 8, n)  # the new policy is mostly longer...
    x = np.tanh(delta / delta.std())
    wins = (rng.random(n) < 1 / (1 + np.exp(-2.5 * x))).astype(float)  # ...and wins only by it
    raw = wins.mean()
    lc = length_controlled_win_rate(wins, len_old + delta, len_old, resamples=100)
    assert raw > 0.7
    assert lc["lc_win_rate"] == pytest.approx(0.5, abs=0.06)
    assert lc["low"] <= lc["lc_win_rate"] <= lc["high"]


def test_length_controlled_win_rate_keeps_a_real_advantage() -> None:
    rng = np.random.default_rng(2)
    n = 600
    len_old = rng.normal(40, 8, n)
    len_new = len_old + rng.normal(0, 8, n)  # lengths unrelated to winning
    p = 1 / (1 + np.exp(-1.0))  # 0.731
    wins = (rng.random(n) < p).astype(float)
    lc = length_controlled_win_rate(wins, len_new, len_old, resamples=100)
    assert lc["lc_win_rate"] == pytest.approx(p, abs=0.05)
    assert lc["lc_win_rate"] == pytest.approx(wins.mean(), abs=0.03)


def test_best_of_n_curve_hand_computed() -> None:
    from palate.eval.overopt import best_of_n_curve, bon_kl_sampled

    # one prompt, 3 samples: proxy ranks them c < a < b; gold of a, b, c = 1, 0, 2
    proxy = [[0.5, 0.9, 0.1]]
    gold = [[1.0, 0.0, 2.0]]
    rows = best_of_n_curve(proxy, gold, [1, 2, 3])
    # n=1: the mean (1); n=2: subsets {a,b}->b, {a,c}->a, {b,c}->b: gold (0+1+0)/3; n=3: b
    assert [r["gold"] for r in rows] == pytest.approx([1.0, 1 / 3, 0.0])
    assert [r["proxy"] for r in rows] == pytest.approx([0.5, (0.9 + 0.5 + 0.9) / 3, 0.9])
    assert rows[0]["kl"] == 0.0 and rows[1]["d"] == pytest.approx(math.sqrt(bon_kl(2)))
    # sampled KL on N=3 support for n=2: p = 1/9, 3/9, 5/9
    p = np.array([1, 3, 5]) / 9
    assert bon_kl_sampled(3, 2) == pytest.approx(float(np.sum(p * np.log(3 * p))))
    assert bon_kl_sampled(4096, 16) == pytest.approx(bon_kl(16), abs=0.01)
    with pytest.raises(ValueError):
        best_of_n_curve(proxy, gold, [4])

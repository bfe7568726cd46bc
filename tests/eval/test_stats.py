"""Win rates, bootstrap intervals, paired wins (palate.eval.stats)."""

from __future__ import annotations

import pytest

from palate.eval.stats import rate, share_above_half, win_rate


def test_win_rate_hand_computed_and_interval() -> None:
    r = win_rate([3, 1, 2, 5], [1, 1, 3, 4])  # win, tie, loss, win -> 2.5 / 4
    assert r["win_rate"] == pytest.approx(0.625) and r["n"] == 4
    assert 0 <= r["low"] <= 0.625 <= r["high"] <= 1
    big = win_rate([1.0] * 150 + [0.0] * 50, [0.5] * 200)
    assert big["win_rate"] == 0.75
    # binomial SE sqrt(.75*.25/200) = 0.031 -> the 95% interval is about ±0.06
    assert big["low"] == pytest.approx(0.69, abs=0.02) and big["high"] == pytest.approx(
        0.81, abs=0.02
    )
    assert win_rate([1, 1], [0, 0]) == {"win_rate": 1.0, "low": 1.0, "high": 1.0, "n": 2}
    with pytest.raises(ValueError):
        win_rate([1], [1, 2])


def test_scores_of_different_shapes_are_an_error_not_a_broadcast() -> None:
    """[1, 2] against [0] would broadcast to two wins; it is refused, wherever it comes in."""
    from palate.eval.stats import pairwise_wins, win_rate

    with pytest.raises(ValueError, match="one shape"):
        pairwise_wins([1.0, 2.0], [0.0])
    with pytest.raises(ValueError, match="one shape"):
        win_rate([1.0, 2.0], [0.0])
    with pytest.raises(ValueError, match="at least one"):
        win_rate([], [])
    assert pairwise_wins([1.0, 0.0, 2.0], [0.0, 0.0, 3.0]).tolist() == [1.0, 0.5, 0.0]


def test_share_above_half_counts_ties_half() -> None:
    # 0.9 and 0.6 above, 0.5 a tie, 0.2 below: (1 + 1 + 0.5 + 0) / 4
    assert share_above_half([0.9, 0.6, 0.5, 0.2]) == 0.625


def test_rate_is_the_share_of_hits_with_an_interval() -> None:
    r = rate([True, True, True, False], seed=0)
    assert r["rate"] == 0.75 and r["n"] == 4
    assert 0 <= r["low"] <= 0.75 <= r["high"] <= 1

"""Pair selection for labelling (palate/label/active.py) on hand-built examples."""

from __future__ import annotations

import numpy as np
import pytest

from palate.label.active import preference_probs, select_pairs


def test_preference_probs_is_bradley_terry() -> None:
    p = preference_probs(np.array([[1.0, 0.0]]), np.array([[0.0, 0.0]]))
    assert p.shape == (1, 2)
    assert p[0, 0] == pytest.approx(1 / (1 + np.exp(-1.0)))  # σ(1) = 0.731
    assert p[0, 1] == 0.5


def test_uncertainty_picks_the_pairs_nearest_one_half() -> None:
    # reward differences r_a − r_b: P = σ(Δ); nearest ½ are pairs 4 (Δ=0), 1 (Δ=0.1), 6 (Δ=−0.2)
    delta = np.array([3.0, 0.1, -2.5, 1.0, 0.0, -4.0, -0.2, 2.0])
    probs = preference_probs(delta[None, :], np.zeros((1, 8)))
    assert list(select_pairs(8, 3, "uncertainty", probs=probs)) == [1, 4, 6]
    assert list(select_pairs(8, 1, "uncertainty", probs=probs)) == [4]


def test_disagreement_picks_the_ensembles_widest_spread() -> None:
    probs = np.array(
        [
            [0.9, 0.5, 0.1, 0.6, 0.5],
            [0.9, 0.5, 0.9, 0.4, 0.5],  # members disagree on pair 2 (most) and pair 3
            [0.9, 0.5, 0.5, 0.5, 0.5],
        ]
    )
    assert list(select_pairs(5, 1, "disagreement", probs=probs)) == [2]
    assert list(select_pairs(5, 2, "disagreement", probs=probs)) == [2, 3]
    with pytest.raises(ValueError, match="ensemble"):
        select_pairs(5, 2, "disagreement", probs=probs[:1])


def test_random_share_is_drawn_first_and_the_rest_by_the_rule() -> None:
    delta = np.arange(20, dtype=float) - 0.5  # |Δ| smallest at 0 and 1
    probs = preference_probs(delta[None, :], np.zeros((1, 20)))
    chosen = select_pairs(20, 4, "uncertainty", probs=probs, random_share=0.5, seed=3)
    assert len(chosen) == 4 == len(set(chosen))
    # the random half is the same seeded draw as a random selection of 2 ...
    drawn = set(select_pairs(20, 2, "random", seed=3))
    assert drawn <= set(chosen) and not drawn <= {0, 1, 2}  # (this seed draws elsewhere)
    # ... and the other half the two most uncertain left: 0 and 1 (|Δ| = 0.5)
    assert set(chosen) == drawn | {0, 1}
    # each index says why it was chosen
    assert chosen == {**dict.fromkeys(drawn, "random"), 0: "uncertainty", 1: "uncertainty"}
    assert list(chosen) == sorted(chosen)
    rand = select_pairs(20, 4, "random", seed=3)
    assert list(rand) != [0, 1, 2, 3] and rand == select_pairs(20, 4, "random", seed=3)  # seeded
    assert set(rand.values()) == {"random"}
    everything = select_pairs(5, 9, "uncertainty", probs=probs[:, :5])  # budget ≥ N
    assert everything == dict.fromkeys(range(5), "all")


def test_ties_are_not_broken_by_position() -> None:
    probs = np.full((1, 100), 0.5)  # every pair equally uncertain
    firsts = {tuple(select_pairs(100, 5, "uncertainty", probs=probs, seed=s)) for s in range(5)}
    assert len(firsts) > 1 and (0, 1, 2, 3, 4) not in firsts


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="needs the reward model"):
        select_pairs(4, 2, "uncertainty")
    with pytest.raises(ValueError, match="3 predictions for 4 pairs"):
        select_pairs(4, 2, "uncertainty", probs=np.full((1, 3), 0.5))
    with pytest.raises(ValueError, match="random_share"):
        select_pairs(4, 2, "random", random_share=1.5)

"""The dashboard's statistics (palate/label/stats.py) against hand-computed values."""

from __future__ import annotations

import pytest

from palate.label.store import (
    LabelIn,
    create_campaign,
    create_user,
    flip,
    next_assignment,
    submit_label,
)
from tests.label.helpers import pairs


def test_dashboard_statistics_hand_computed(db) -> None:
    import krippendorff
    import numpy as np

    from palate.label.stats import campaign_stats

    ps = pairs(3)
    ps[2].gold = "a"
    camp = create_campaign(db, "c", ps, overlap=3)
    raters = [create_user(db, f"r{i}")[0] for i in range(3)]
    # answers (pair orientation) per rater for pairs 1..3
    table = {0: ["a", "a", "a"], 1: ["a", "b", "a"], 2: ["b", "b", "tie"]}
    for r_i, r in enumerate(raters):
        for _ in range(3):
            a = next_assignment(db, camp, r)
            want = table[r_i][a.pair_id - 1]
            shown = flip(want, a.swapped)
            submit_label(
                db,
                a,
                r,
                LabelIn(answer=shown, seconds=2.0 + r_i, flags=["evasive"] if r_i == 2 else []),
            )
    st = campaign_stats(db, camp)
    # pair1: a,a,b → 1 of 3 rater pairs agree; pair2: a,b,b → 1/3; pair3: a,a,tie → 1/3
    assert st["pairwise_agreement"] == pytest.approx(3 / 9)
    data = np.array([[0, 0, 0], [0, 1, 0], [1, 1, 2]], dtype=float)
    want = krippendorff.alpha(reliability_data=data, level_of_measurement="nominal")
    assert st["krippendorff_alpha"] == pytest.approx(want)
    by = {r["rater"]: r for r in st["raters"]}
    # r0 vs the others' majority: pair1 others (a,b) no majority; pair2 others (b,b)=b≠a;
    # pair3 others (a,tie) none → 0 of 1
    assert by["r0"]["majority_agreement"] == 0.0
    assert by["r1"]["majority_agreement"] is None  # others split on every pair
    assert by["r2"]["majority_agreement"] == 0.0  # pairs 1 and 3: others say a, r2 did not
    assert by["r0"]["gold_accuracy"] == 1.0 and by["r2"]["gold_accuracy"] == 0.0
    assert by["r1"]["median_seconds"] == 3.0 and st["median_seconds"] == 3.0
    assert st["flags"] == {"evasive": 3} and st["complete_pairs"] == 3

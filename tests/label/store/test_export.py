"""Export (palate/label/store/export.py): votes aggregated into soft labels, one row per pair and
label source, read back as palate comparisons."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from palate.errors import ConfigError
from palate.label.db import Label
from palate.label.store import (
    LabelIn,
    create_campaign,
    create_user,
    export_rows,
    flip,
    next_assignment,
    submit_label,
)
from tests.label.helpers import pairs


def test_export_aggregates_votes_into_soft_labels(db, tmp_path: Path) -> None:
    camp = create_campaign(db, "c", pairs(2), overlap=3)
    raters = [create_user(db, f"r{i}")[0] for i in range(3)]
    votes = {0: ["a", "a", "b"], 1: ["tie", "tie", "a"]}  # pair index -> answers (pair order)
    for r_i, r in enumerate(raters):
        for _ in range(2):
            a = next_assignment(db, camp, r)
            want = votes[a.pair_id - 1][r_i]
            shown = flip(want, a.swapped)
            submit_label(db, a, r, LabelIn(answer=shown))
    rows = export_rows(db, camp)
    assert len(rows) == 2
    assert rows[0]["chosen"] == "good 0" and rows[0]["prob_chosen"] == pytest.approx(2 / 3)
    assert rows[0]["tie"] is False and sorted(rows[0]["metadata"]["raters"]) == ["r0", "r1", "r2"]
    assert rows[1]["tie"] is True and rows[1]["prob_chosen"] == pytest.approx(2 / 3)
    # the export is a comparisons file palate's reward trainer reads
    from palate.data import read_records, write_jsonl

    path = tmp_path / "export.jsonl"
    write_jsonl(path, rows)
    comps = read_records(path, "comparisons").records
    assert len(comps) == 2 and comps[1].tie and comps[0].prob_chosen == pytest.approx(2 / 3)


def test_sources_soft_labels_and_judge_vs_people_hand_computed(db) -> None:
    """Two people and an AI judge on 3 pairs: the judge's soft label (given in the order it was
    shown) is stored in the pair's orientation, exported per source, and compared with the
    people's majority on the dashboard."""
    from palate.label.stats import campaign_stats

    camp = create_campaign(db, "c", pairs(3), overlap=3)
    people = [create_user(db, f"p{i}")[0] for i in range(2)]
    judge = create_user(db, "ai:judge", kind="ai")[0]
    with pytest.raises(ConfigError, match="user kind"):
        create_user(db, "x", kind="robot")
    human = {0: ["a", "a", "b"], 1: ["a", "b", "b"]}  # rater -> answers for pairs 1..3
    for r_i, r in enumerate(people):
        for _ in range(3):
            a = next_assignment(db, camp, r)
            submit_label(db, a, r, LabelIn(answer=flip(human[r_i][a.pair_id - 1], a.swapped)))
    p_a = {1: 0.9, 2: 0.3, 3: 0.2}  # the judge's P(response_a better), pair orientation
    for _ in range(3):
        a = next_assignment(db, camp, judge)
        want = p_a[a.pair_id]
        shown_prob = 1 - want if a.swapped else want
        answer = flip("a" if want >= 0.5 else "b", a.swapped)
        submit_label(db, a, judge, LabelIn(answer=answer, prob=shown_prob, principle="harm"))
    with pytest.raises(ConfigError, match="prob"):
        from palate.label.store import check_label

        check_label(camp, LabelIn(answer="a", prob=1.5))
    stored = {
        lab.pair_id: lab for lab in db.scalars(select(Label).where(Label.rater_id == judge.id))
    }
    assert {k: round(v.prob, 6) for k, v in stored.items()} == p_a
    assert {v.principle for v in stored.values()} == {"harm"}

    rows = export_rows(db, camp)
    assert [r["source"] for r in rows] == ["human", "ai"] * 3  # one row per pair and source
    ai = [r for r in rows if r["source"] == "ai"]
    # pair 1: a at 0.9; pair 2: b at 0.7; pair 3: b at 0.8 (the soft label, not the vote)
    assert [r["chosen"] for r in ai] == ["good 0", "bad 1", "bad 2"]
    assert [r["prob_chosen"] for r in ai] == pytest.approx([0.9, 0.7, 0.8])
    assert ai[0]["metadata"]["principles"] == ["harm"] and ai[0]["rater_id"] == "ai:judge"
    assert len(export_rows(db, camp, sources=["ai"])) == 3

    st = campaign_stats(db, camp)
    # people: pair 1 a,a agree; pair 2 a,b; pair 3 b,b → 2 of 3
    assert st["sources"]["human"] == {"labels": 6, "pairwise_agreement": pytest.approx(2 / 3)}
    assert st["sources"]["ai"] == {"labels": 3, "pairwise_agreement": None}
    # judge vs people's majority: pair 1 a=a ✓, pair 2 people split (left out), pair 3 b=b ✓
    assert st["ai_vs_human"] == {"pairs": 2, "agreement": 1.0}
    assert {r["rater"]: r["kind"] for r in st["raters"]} == {
        "p0": "human",
        "p1": "human",
        "ai:judge": "ai",
    }

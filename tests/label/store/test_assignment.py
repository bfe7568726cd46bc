"""Assignment and labels (palate/label/store/assignment.py) on a fresh database per test:
overlap, no pair twice for a rater, skips, orientation, refusals."""

from __future__ import annotations

import random

import pytest
from sqlalchemy import func, select

from palate.errors import ConfigError
from palate.label.db import Assignment, Label
from palate.label.store import (
    LabelIn,
    create_campaign,
    create_user,
    next_assignment,
    progress,
    skip_assignment,
    submit_label,
)
from tests.label.helpers import pairs


def test_overlap_and_no_pair_twice_for_a_rater(db) -> None:
    camp = create_campaign(db, "c", pairs(3), overlap=2)
    raters = [create_user(db, f"r{i}")[0] for i in range(3)]
    seen: dict[int, set[int]] = {r.id: set() for r in raters}
    rng = random.Random(0)
    for _round in range(3):
        for r in raters:
            a = next_assignment(db, camp, r, rng)
            if a is None:
                continue
            assert a.pair_id not in seen[r.id]
            seen[r.id].add(a.pair_id)
            submit_label(db, a, r, LabelIn(answer="a"))
    # 3 pairs x overlap 2 = 6 labels, no pair over its overlap, nobody labels a pair twice
    assert db.scalar(select(func.count(Label.id))) == 6
    per_pair = db.execute(select(Label.pair_id, func.count()).group_by(Label.pair_id)).all()
    assert all(n == 2 for _, n in per_pair)
    assert all(next_assignment(db, camp, r) is None for r in raters)
    assert progress(db, camp) == {"pairs": 3, "labels": 6, "target": 6}


def test_open_assignment_is_returned_again_and_skip_frees_the_slot(db) -> None:
    camp = create_campaign(db, "c", pairs(1), overlap=1)
    r1, r2 = create_user(db, "r1")[0], create_user(db, "r2")[0]
    a = next_assignment(db, camp, r1)
    assert next_assignment(db, camp, r1).id == a.id  # same open assignment until answered
    assert next_assignment(db, camp, r2) is None  # the only slot is taken
    skip_assignment(db, a, r1)
    b = next_assignment(db, camp, r2)
    assert b is not None and b.pair_id == a.pair_id
    assert next_assignment(db, camp, r1) is None  # never shown a skipped pair again


def test_labels_are_stored_in_pair_orientation(db) -> None:
    camp = create_campaign(db, "c", pairs(40), overlap=1)
    r = create_user(db, "r")[0]
    swapped = 0
    while a := next_assignment(db, camp, r, random.Random(len(db.scalars(select(Label)).all()))):
        swapped += a.swapped
        # the rater always prefers what was shown on the left
        submit_label(db, a, r, LabelIn(answer="a", strength="clearly"))
    assert 0 < swapped < 40
    for lab in db.scalars(select(Label)):
        a = db.get(Assignment, lab.assignment_id)
        assert lab.answer == ("b" if a.swapped else "a")


def test_other_raters_assignment_is_refused(db) -> None:
    camp = create_campaign(db, "c", pairs(1))
    r1, r2 = create_user(db, "r1")[0], create_user(db, "r2")[0]
    a = next_assignment(db, camp, r1)
    with pytest.raises(PermissionError):
        submit_label(db, a, r2, LabelIn(answer="a"))
    with pytest.raises(ConfigError, match="answer"):
        submit_label(db, a, r1, LabelIn(answer="left"))

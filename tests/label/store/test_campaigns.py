"""Campaigns (palate/label/store/campaigns.py) on a fresh database per test: validation, rater
lists, status, deletion."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from palate.errors import ConfigError, DataError
from palate.label.db import Assignment, Campaign, CampaignRater, Label, Pair
from palate.label.store import (
    LabelIn,
    campaign_raters,
    create_campaign,
    create_user,
    delete_campaign,
    may_rate,
    next_assignment,
    set_raters,
    set_status,
    submit_label,
)
from tests.label.helpers import pairs


def test_bad_campaigns_are_refused_and_write_nothing(db) -> None:
    with pytest.raises(ConfigError, match="overlap"):
        create_campaign(db, "c", pairs(1), overlap=0)
    with pytest.raises(ConfigError, match="answers"):
        create_campaign(db, "c", pairs(1), answers=["a", "tie"])
    with pytest.raises(DataError, match="no pairs"):
        create_campaign(db, "c", [])
    gold = pairs(2)
    gold[1].gold = "maybe"
    with pytest.raises(DataError, match="pair 1: gold"):
        create_campaign(db, "c", gold)
    assert db.scalar(select(func.count(Campaign.id))) == 0
    assert db.scalar(select(func.count(Pair.id))) == 0
    create_campaign(db, "c", pairs(1))
    with pytest.raises(ConfigError, match="already exists"):
        create_campaign(db, " c ", pairs(1))


def test_rater_list_status_and_deletion(db) -> None:
    camp = create_campaign(db, "c", pairs(2))
    admin = create_user(db, "boss", role="admin")[0]
    r1, r2 = create_user(db, "r1")[0], create_user(db, "r2")[0]
    assert all(may_rate(db, camp, u) for u in (admin, r1, r2))  # no list: everyone
    set_raters(db, camp, [r1.id])
    assert campaign_raters(db, camp) == [r1.id]
    assert may_rate(db, camp, r1) and may_rate(db, camp, admin) and not may_rate(db, camp, r2)
    with pytest.raises(PermissionError):
        next_assignment(db, camp, r2)
    with pytest.raises(ConfigError, match="no users"):
        set_raters(db, camp, [10_000])
    set_status(db, camp, "paused")
    assert next_assignment(db, camp, r1) is None
    with pytest.raises(ConfigError, match="status"):
        set_status(db, camp, "finished")
    set_status(db, camp, "active")
    a = next_assignment(db, camp, r1)
    assert a is not None
    submit_label(db, a, r1, LabelIn(answer="a"))
    delete_campaign(db, camp)
    for model in (Campaign, Pair, Assignment, Label, CampaignRater):
        assert db.scalar(select(func.count()).select_from(model)) == 0

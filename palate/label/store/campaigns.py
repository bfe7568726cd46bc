"""Campaigns: a set of pairs to label, how many raters label each (overlap), the allowed
answers and guidelines, its status, and who may rate it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from palate.errors import ConfigError, DataError
from palate.label.db import ANSWERS, Assignment, Campaign, CampaignRater, Label, Pair, User
from palate.label.store.common import clean_name

MAX_OVERLAP = 100
CAMPAIGN_STATUSES = ("active", "paused", "closed")


@dataclass
class PairIn:
    prompt: Any
    response_a: str
    response_b: str
    source_a: str = ""
    source_b: str = ""
    gold: str | None = None
    meta: dict[str, Any] | None = None


def create_campaign(
    db: Session,
    name: str,
    pairs: Sequence[PairIn],
    *,
    overlap: int = 1,
    guidelines: str = "",
    answers: Sequence[str] = ANSWERS,
    source: str = "",
    assignment_timeout_s: int = 1800,
) -> Campaign:
    """A new campaign over ``pairs`` (validated: name, overlap, answers, at least one pair),
    written in one transaction: nothing half-written on bad input."""
    name = clean_name(name, "campaign name", 200)
    if not 1 <= overlap <= MAX_OVERLAP:
        raise ConfigError(f"overlap {overlap}: expected 1 to {MAX_OVERLAP} raters per pair")
    if assignment_timeout_s < 10:
        raise ConfigError("assignment timeout: at least 10 seconds")
    bad = [a for a in answers if a not in ANSWERS]
    if bad or "a" not in answers or "b" not in answers:
        raise ConfigError(f"answers {list(answers)}: choose from {list(ANSWERS)}, with a and b")
    if not pairs:
        raise DataError(f"campaign {name!r}: no pairs to label")
    if db.scalar(select(Campaign).where(Campaign.name == name)) is not None:
        raise ConfigError(f"campaign {name!r} already exists")
    for i, p in enumerate(pairs):
        if p.gold is not None and p.gold not in answers:
            raise DataError(f"pair {i}: gold {p.gold!r} is not an allowed answer")
    camp = Campaign(
        name=name,
        guidelines=guidelines,
        overlap=overlap,
        answers=list(answers),
        source=source,
        status="active",
        assignment_timeout_s=assignment_timeout_s,
    )
    db.add(camp)
    db.flush()
    db.add_all(
        Pair(
            campaign_id=camp.id,
            prompt=p.prompt,
            response_a=p.response_a,
            response_b=p.response_b,
            source_a=p.source_a,
            source_b=p.source_b,
            gold=p.gold,
            meta=p.meta or {},
            n_assigned=0,
        )
        for p in pairs
    )
    db.commit()
    return camp


def set_status(db: Session, campaign: Campaign, status: str) -> None:
    """active (raters get pairs), paused (no new pairs; open ones can still be labelled) or
    closed (no new pairs, no labels)."""
    if status not in CAMPAIGN_STATUSES:
        raise ConfigError(f"status {status!r}: expected one of {list(CAMPAIGN_STATUSES)}")
    campaign.status = status
    db.commit()


def set_guidelines(db: Session, campaign: Campaign, guidelines: str) -> None:
    campaign.guidelines = guidelines
    db.commit()


def delete_campaign(db: Session, campaign: Campaign) -> None:
    """The campaign with its pairs, assignments, labels and rater list, in one transaction."""
    cid = campaign.id
    pair_ids = select(Pair.id).where(Pair.campaign_id == cid)
    db.execute(delete(Label).where(Label.pair_id.in_(pair_ids)))
    db.execute(delete(Assignment).where(Assignment.campaign_id == cid))
    db.execute(delete(Pair).where(Pair.campaign_id == cid))
    db.execute(delete(CampaignRater).where(CampaignRater.campaign_id == cid))
    db.execute(delete(Campaign).where(Campaign.id == cid))
    db.commit()


def set_raters(db: Session, campaign: Campaign, user_ids: Iterable[int]) -> None:
    """Who may rate the campaign: these raters only, or (empty) every rater."""
    ids = sorted(set(user_ids))
    known = set(db.scalars(select(User.id).where(User.id.in_(ids))))
    if set(ids) - known:
        raise ConfigError(f"no users with ids {sorted(set(ids) - known)}")
    db.execute(delete(CampaignRater).where(CampaignRater.campaign_id == campaign.id))
    db.add_all(CampaignRater(campaign_id=campaign.id, user_id=u) for u in ids)
    db.commit()


def campaign_raters(db: Session, campaign: Campaign) -> list[int]:
    return list(
        db.scalars(select(CampaignRater.user_id).where(CampaignRater.campaign_id == campaign.id))
    )


def may_rate(db: Session, campaign: Campaign, user: User) -> bool:
    """Admins always; raters when the campaign has no rater list or they are on it."""
    allowed = campaign_raters(db, campaign)
    return user.role == "admin" or not allowed or user.id in allowed

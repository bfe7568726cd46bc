"""Assignment and labels: which pair a rater gets next, storing their label, skipping, and how
far a campaign (or a rater) has got.

Every state change is a conditional update whose row count is checked, so no interleaving of
requests — on SQLite or PostgreSQL, without table locks — can double-count:

* claim a slot: ``UPDATE pairs SET n_assigned = n_assigned + 1 WHERE id = ? AND n_assigned <
  overlap`` (and the unique (pair, rater) constraint stops a rater getting a pair twice);
* label: ``UPDATE assignments SET status = 'done' WHERE id = ? AND status = 'open'``, then the
  label row (unique per assignment) in the same transaction;
* skip / expire / release: ``UPDATE assignments SET status = ... WHERE id = ? AND status =
  'open'``, and only if that changed a row, give the pair's slot back.

So ``n_assigned`` always equals the pair's open + done assignments, and a pair never gets more
than ``overlap`` labels, whatever mix of next / label / skip / retries arrives at once.
"""

from __future__ import annotations

import datetime as dt
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from palate.errors import ConfigError, ConflictError
from palate.label.db import FLAGS, STRENGTHS, Assignment, Campaign, Label, Pair, User, utcnow
from palate.label.store.campaigns import may_rate
from palate.label.store.common import clean_name, rowcount, synced_update

MAX_SECONDS = 86_400.0  # a label's timing field: at most a day


def release_assignments(
    db: Session, campaign: Campaign, older_than: dt.timedelta | None = None
) -> int:
    """Release open assignments older than ``older_than`` (default: the campaign's timeout;
    zero: all of them): each becomes ``expired`` and its slot goes back to the pair. Safe to
    run concurrently with anything: a slot is returned only by the request that changed the
    assignment's status."""
    if older_than is None:
        older_than = dt.timedelta(seconds=campaign.assignment_timeout_s)
    cutoff = utcnow() - older_than
    stale = db.execute(
        select(Assignment.id, Assignment.pair_id).where(
            Assignment.campaign_id == campaign.id,
            Assignment.status == "open",
            Assignment.created_at <= cutoff,
        )
    ).all()
    released = 0
    for aid, pair_id in stale:
        if rowcount(
            db.execute(
                synced_update(Assignment)
                .where(Assignment.id == aid, Assignment.status == "open")
                .values(status="expired")
            )
        ):
            db.execute(
                synced_update(Pair).where(Pair.id == pair_id).values(n_assigned=Pair.n_assigned - 1)
            )
            released += 1
    db.commit()
    return released


def next_assignment(
    db: Session, campaign: Campaign, rater: User, rng: random.Random | None = None
) -> Assignment | None:
    """The rater's open assignment, or a new one on a pair they have not seen whose overlap is
    not yet full; None when there is nothing left for them or the campaign is not active.
    Stale assignments (older than the campaign's timeout) are released first."""
    if not may_rate(db, campaign, rater):
        raise PermissionError(f"{rater.name} is not a rater of campaign {campaign.name!r}")
    if campaign.status != "active":
        return None
    release_assignments(db, campaign)
    current = db.scalar(
        select(Assignment).where(
            Assignment.campaign_id == campaign.id,
            Assignment.rater_id == rater.id,
            Assignment.status == "open",
        )
    )
    if current is not None:
        return current
    rng = rng or random.Random()
    seen = select(Assignment.pair_id).where(Assignment.rater_id == rater.id)
    for _attempt in range(50):
        candidates = db.scalars(
            select(Pair.id)
            .where(
                Pair.campaign_id == campaign.id,
                Pair.n_assigned < campaign.overlap,
                Pair.id.not_in(seen),
            )
            .order_by(Pair.n_assigned.desc(), Pair.id)  # finish pairs before starting new ones
            .limit(8)
        ).all()
        if not candidates:
            return None
        for pair_id in candidates:
            claimed = rowcount(
                db.execute(
                    synced_update(Pair)
                    .where(Pair.id == pair_id, Pair.n_assigned < campaign.overlap)
                    .values(n_assigned=Pair.n_assigned + 1)
                )
            )
            if not claimed:
                db.rollback()
                continue
            a = Assignment(
                pair_id=pair_id,
                rater_id=rater.id,
                campaign_id=campaign.id,
                swapped=rng.random() < 0.5,
                status="open",
            )
            db.add(a)
            try:
                db.commit()
            except IntegrityError:  # the same rater raced themselves to this pair
                db.rollback()
                continue
            return a
    return None


def flip(answer: str, swapped: bool) -> str:
    """Map an answer between the pair's orientation and the order shown (its own inverse)."""
    return {"a": "b", "b": "a"}.get(answer, answer) if swapped else answer


def shown_responses(pair: Pair, assignment: Assignment) -> tuple[str, str]:
    """(first, second) response in the order this assignment shows them."""
    if assignment.swapped:
        return pair.response_b, pair.response_a
    return pair.response_a, pair.response_b


@dataclass
class LabelIn:
    answer: str  # in the order the rater SAW: "left"/"right" map via swapped; or a/b shown
    strength: str | None = None
    flags: Sequence[str] = ()
    comment: str = ""
    seconds: float | None = None
    prob: float | None = None  # an AI judge's P(the first response shown is better)
    principle: str | None = None  # the constitution principle it judged under


def check_label(campaign: Campaign, shown: LabelIn) -> None:
    """Refuse (ConfigError) an answer, strength, flag or timing the campaign does not allow."""
    if shown.answer not in campaign.answers:
        raise ConfigError(f"answer {shown.answer!r}: expected one of {campaign.answers}")
    if shown.strength is not None and shown.strength not in STRENGTHS:
        raise ConfigError(f"strength {shown.strength!r}: expected one of {list(STRENGTHS)}")
    bad = [f for f in shown.flags if f not in FLAGS]
    if bad:
        raise ConfigError(f"flags {bad}: expected from {list(FLAGS)}")
    if shown.seconds is not None and not (
        math.isfinite(shown.seconds) and 0 <= shown.seconds <= MAX_SECONDS
    ):
        raise ConfigError(f"seconds {shown.seconds}: expected 0 to {MAX_SECONDS:.0f}")
    if shown.prob is not None and not (math.isfinite(shown.prob) and 0 <= shown.prob <= 1):
        raise ConfigError(f"prob {shown.prob}: expected a probability in [0, 1]")
    if shown.principle is not None:
        clean_name(shown.principle, "principle", 64)


def submit_label(db: Session, assignment: Assignment, rater: User, shown: LabelIn) -> Label:
    """Store a label given in the *shown* orientation (``a`` = the left response).

    Only the request that moves the assignment from open to done stores a label; any other
    (a retry, a label racing a skip, an expired assignment) gets a ConflictError (HTTP 409).
    """
    if assignment.rater_id != rater.id:
        raise PermissionError("not your assignment")
    campaign = db.get(Campaign, assignment.campaign_id)
    assert campaign is not None
    check_label(campaign, shown)
    if campaign.status == "closed":
        raise ConflictError(f"campaign {campaign.name!r} is closed")
    answer = flip(shown.answer, assignment.swapped)
    done = rowcount(
        db.execute(
            synced_update(Assignment)
            .where(Assignment.id == assignment.id, Assignment.status == "open")
            .values(status="done")
        )
    )
    if not done:
        db.rollback()
        raise ConflictError(f"assignment {assignment.id} is {_status(db, assignment.id)}")
    label = Label(
        assignment_id=assignment.id,
        pair_id=assignment.pair_id,
        rater_id=rater.id,
        answer=answer,
        strength=shown.strength if answer in ("a", "b") else None,
        flags=list(shown.flags),
        comment=shown.comment[:5000],
        seconds=shown.seconds,
        prob=None if shown.prob is None else (1 - shown.prob if assignment.swapped else shown.prob),
        principle=shown.principle,
    )
    db.add(label)
    try:
        db.commit()
    except IntegrityError as err:  # cannot happen after the conditional update; kept safe
        db.rollback()
        raise ConflictError(f"assignment {assignment.id} is already labelled") from err
    return label


def _status(db: Session, assignment_id: int) -> str:
    return db.scalar(select(Assignment.status).where(Assignment.id == assignment_id)) or "gone"


def skip_assignment(db: Session, assignment: Assignment, rater: User) -> None:
    """Give the slot back; the rater will not be shown this pair again. Skipping twice is a
    no-op; skipping a labelled or expired assignment is a ConflictError."""
    if assignment.rater_id != rater.id:
        raise PermissionError("not your assignment")
    skipped = rowcount(
        db.execute(
            synced_update(Assignment)
            .where(Assignment.id == assignment.id, Assignment.status == "open")
            .values(status="skipped")
        )
    )
    if skipped:
        db.execute(
            synced_update(Pair)
            .where(Pair.id == assignment.pair_id)
            .values(n_assigned=Pair.n_assigned - 1)
        )
    db.commit()
    if not skipped:
        status = _status(db, assignment.id)
        if status != "skipped":
            raise ConflictError(f"assignment {assignment.id} is {status}")


# --------------------------------------------------------------------------- progress


def remaining_for(db: Session, campaign: Campaign, rater: User) -> int:
    """Pairs this rater could still be given (not seen, not full), plus an open one."""
    seen = select(Assignment.pair_id).where(Assignment.rater_id == rater.id)
    free = db.scalar(
        select(func.count()).where(
            Pair.campaign_id == campaign.id,
            Pair.n_assigned < campaign.overlap,
            Pair.id.not_in(seen),
        )
    )
    open_now = db.scalar(
        select(func.count()).where(
            Assignment.campaign_id == campaign.id,
            Assignment.rater_id == rater.id,
            Assignment.status == "open",
        )
    )
    return int(free or 0) + int(open_now or 0)


def progress(db: Session, campaign: Campaign, rater: User | None = None) -> dict[str, int]:
    total = db.scalar(select(func.count()).where(Pair.campaign_id == campaign.id)) or 0
    query = (
        select(func.count(Label.id))
        .join(Pair, Pair.id == Label.pair_id)
        .where(Pair.campaign_id == campaign.id)
    )
    if rater is not None:
        query = query.where(Label.rater_id == rater.id)
    done = db.scalar(query) or 0
    return {"pairs": total, "labels": done, "target": total * campaign.overlap}

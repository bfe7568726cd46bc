"""What the web pages and the JSON API both call: raters, campaigns, assignment, labels, export.

Assignment is safe under concurrency on SQLite and PostgreSQL alike without table locks: a rater
claims a slot on a pair with one conditional ``UPDATE pairs SET n_assigned = n_assigned + 1
WHERE id = ? AND n_assigned < overlap`` (atomic per row), and the unique (pair, rater)
constraint stops a rater getting the same pair twice. A skipped assignment gives its slot back.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import secrets
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from palate.errors import ConfigError, DataError
from palate.label.db import ANSWERS, FLAGS, STRENGTHS, Assignment, Campaign, Label, Pair, User

# --------------------------------------------------------------------------- users


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1)
    return f"scrypt${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str | None) -> bool:
    if not stored or not stored.startswith("scrypt$"):
        return False
    _, salt, digest = stored.split("$")
    return hmac.compare_digest(hash_password(password, bytes.fromhex(salt)), stored)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_user(
    db: Session, name: str, role: str = "rater", password: str | None = None
) -> tuple[User, str, str]:
    """A new user; returns (user, invite token, API token). Tokens are shown once."""
    if role not in ("admin", "rater"):
        raise ConfigError(f"role {role!r}: expected admin or rater")
    if db.scalar(select(User).where(User.name == name)) is not None:
        raise ConfigError(f"user {name!r} already exists")
    invite, api = secrets.token_urlsafe(24), secrets.token_urlsafe(32)
    user = User(
        name=name,
        role=role,
        password_hash=hash_password(password) if password else None,
        invite_token=invite,
        api_token_hash=hash_token(api),
    )
    db.add(user)
    db.commit()
    return user, invite, api


def user_by_token(db: Session, token: str) -> User | None:
    return db.scalar(select(User).where(User.api_token_hash == hash_token(token)))


# --------------------------------------------------------------------------- campaigns


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
) -> Campaign:
    if overlap < 1:
        raise ConfigError("overlap must be at least 1")
    bad = [a for a in answers if a not in ANSWERS]
    if bad or "a" not in answers or "b" not in answers:
        raise ConfigError(f"answers {list(answers)}: choose from {list(ANSWERS)}, with a and b")
    if db.scalar(select(Campaign).where(Campaign.name == name)) is not None:
        raise ConfigError(f"campaign {name!r} already exists")
    for i, p in enumerate(pairs):
        if p.gold is not None and p.gold not in answers:
            raise DataError(f"pair {i}: gold {p.gold!r} is not an allowed answer")
    camp = Campaign(
        name=name, guidelines=guidelines, overlap=overlap, answers=list(answers), source=source
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


# --------------------------------------------------------------------------- assignment


def next_assignment(
    db: Session, campaign: Campaign, rater: User, rng: random.Random | None = None
) -> Assignment | None:
    """The rater's open assignment, or a new one on a pair they have not seen whose overlap is
    not yet full; None when there is nothing left for them."""
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
            # An UPDATE returns a CursorResult (Session.execute is typed as the base Result).
            claimed = cast(
                "CursorResult[Any]",
                db.execute(
                    update(Pair)
                    .where(Pair.id == pair_id, Pair.n_assigned < campaign.overlap)
                    .values(n_assigned=Pair.n_assigned + 1)
                ),
            ).rowcount
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


def submit_label(db: Session, assignment: Assignment, rater: User, shown: LabelIn) -> Label:
    """Store a label given in the *shown* orientation (``a`` = the left response)."""
    if assignment.rater_id != rater.id:
        raise PermissionError("not your assignment")
    if assignment.status != "open":
        raise ConfigError(f"assignment {assignment.id} is {assignment.status}")
    campaign = db.get(Campaign, assignment.campaign_id)
    assert campaign is not None
    if shown.answer not in campaign.answers:
        raise ConfigError(f"answer {shown.answer!r}: expected one of {campaign.answers}")
    if shown.strength is not None and shown.strength not in STRENGTHS:
        raise ConfigError(f"strength {shown.strength!r}: expected one of {list(STRENGTHS)}")
    bad = [f for f in shown.flags if f not in FLAGS]
    if bad:
        raise ConfigError(f"flags {bad}: expected from {list(FLAGS)}")
    answer = flip(shown.answer, assignment.swapped)
    label = Label(
        assignment_id=assignment.id,
        pair_id=assignment.pair_id,
        rater_id=rater.id,
        answer=answer,
        strength=shown.strength if answer in ("a", "b") else None,
        flags=list(shown.flags),
        comment=shown.comment[:5000],
        seconds=shown.seconds,
    )
    assignment.status = "done"
    db.add(label)
    db.commit()
    return label


def skip_assignment(db: Session, assignment: Assignment, rater: User) -> None:
    """Give the slot back; the rater will not be shown this pair again."""
    if assignment.rater_id != rater.id:
        raise PermissionError("not your assignment")
    if assignment.status != "open":
        return
    assignment.status = "skipped"
    db.execute(
        update(Pair).where(Pair.id == assignment.pair_id).values(n_assigned=Pair.n_assigned - 1)
    )
    db.commit()


# --------------------------------------------------------------------------- progress and export


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


def aggregate(answers: Iterable[str]) -> dict[str, Any]:
    """Votes on one pair → the comparison palate's reward model trains on."""
    votes = Counter(answers)
    a, b, tie, bad = (votes.get(k, 0) for k in ANSWERS)
    decided = a + b + tie
    if decided == 0:
        return {"skip": True, "votes": dict(votes)}
    prob_a = (a + 0.5 * tie) / decided
    return {
        "skip": False,
        "votes": dict(votes),
        "prob_a": prob_a,
        "tie": tie > max(a, b) or (a == b and a > 0 and prob_a == 0.5),
    }


def export_rows(db: Session, campaign: Campaign) -> list[dict[str, Any]]:
    """One comparison row per labelled pair (not all both-bad): chosen/rejected by majority,
    ``prob_chosen`` = the vote fraction (ties count half), ``tie`` when ties win, raters."""
    rows = []
    labels: dict[int, list[Label]] = {}
    for lab in db.scalars(
        select(Label)
        .join(Pair, Pair.id == Label.pair_id)
        .where(Pair.campaign_id == campaign.id)
        .order_by(Label.id)
    ):
        labels.setdefault(lab.pair_id, []).append(lab)
    names = {u.id: u.name for u in db.scalars(select(User))}
    for pair in db.scalars(select(Pair).where(Pair.campaign_id == campaign.id).order_by(Pair.id)):
        labs = labels.get(pair.id, [])
        agg = aggregate(lab.answer for lab in labs)
        if not labs or agg["skip"]:
            continue
        a_wins = agg["prob_a"] >= 0.5
        chosen, rejected = (
            (pair.response_a, pair.response_b) if a_wins else (pair.response_b, pair.response_a)
        )
        prob = agg["prob_a"] if a_wins else 1 - agg["prob_a"]
        rows.append(
            {
                "prompt": pair.prompt,
                "chosen": chosen,
                "rejected": rejected,
                "prob_chosen": prob,
                "tie": bool(agg["tie"]),
                "rater_id": ",".join(names.get(lab.rater_id, str(lab.rater_id)) for lab in labs),
                "source": "human",
                "metadata": {
                    "campaign": campaign.name,
                    "pair_id": pair.id,
                    "votes": agg["votes"],
                    "raters": [names.get(lab.rater_id, str(lab.rater_id)) for lab in labs],
                    "flags": sorted({f for lab in labs for f in lab.flags}),
                    "models": {
                        "chosen": pair.source_a if a_wins else pair.source_b,
                        "rejected": pair.source_b if a_wins else pair.source_a,
                    },
                },
            }
        )
    return rows

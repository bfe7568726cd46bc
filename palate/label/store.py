"""What the web pages and the JSON API both call: raters, sessions, campaigns, assignment,
labels, export.

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

Secrets at rest are hashes: API tokens and invite tokens (sha256 of 192-256 random bits),
passwords (scrypt), browser sessions (sha256 of the cookie's random token).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import math
import random
import re
import secrets
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from palate.errors import ConfigError, ConflictError, DataError
from palate.label.db import (
    ANSWERS,
    FLAGS,
    SOURCES,
    STRENGTHS,
    Assignment,
    Campaign,
    CampaignRater,
    Label,
    Pair,
    User,
    WebSession,
    utcnow,
)

INVITE_TTL = dt.timedelta(days=7)  # how long an invite link works (re-issue for a new one)
SESSION_TTL = dt.timedelta(days=14)  # a browser session's lifetime
MAX_OVERLAP = 100
MAX_SECONDS = 86_400.0  # a label's timing field: at most a day
CAMPAIGN_STATUSES = ("active", "paused", "closed")


def _rowcount(result: Any) -> int:
    """Rows an UPDATE/DELETE changed (Session.execute is typed as the base Result)."""
    return cast("CursorResult[Any]", result).rowcount


def _update(model: Any) -> Any:
    """An ORM UPDATE that syncs only the rows it matched into the session ("fetch", via
    RETURNING). The default ("evaluate") tests every object of the model the session holds,
    which made a long-lived session (a simulated panel labelling thousands of pairs in one)
    quadratic: 85 s for the quickstart's 5,376 labels."""
    return update(model).execution_options(synchronize_session="fetch")


def clean_name(name: str, what: str, max_len: int) -> str:
    """A user or campaign name: stripped, non-empty, at most ``max_len`` characters, no
    control characters (line breaks included)."""
    name = (name or "").strip()
    if not name:
        raise ConfigError(f"{what}: must not be empty")
    if len(name) > max_len:
        raise ConfigError(f"{what}: at most {max_len} characters (got {len(name)})")
    if any(unicodedata.category(ch).startswith("C") for ch in name):
        raise ConfigError(f"{what}: no control characters or line breaks")
    return name


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
    db: Session,
    name: str,
    role: str = "rater",
    password: str | None = None,
    *,
    invite_ttl: dt.timedelta = INVITE_TTL,
    kind: str = "human",
    attributes: dict[str, str] | None = None,
) -> tuple[User, str, str]:
    """A new user; returns (user, invite token, API token). Only hashes are stored: the tokens
    are shown once (re-issue them with :func:`issue_invite` / :func:`rotate_api_token`).
    ``kind`` is who labels: ``human``, ``ai`` (a judge) or ``simulated`` (the panel);
    ``attributes`` what the admin records about them (:func:`clean_attributes`)."""
    if role not in ("admin", "rater"):
        raise ConfigError(f"role {role!r}: expected admin or rater")
    if kind not in SOURCES:
        raise ConfigError(f"user kind {kind!r}: expected one of {list(SOURCES)}")
    name = clean_name(name, "user name", 120)
    if db.scalar(select(User).where(User.name == name)) is not None:
        raise ConfigError(f"user {name!r} already exists")
    api = secrets.token_urlsafe(32)
    user = User(
        name=name,
        role=role,
        password_hash=hash_password(password) if password else None,
        api_token_hash=hash_token(api),
        active=True,
        kind=kind,
        attributes=clean_attributes(attributes or {}),
    )
    db.add(user)
    db.flush()
    invite = issue_invite(db, user, invite_ttl)
    return user, invite, api


def issue_invite(db: Session, user: User, ttl: dt.timedelta = INVITE_TTL) -> str:
    """A new invite link token for ``user`` (the old one stops working), valid for ``ttl``."""
    token = secrets.token_urlsafe(24)
    user.invite_hash, user.invite_expires_at = hash_token(token), utcnow() + ttl
    db.commit()
    return token


def revoke_invite(db: Session, user: User) -> None:
    """The user's invite link stops working (sessions it opened stay; see end_sessions). Its
    hash is kept without an expiry, so the link says it was revoked (HTTP 403)."""
    if user.invite_hash is not None:
        user.invite_expires_at = None
        db.commit()


ATTRIBUTE_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,39}")
MAX_ATTRIBUTES = 20


def clean_attributes(attributes: dict[str, Any]) -> dict[str, str]:
    """Rater attributes: at most 20, keys like ``region`` or ``native_language`` (a letter, then
    letters, digits, ``_.-``; ≤ 40 characters), values non-empty text (≤ 100 characters)."""
    if not isinstance(attributes, dict):
        raise ConfigError("attributes: expected a mapping of name to value")
    if len(attributes) > MAX_ATTRIBUTES:
        raise ConfigError(f"attributes: at most {MAX_ATTRIBUTES} (got {len(attributes)})")
    out = {}
    for key, value in attributes.items():
        if not isinstance(key, str) or not ATTRIBUTE_KEY.fullmatch(key):
            raise ConfigError(
                f"attribute name {key!r}: a letter, then letters, digits, '_', '.' or '-' "
                "(at most 40 characters)"
            )
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"attribute {key}: expected text, got {type(value).__name__}")
        out[key] = clean_name(str(value), f"attribute {key}", 100)
    return out


def parse_attributes(text: str) -> dict[str, str]:
    """``"region=EU, language=de"`` → ``{"region": "EU", "language": "de"}`` (the dashboard's
    form); an empty text clears them."""
    out: dict[str, Any] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, eq, value = part.partition("=")
        if not eq:
            raise ConfigError(f"attributes: {part.strip()!r} is not name=value")
        if key.strip() in out:
            raise ConfigError(f"attributes: {key.strip()!r} given twice")
        out[key.strip()] = value.strip()
    return clean_attributes(out)


def set_attributes(db: Session, user: User, attributes: dict[str, Any]) -> None:
    """Replace the user's attributes (validated by :func:`clean_attributes`)."""
    user.attributes = clean_attributes(attributes)
    db.commit()


def rotate_api_token(db: Session, user: User) -> str:
    """A new API token for ``user``; the old one stops working at once."""
    token = secrets.token_urlsafe(32)
    user.api_token_hash = hash_token(token)
    db.commit()
    return token


def set_active(db: Session, user: User, active: bool) -> None:
    """Deactivate (every session ends; invite, password and API token refused) or reactivate."""
    user.active = active
    if active:
        db.commit()
    else:
        end_sessions(db, user)  # commits the flag with it


ACCESS_ACTIONS = ("invite", "revoke-invite", "api-token", "deactivate", "activate", "sign-out")


def change_access(
    db: Session, user: User, action: str, invite_ttl: dt.timedelta = INVITE_TTL
) -> dict[str, Any]:
    """One change to a user's access (the dashboard's buttons, ``palate label access``):
    ``invite`` (a new link; returns ``invite``), ``revoke-invite``, ``api-token`` (returns
    ``api_token``), ``deactivate``, ``activate``, ``sign-out`` (returns ``sessions_ended``)."""
    if action == "invite":
        return {"invite": issue_invite(db, user, invite_ttl)}
    if action == "revoke-invite":
        revoke_invite(db, user)
    elif action == "api-token":
        return {"api_token": rotate_api_token(db, user)}
    elif action in ("deactivate", "activate"):
        set_active(db, user, action == "activate")
    elif action == "sign-out":
        return {"sessions_ended": end_sessions(db, user)}
    else:
        raise ConfigError(f"action {action!r}: expected one of {list(ACCESS_ACTIONS)}")
    return {}


def user_by_name(db: Session, name: str) -> User | None:
    return db.scalar(select(User).where(User.name == name))


def user_by_token(db: Session, token: str) -> User | None:
    """The active user whose API token this is."""
    user = db.scalar(select(User).where(User.api_token_hash == hash_token(token)))
    return user if user is not None and user.active else None


def invite_status(db: Session, token: str) -> tuple[User | None, str]:
    """(user, "ok") for a working invite link, else (None, why: unknown, expired, revoked,
    inactive or password)."""
    user = db.scalar(select(User).where(User.invite_hash == hash_token(token)))
    if user is None:
        return None, "unknown"
    if not user.active:
        return None, "inactive"
    if user.invite_expires_at is None:
        return None, "revoked"
    if user.invite_expires_at <= utcnow():
        return None, "expired"
    if user.password_hash is not None and user.role == "admin":
        return None, "password"  # an admin with a password signs in with it
    return user, "ok"


_DUMMY_HASH = hash_password("palate: no such user")


def authenticate(db: Session, name: str, password: str) -> User | None:
    """The active user with this name and password. An unknown name costs the same scrypt
    work as a known one (user names are not revealed by the response time)."""
    user = user_by_name(db, name)
    ok = check_password(password, user.password_hash if user else _DUMMY_HASH)
    if user is None or user.password_hash is None or not user.active:
        return None
    return user if ok else None


# --------------------------------------------------------------------------- browser sessions


def start_session(db: Session, user: User, ttl: dt.timedelta = SESSION_TTL) -> str:
    """A new browser session; returns the token for the cookie (only its hash is stored)."""
    token = secrets.token_urlsafe(32)
    db.add(WebSession(token_hash=hash_token(token), user_id=user.id, expires_at=utcnow() + ttl))
    db.commit()
    return token


def session_of(db: Session, token: str) -> tuple[WebSession, User] | None:
    """The live session for a cookie token and its (active) user; None when ended or expired."""
    ws = db.scalar(select(WebSession).where(WebSession.token_hash == hash_token(token)))
    if ws is None:
        return None
    user = db.get(User, ws.user_id)
    if ws.expires_at <= utcnow() or user is None or not user.active:
        db.delete(ws)
        db.commit()
        return None
    return ws, user


def end_session(db: Session, token: str) -> None:
    """Logout: the session is gone, so a copy of the cookie no longer works."""
    db.execute(delete(WebSession).where(WebSession.token_hash == hash_token(token)))
    db.commit()


def end_sessions(db: Session, user: User) -> int:
    """Sign ``user`` out everywhere."""
    n = _rowcount(db.execute(delete(WebSession).where(WebSession.user_id == user.id)))
    db.commit()
    return n


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


# --------------------------------------------------------------------------- assignment


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
        if _rowcount(
            db.execute(
                _update(Assignment)
                .where(Assignment.id == aid, Assignment.status == "open")
                .values(status="expired")
            )
        ):
            db.execute(
                _update(Pair).where(Pair.id == pair_id).values(n_assigned=Pair.n_assigned - 1)
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
            claimed = _rowcount(
                db.execute(
                    _update(Pair)
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
    done = _rowcount(
        db.execute(
            _update(Assignment)
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
    skipped = _rowcount(
        db.execute(
            _update(Assignment)
            .where(Assignment.id == assignment.id, Assignment.status == "open")
            .values(status="skipped")
        )
    )
    if skipped:
        db.execute(
            _update(Pair)
            .where(Pair.id == assignment.pair_id)
            .values(n_assigned=Pair.n_assigned - 1)
        )
    db.commit()
    if not skipped:
        status = _status(db, assignment.id)
        if status != "skipped":
            raise ConflictError(f"assignment {assignment.id} is {status}")


# --------------------------------------------------------------------------- progress and export


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


def aggregate(answers: Iterable[str], probs: Sequence[float | None] = ()) -> dict[str, Any]:
    """Votes on one pair → the comparison palate's reward model trains on. ``prob_a`` is the
    vote fraction (ties count half) — or, when every vote carries a soft label (an AI judge's
    P(a)), the mean soft label."""
    answers = list(answers)
    votes = Counter(answers)
    a, b, tie, bad = (votes.get(k, 0) for k in ANSWERS)
    decided = a + b + tie
    if decided == 0:
        return {"skip": True, "votes": dict(votes)}
    prob_a = (a + 0.5 * tie) / decided
    soft = [p for p, ans in zip(probs, answers, strict=False) if ans != "both_bad"]
    if probs and len(soft) == decided and all(p is not None for p in soft):
        prob_a = sum(p for p in soft if p is not None) / decided
    return {
        "skip": False,
        "votes": dict(votes),
        "prob_a": prob_a,
        "tie": tie > max(a, b) or (a == b and a > 0 and prob_a == 0.5),
    }


AGGREGATES = ("majority", "reliability")


def export_rows(
    db: Session,
    campaign: Campaign,
    sources: Sequence[str] | None = None,
    *,
    aggregate: str = "majority",
    drop_raters: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """One comparison row per labelled pair and label source (human, ai, simulated; not all
    both-bad): chosen/rejected by majority, ``prob_chosen`` = the vote fraction (ties count
    half; an AI judge's soft label where it gave one), ``tie`` when ties win, raters, and
    ``source``. A pair labelled by people and by a judge gives one row each, so the reward
    stage can weight or drop a source; ``sources`` keeps only those.

    ``aggregate="reliability"``: ``prob_chosen`` is the Dawid-Skene posterior instead, each
    rater's vote weighted by their estimated reliability (:mod:`palate.label.quality`, fitted
    per source). ``drop_raters``: these raters' labels are left out. Each row's
    ``metadata.labels`` lists the votes: rater, their attributes, answer, strength, seconds,
    comment."""
    if aggregate not in AGGREGATES:
        raise ConfigError(f"aggregate {aggregate!r}: expected one of {list(AGGREGATES)}")
    drop = set(drop_raters)
    rows = []
    labels: dict[tuple[int, str], list[Label]] = {}
    users = {u.id: u for u in db.scalars(select(User))}
    for lab in db.scalars(
        select(Label)
        .join(Pair, Pair.id == Label.pair_id)
        .where(Pair.campaign_id == campaign.id)
        .order_by(Label.id)
    ):
        user = users[lab.rater_id]
        if (sources is None or user.kind in sources) and user.name not in drop:
            labels.setdefault((lab.pair_id, user.kind), []).append(lab)
    posterior: dict[str, dict[int, float]] = {}
    if aggregate == "reliability":
        from palate.label.quality import label_rows, weighted_votes

        all_rows = label_rows(db, [campaign.id])
        kind_of = {u.name: u.kind for u in users.values()}
        for kind in SOURCES:
            mine = [r for r in all_rows if kind_of.get(r.rater) == kind]
            if mine and (sources is None or kind in sources):
                posterior[kind] = weighted_votes(mine, drop=drop)
    for pair in db.scalars(select(Pair).where(Pair.campaign_id == campaign.id).order_by(Pair.id)):
        for kind in SOURCES:
            labs = labels.get((pair.id, kind), [])
            if labs:
                prob_a = posterior.get(kind, {}).get(pair.id)
                row = _export_row(pair, labs, kind, campaign.name, users, prob_a)
                if row is not None:
                    rows.append(row)
    return rows


def _export_row(
    pair: Pair,
    labs: list[Label],
    kind: str,
    campaign: str,
    users: dict[int, User],
    prob_a: float | None = None,
) -> dict[str, Any] | None:
    agg = aggregate([lab.answer for lab in labs], [lab.prob for lab in labs])
    if agg["skip"]:
        return None
    if prob_a is not None:  # reliability-weighted (Dawid-Skene posterior)
        agg["prob_a"] = prob_a
    a_wins = agg["prob_a"] >= 0.5
    chosen, rejected = (
        (pair.response_a, pair.response_b) if a_wins else (pair.response_b, pair.response_a)
    )
    prob = agg["prob_a"] if a_wins else 1 - agg["prob_a"]

    def name(uid: int) -> str:
        return users[uid].name if uid in users else str(uid)

    raters = [name(lab.rater_id) for lab in labs]
    votes = []
    for lab in labs:
        vote: dict[str, Any] = {"rater": name(lab.rater_id), "answer": lab.answer}
        attrs = users[lab.rater_id].attributes if lab.rater_id in users else None
        if attrs:
            vote["attributes"] = attrs
        for key in ("strength", "seconds", "comment"):
            if getattr(lab, key):
                vote[key] = getattr(lab, key)
        votes.append(vote)
    meta: dict[str, Any] = {
        "campaign": campaign,
        "pair_id": pair.id,
        "votes": agg["votes"],
        "raters": raters,
        "labels": votes,
        "flags": sorted({f for lab in labs for f in lab.flags}),
        "models": {
            "chosen": pair.source_a if a_wins else pair.source_b,
            "rejected": pair.source_b if a_wins else pair.source_a,
        },
    }
    if prob_a is not None:
        meta["aggregate"] = "reliability"
    principles = sorted({lab.principle for lab in labs if lab.principle})
    if principles:
        meta["principles"] = principles
    for key in ("criterion", "round", "selected_by"):  # from the pair's metadata (palate run)
        if pair.meta.get(key) is not None:
            meta[key] = pair.meta[key]
    return {
        "prompt": pair.prompt,
        "chosen": chosen,
        "rejected": rejected,
        "prob_chosen": prob,
        "tie": bool(agg["tie"]),
        "rater_id": ",".join(raters),
        "source": kind,
        "metadata": meta,
    }

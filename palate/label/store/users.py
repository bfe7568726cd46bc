"""Users: accounts (people, AI judges, the simulated panel), their attributes, and access —
invite links, API tokens, passwords, activation. Tokens are shown once; only their hashes are
stored (:mod:`palate.label.hashing`)."""

from __future__ import annotations

import datetime as dt
import re
import secrets
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from palate.errors import ConfigError
from palate.label.db import SOURCES, User, utcnow
from palate.label.hashing import DUMMY_HASH, check_password, hash_password, hash_token
from palate.label.store.common import clean_name
from palate.label.store.sessions import end_sessions

INVITE_TTL = dt.timedelta(days=7)  # how long an invite link works (re-issue for a new one)


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


def authenticate(db: Session, name: str, password: str) -> User | None:
    """The active user with this name and password. An unknown name costs the same scrypt
    work as a known one (user names are not revealed by the response time)."""
    user = user_by_name(db, name)
    ok = check_password(password, user.password_hash if user else DUMMY_HASH)
    if user is None or user.password_hash is None or not user.active:
        return None
    return user if ok else None

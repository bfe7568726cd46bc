"""Browser sessions: the cookie carries a random token, the database only its hash."""

from __future__ import annotations

import datetime as dt
import secrets

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from palate.label.db import User, WebSession, utcnow
from palate.label.hashing import hash_token
from palate.label.store.common import rowcount

SESSION_TTL = dt.timedelta(days=14)  # a browser session's lifetime


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
    n = rowcount(db.execute(delete(WebSession).where(WebSession.user_id == user.id)))
    db.commit()
    return n

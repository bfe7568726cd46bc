"""The preference store: SQLAlchemy 2 models for campaigns, pairs, raters, assignments, labels.

SQLite (WAL mode, the embedded default) or PostgreSQL, chosen by URL. The schema is created and
upgraded by Alembic migrations (``palate/label/migrations``) — :func:`open_db` runs them.

Orientation: a :class:`Label` stores the answer in the *pair's* orientation (``a`` means
``Pair.response_a`` is better) whatever order the rater saw; :class:`Assignment.swapped` records
the order shown.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

from palate.label.migrate import upgrade

__all__ = [
    "ANSWERS",
    "Answer",
    "Assignment",
    "Base",
    "Campaign",
    "CampaignRater",
    "Label",
    "Pair",
    "User",
    "WebSession",
    "open_db",
    "utcnow",
]

Answer = Literal["a", "b", "tie", "both_bad"]
ANSWERS: tuple[Answer, ...] = ("a", "b", "tie", "both_bad")
SOURCES = ("human", "ai", "simulated")  # User.kind: who gave a label
STRENGTHS = ("slightly", "clearly", "much")
FLAGS = ("harmful", "factually_wrong", "evasive")


def utcnow() -> dt.datetime:
    """Naive UTC now: what every timestamp column stores."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class User(Base):
    """An admin or a rater (people, or programmatic raters using an API token)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(120), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # admin | rater
    password_hash: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # the invite link's token, hashed (sha256); a revoked link keeps its hash with no expiry
    invite_hash: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    invite_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    api_token_hash: Mapped[str | None] = mapped_column(String(128), unique=True, nullable=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)  # False: no sign-in, no API
    # who labels: a person (human), an AI judge (ai: named ai:<model>) or the simulated panel
    kind: Mapped[str] = mapped_column(String(16), default="human")
    # what an admin records about the rater (e.g. region, language, expertise): str → str
    attributes: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class WebSession(Base):
    """A signed-in browser: the cookie holds a random token, the database its hash, so logout,
    deactivation and expiry take effect at once. ``flash`` holds one-time data for the next
    page (a new user's invite link, shown once) — never the cookie."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)
    flash: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class Campaign(Base):
    """A set of pairs to label, with its settings."""

    __tablename__ = "campaigns"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    guidelines: Mapped[str] = mapped_column(Text, default="")
    overlap: Mapped[int] = mapped_column(Integer, default=1)
    answers: Mapped[list[str]] = mapped_column(JSON, default=lambda: list(ANSWERS))
    source: Mapped[str] = mapped_column(String(200), default="")
    status: Mapped[str] = mapped_column(String(16), default="active")  # active|paused|closed
    # an open assignment older than this is released (its slot goes to the next rater)
    assignment_timeout_s: Mapped[int] = mapped_column(Integer, default=1800)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    pairs: Mapped[list[Pair]] = relationship(back_populates="campaign")


class CampaignRater(Base):
    """A rater the admin assigned to a campaign. A campaign with none is open to every rater;
    with some, only to them."""

    __tablename__ = "campaign_raters"

    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)


class Pair(Base):
    """Two responses to one prompt. ``n_assigned`` counts live assignments (≤ overlap)."""

    __tablename__ = "pairs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"), index=True)
    prompt: Mapped[Any] = mapped_column(JSON)  # a string or a list of {role, content}
    response_a: Mapped[str] = mapped_column(Text)
    response_b: Mapped[str] = mapped_column(Text)
    source_a: Mapped[str] = mapped_column(String(200), default="")
    source_b: Mapped[str] = mapped_column(String(200), default="")
    gold: Mapped[str | None] = mapped_column(String(16), nullable=True)  # known answer (honeypot)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    n_assigned: Mapped[int] = mapped_column(Integer, default=0)

    campaign: Mapped[Campaign] = relationship(back_populates="pairs")


class Assignment(Base):
    """One pair shown to one rater (at most once: the unique constraint)."""

    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("pair_id", "rater_id", name="uq_assignment_pair_rater"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id"), index=True)
    rater_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"), index=True)
    swapped: Mapped[bool] = mapped_column(Boolean)  # True: response_b was shown on the left
    # open | done | skipped | expired (released after the campaign's timeout)
    status: Mapped[str] = mapped_column(String(16), default="open", index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    pair: Mapped[Pair] = relationship()
    rater: Mapped[User] = relationship()


class Label(Base):
    """A rater's answer to an assignment, in the pair's orientation."""

    __tablename__ = "labels"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id"), unique=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id"), index=True)
    rater_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    answer: Mapped[str] = mapped_column(String(16))  # a | b | tie | both_bad
    strength: Mapped[str | None] = mapped_column(String(16), nullable=True)
    flags: Mapped[list[str]] = mapped_column(JSON, default=list)
    comment: Mapped[str] = mapped_column(Text, default="")
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    # AI labels: the judge's soft label P(response_a better), and the principle it judged under
    prob: Mapped[float | None] = mapped_column(Float, nullable=True)
    principle: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


def _sqlite_pragmas(engine: Engine) -> None:
    """WAL (readers never block the writer), durable commits, and a generous busy timeout so
    writers queue rather than fail. The sqlite3 driver opens a transaction only at the first
    write statement, so every write transaction starts with a write and waits its turn (a
    transaction that read first and then tried to write could fail at once under WAL)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")  # a label that returned success survives a kill
        cur.execute("PRAGMA busy_timeout=60000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; a bare path means a SQLite file."""
    if "://" not in url:
        url = f"sqlite:///{Path(url).resolve()}"
    for plain in ("postgresql://", "postgres://"):  # the psycopg 3 driver palate installs
        if url.startswith(plain):
            url = "postgresql+psycopg://" + url[len(plain) :]
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 60},
            pool_size=20,
            max_overflow=40,
        )
        _sqlite_pragmas(engine)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def open_db(url: str) -> sessionmaker[Session]:
    """Migrate the database at ``url`` to the newest schema and return a session factory."""

    engine = make_engine(url)
    upgrade(engine)
    return sessionmaker(engine, expire_on_commit=False)

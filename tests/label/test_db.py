"""The database (palate/label/db.py) and its migrations, on SQLite and PostgreSQL: the schema,
upgrades of older databases in place, engine URLs."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from palate.label.db import open_db


def test_migrations_create_the_schema_and_are_idempotent(tmp_path: Path) -> None:
    url = str(tmp_path / "x.db")
    open_db(url)
    open_db(url)  # already at head: no error
    import sqlite3

    con = sqlite3.connect(url)
    tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
    assert {"users", "campaigns", "pairs", "assignments", "labels", "alembic_version"} <= tables
    assert con.execute("pragma journal_mode").fetchone()[0] == "wal"


def test_upgrade_from_0001_hashes_existing_invites(db_url: str) -> None:
    """A database made by the first schema (plain-text invite tokens) upgrades in place: the
    token is hashed, keeps working for a week, and campaigns become active."""
    import sqlalchemy as sa

    from palate.label.db import make_engine
    from palate.label.migrate import upgrade
    from palate.label.store import invite_status

    engine = make_engine(db_url)
    upgrade(engine, "0001")
    with engine.begin() as con:
        con.execute(
            sa.text(
                "INSERT INTO users (name, role, invite_token, created_at) "
                "VALUES ('old', 'rater', 'plain-token', CURRENT_TIMESTAMP)"
            )
        )
        con.execute(
            sa.text(
                "INSERT INTO campaigns (name, guidelines, overlap, answers, source, created_at) "
                "VALUES ('c', '', 1, '[\"a\", \"b\"]', '', CURRENT_TIMESTAMP)"
            )
        )
    factory = open_db(db_url)  # to head
    with factory() as s:
        user, why = invite_status(s, "plain-token")
        assert why == "ok" and user is not None and user.name == "old"
        stored = s.execute(sa.text("SELECT invite_hash FROM users")).scalar()
        assert stored != "plain-token" and len(stored) == 64
        assert s.execute(sa.text("SELECT status FROM campaigns")).scalar() == "active"
    engine.dispose()


def test_upgrade_from_0002_marks_the_simulated_panel(db_url: str) -> None:
    """Users made before kinds existed become human, except the panel's sim-N raters."""
    import sqlalchemy as sa

    from palate.label.db import User, make_engine
    from palate.label.migrate import upgrade

    engine = make_engine(db_url)
    upgrade(engine, "0002")
    with engine.begin() as con:
        for name in ("alice", "sim-0", "sim-12"):
            con.execute(
                sa.text(
                    "INSERT INTO users (name, role, active, created_at) "
                    "VALUES (:n, 'rater', true, CURRENT_TIMESTAMP)"
                ),
                {"n": name},
            )
    factory = open_db(db_url)
    with factory() as s:
        kinds = {u.name: u.kind for u in s.scalars(select(User))}
    assert kinds == {"alice": "human", "sim-0": "simulated", "sim-12": "simulated"}
    engine.dispose()


def test_plain_postgres_urls_use_psycopg3() -> None:
    from palate.label.db import make_engine

    for url in ("postgresql://u@localhost/db", "postgres://u@localhost/db"):
        assert make_engine(url).url.drivername == "postgresql+psycopg"
    assert make_engine("x.db").url.drivername == "sqlite"


def test_migrations_build_exactly_the_models_schema(db_url: str) -> None:
    """Alembic's autogenerate finds nothing to change after every migration ran: a column added
    to a model without its migration (or the reverse) fails here, on SQLite and PostgreSQL."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from palate.label.db import Base, open_db

    with open_db(db_url)() as s:
        diff = compare_metadata(MigrationContext.configure(s.connection()), Base.metadata)
    assert diff == []

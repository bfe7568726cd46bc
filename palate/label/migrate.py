"""Alembic migrations, run from code (no alembic.ini): ``upgrade(engine)`` at server start."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine

if TYPE_CHECKING:  # alembic is imported only when migrating
    from alembic.config import Config as AlembicConfig

HERE = Path(__file__).resolve().parent


def alembic_config(engine: Engine) -> AlembicConfig:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(HERE / "migrations"))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema at ``engine`` to ``revision`` (creating it on an empty database)."""
    from alembic import command

    command.upgrade(alembic_config(engine), revision)

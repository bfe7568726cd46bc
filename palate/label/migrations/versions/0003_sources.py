"""Label sources: a user's kind (human, ai or simulated); an AI label's soft probability and the
constitution principle it was judged under.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="human"))
    # the simulated panel's raters existed before kinds did: they are named sim-0, sim-1, ...
    users = sa.table("users", sa.column("name", sa.String), sa.column("kind", sa.String))
    op.get_bind().execute(
        sa.update(users).where(users.c.name.like("sim-%")).values(kind="simulated")
    )
    with op.batch_alter_table("labels") as batch:
        batch.add_column(sa.Column("prob", sa.Float, nullable=True))
        batch.add_column(sa.Column("principle", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("labels") as batch:
        batch.drop_column("principle")
        batch.drop_column("prob")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("kind")

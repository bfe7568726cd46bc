"""Hardening: hashed, expiring invites; deactivated users; server-side sessions; campaign status,
stale-assignment timeout and rater lists.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import datetime as dt
import hashlib

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

INVITE_DAYS = 7  # invites that existed before this migration expire a week after it


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("invite_hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("invite_expires_at", sa.DateTime, nullable=True))
        batch.add_column(sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()))
    users = sa.table(
        "users",
        sa.column("id", sa.Integer),
        sa.column("invite_token", sa.String),
        sa.column("invite_hash", sa.String),
        sa.column("invite_expires_at", sa.DateTime),
    )
    conn = op.get_bind()
    expires = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) + dt.timedelta(days=INVITE_DAYS)
    rows = conn.execute(sa.select(users.c.id, users.c.invite_token)).all()
    for uid, token in rows:
        if token:
            conn.execute(
                users.update()
                .where(users.c.id == uid)
                .values(
                    invite_hash=hashlib.sha256(token.encode()).hexdigest(),
                    invite_expires_at=expires,
                )
            )
    with op.batch_alter_table("users") as batch:
        batch.drop_column("invite_token")
        batch.create_unique_constraint("uq_users_invite_hash", ["invite_hash"])

    with op.batch_alter_table("campaigns") as batch:
        batch.add_column(
            sa.Column("status", sa.String(16), nullable=False, server_default="active")
        )
        batch.add_column(
            sa.Column("assignment_timeout_s", sa.Integer, nullable=False, server_default="1800")
        )
    op.create_table(
        "web_sessions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False),
        sa.Column("flash", sa.JSON, nullable=True),
    )
    op.create_index("ix_web_sessions_user_id", "web_sessions", ["user_id"])
    op.create_table(
        "campaign_raters",
        sa.Column("campaign_id", sa.Integer, sa.ForeignKey("campaigns.id"), primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), primary_key=True),
    )
    op.create_index("ix_assignments_status", "assignments", ["status"])


def downgrade() -> None:
    op.drop_index("ix_assignments_status", "assignments")
    op.drop_table("campaign_raters")
    op.drop_table("web_sessions")
    with op.batch_alter_table("campaigns") as batch:
        batch.drop_column("assignment_timeout_s")
        batch.drop_column("status")
    with op.batch_alter_table("users") as batch:
        batch.drop_constraint("uq_users_invite_hash", type_="unique")
        batch.drop_column("active")
        batch.drop_column("invite_expires_at")
        batch.drop_column("invite_hash")
        batch.add_column(sa.Column("invite_token", sa.String(64), unique=True))

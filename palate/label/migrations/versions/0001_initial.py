"""Initial schema: users, campaigns, pairs, assignments, labels.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(120), nullable=False, unique=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("password_hash", sa.String(255)),
        sa.Column("invite_token", sa.String(64), unique=True),
        sa.Column("api_token_hash", sa.String(128), unique=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "campaigns",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("guidelines", sa.Text, nullable=False),
        sa.Column("overlap", sa.Integer, nullable=False),
        sa.Column("answers", sa.JSON, nullable=False),
        sa.Column("source", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "pairs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("campaign_id", sa.Integer, sa.ForeignKey("campaigns.id"), nullable=False),
        sa.Column("prompt", sa.JSON, nullable=False),
        sa.Column("response_a", sa.Text, nullable=False),
        sa.Column("response_b", sa.Text, nullable=False),
        sa.Column("source_a", sa.String(200), nullable=False),
        sa.Column("source_b", sa.String(200), nullable=False),
        sa.Column("gold", sa.String(16)),
        sa.Column("meta", sa.JSON, nullable=False),
        sa.Column("n_assigned", sa.Integer, nullable=False),
    )
    op.create_index("ix_pairs_campaign_id", "pairs", ["campaign_id"])
    op.create_table(
        "assignments",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("pair_id", sa.Integer, sa.ForeignKey("pairs.id"), nullable=False),
        sa.Column("rater_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("campaign_id", sa.Integer, sa.ForeignKey("campaigns.id"), nullable=False),
        sa.Column("swapped", sa.Boolean, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("pair_id", "rater_id", name="uq_assignment_pair_rater"),
    )
    for col in ("pair_id", "rater_id", "campaign_id"):
        op.create_index(f"ix_assignments_{col}", "assignments", [col])
    op.create_table(
        "labels",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "assignment_id",
            sa.Integer,
            sa.ForeignKey("assignments.id"),
            nullable=False,
            unique=True,
        ),
        sa.Column("pair_id", sa.Integer, sa.ForeignKey("pairs.id"), nullable=False),
        sa.Column("rater_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("answer", sa.String(16), nullable=False),
        sa.Column("strength", sa.String(16)),
        sa.Column("flags", sa.JSON, nullable=False),
        sa.Column("comment", sa.Text, nullable=False),
        sa.Column("seconds", sa.Float),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_labels_pair_id", "labels", ["pair_id"])
    op.create_index("ix_labels_rater_id", "labels", ["rater_id"])


def downgrade() -> None:
    for table in ("labels", "assignments", "pairs", "campaigns", "users"):
        op.drop_table(table)

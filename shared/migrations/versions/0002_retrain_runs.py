"""retrain_runs: one row per retrain, read by the website's admin page.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "retrain_runs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("stage", sa.String(32), nullable=True),
        sa.Column("epoch", sa.Integer, nullable=True),
        sa.Column("n_epochs", sa.Integer, nullable=True),
        sa.Column("options", sa.JSON, nullable=True),
        sa.Column("worker", sa.String(255), nullable=True),
        sa.Column("version", sa.String(64), nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ix_retrain_runs_created_at", "retrain_runs", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_retrain_runs_created_at", table_name="retrain_runs")
    op.drop_table("retrain_runs")

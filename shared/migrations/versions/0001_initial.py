"""Initial schema: tag suggestions, tagging status, model versions, demo image tags.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BIGINT = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "tag_suggestions",
        sa.Column("id", BIGINT, primary_key=True, autoincrement=True),
        sa.Column("image_id", sa.BigInteger, nullable=False),
        sa.Column("tag", sa.String(255), nullable=False),
        sa.Column("probability", sa.Float, nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.UniqueConstraint("image_id", "model_version", "tag", name="uq_tag_suggestions_image_version_tag"),
    )
    op.create_index("ix_tag_suggestions_image_id", "tag_suggestions", ["image_id"])
    op.create_table(
        "tagging_status",
        sa.Column("image_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("model_version", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_table(
        "model_versions",
        sa.Column("version", sa.String(64), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("arch", sa.String(64), nullable=False),
        sa.Column("vocab", sa.JSON, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("dataset_size", sa.Integer, nullable=True),
        sa.Column("snapshot_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=True),
    )
    # A website that already keeps its tags in an image_tags table keeps it as it is.
    if not sa.inspect(op.get_bind()).has_table("image_tags"):
        op.create_table(
            "image_tags",
            sa.Column("image_id", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("tag", sa.String(255), primary_key=True),
        )


def downgrade() -> None:
    op.drop_table("model_versions")
    op.drop_table("tagging_status")
    op.drop_index("ix_tag_suggestions_image_id", table_name="tag_suggestions")
    op.drop_table("tag_suggestions")

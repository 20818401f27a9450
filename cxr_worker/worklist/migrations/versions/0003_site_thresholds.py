"""The site_thresholds table: operating points recorded by ``cxr-worker calibrate --apply``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "site_thresholds",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("target_sensitivity", sa.Float(), nullable=False),
        sa.Column("n_normal", sa.Integer(), nullable=False),
        sa.Column("n_pneumonia", sa.Integer(), nullable=False),
        sa.Column("n_refused", sa.Integer(), nullable=False),
        sa.Column("sensitivity", sa.Float(), nullable=False),
        sa.Column("specificity", sa.Float(), nullable=False),
        sa.Column("positive_rate", sa.Float(), nullable=False),
        sa.Column("file_list_sha256", sa.String(64), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_site_thresholds_model", "site_thresholds", ["model_version", "id"])


def downgrade() -> None:
    op.drop_index("ix_site_thresholds_model", table_name="site_thresholds")
    op.drop_table("site_thresholds")

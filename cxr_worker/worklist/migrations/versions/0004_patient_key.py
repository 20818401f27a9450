"""The patient key of each instance: a salted hash of its Patient ID, never the ID.

A C-STORE of a SOP Instance UID that the worklist holds for another patient (or study) is
refused instead of re-assigning the row; this column is what the patient is compared on.
Rows received before this revision keep null (compared on the Study Instance UID only until
their next re-send sets it).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-10
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("patient_key", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("patient_key")

"""The study's date and time as the modality wrote them (Study Date + Study Time).

Shown in the worklist beside the time received: a study acquired hours before it reached the
worker (a modality that queued its sends) is told apart from a new one. Kept as the ISO text
``YYYY-MM-DDTHH:MM:SS`` without a time zone: DICOM's Study Time is the modality's local time
and carries no offset, so it is shown as written, never converted. Null when the image has no
usable Study Date. A plain ADD COLUMN: on SQLite it does not rebuild ``instances``, so 0006's
triggers stay.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("instances", sa.Column("study_datetime", sa.String(19), nullable=True))


def downgrade() -> None:
    op.drop_column("instances", "study_datetime")

"""Population status of each instance: in_population | outside | unknown.

Replaces the boolean ``outside_population`` with ``population`` (String(16), not null,
default ``in_population``). Backfill: ``outside_population`` true -> ``outside``, else
``in_population`` (what revision 0001 recorded; it took an unreadable Patient Age as inside,
so rows scored before this revision keep that judgement until they are replayed, which runs
the gate again). Downgrade: ``outside`` -> true, anything else false.

Batch operations: SQLite copies the table (it cannot drop a column in place on older
versions); PostgreSQL alters it directly.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("population", sa.String(16), nullable=False,
                                   server_default="in_population"))
    op.execute(sa.text("UPDATE instances SET population = 'outside' "
                       "WHERE outside_population = :yes").bindparams(yes=True))
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("outside_population")


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("outside_population", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
    op.execute(sa.text("UPDATE instances SET outside_population = :yes "
                       "WHERE population = 'outside'").bindparams(yes=True))
    with op.batch_alter_table("instances") as batch:
        batch.alter_column("outside_population", server_default=None)  # as 0001 made it
        batch.drop_column("population")

"""PostgreSQL: a notification when work becomes available, so that idle workers never poll.

Every ``cxr-worker serve`` on a PostgreSQL worklist LISTENs on ``cxr_worker_<schema>`` (the
schema the worklist lives in, so that two worklists in one database do not wake each
other). These triggers NOTIFY it, at commit, when an instance becomes claimable
(``received`` without a lease: a new image, a re-queue, a replay, a lease given back at
shutdown), payload ``process``, and when a delivery does (``pending`` or ``retrying``
without a lease: a new result, a retry from the CLI or the web page), payload ``send``.
Triggers rather than NOTIFYs in the code: every writer (another host, the CLI, the web
page) wakes the workers, whatever the path. SQLite has no such thing: there a process
other than the one that received the image finds it at its next ``jobs.poll_seconds``.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-26
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

FUNCTION = """
CREATE OR REPLACE FUNCTION cxr_worker_notify() RETURNS trigger AS $$
BEGIN
  PERFORM pg_notify('cxr_worker_' || TG_TABLE_SCHEMA, TG_ARGV[0]);
  RETURN NULL;
END $$ LANGUAGE plpgsql
"""

TRIGGERS = {
    "instances": ("process", "NEW.status = 'received' AND NEW.lease_owner IS NULL"),
    "deliveries": ("send", "NEW.status IN ('pending', 'retrying') AND NEW.lease_owner IS NULL "
                           "AND NEW.superseded_at IS NULL"),
}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(FUNCTION)
    for table, (payload, when) in TRIGGERS.items():
        op.execute(f"CREATE TRIGGER cxr_worker_notify_{table} AFTER INSERT OR UPDATE ON "
                   f"{table} FOR EACH ROW WHEN ({when}) "
                   f"EXECUTE FUNCTION cxr_worker_notify('{payload}')")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS cxr_worker_notify_{table} ON {table}")
    op.execute("DROP FUNCTION IF EXISTS cxr_worker_notify()")

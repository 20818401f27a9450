"""The web worklist: API tokens, browser sessions, studies marked read, operator switches,
the per-study summary of the triage list with the triggers that keep it, and the worklist
version counter.

- ``api_tokens``: only the SHA-256 of each token; ``api_sessions``: the SHA-256 of each
  session cookie, tied to its token (a revoked token's sessions stop working at once);
- ``study_reads``: who (the token's name) marked a study read, and when;
- ``worker_state``: switches such as ``sending_paused`` that every process reads;
- ``study_summary``: one row per study with the triage list's aggregates (status, label,
  band and its rank, probability key, population, times, read mark), recomputed by a trigger from
  that study's rows (``GROUP BY study_instance_uid`` over the few images of one study)
  whenever an instance of it is inserted, deleted or has one of :data:`VISIBLE_COLUMNS`
  updated, and whenever its read mark changes. Why: measured at 100,000 instances on
  PostgreSQL, aggregating every study for each page took 160-500 ms; a page of the summary,
  an index range scan, takes a few (``tests/benchmarks/bench_worklist.py``);
- ``worklist_version``: one row whose counter the same events raise; the web API's ETag and
  its server-sent ``changed`` event read it once a second instead of the list.

On PostgreSQL both triggers are deferred constraint triggers: they run at commit, after the
transaction's own statements, so they never hold a lock another transaction waits for while
waiting for one it holds (no deadlock with a claim or a replay), and what they write becomes
visible together with the change it follows. The summary of a study is recomputed under a
transaction-scoped advisory lock on that study, each statement with a fresh snapshot, so two
transactions changing images of one study at once serialise and the second recomputes from
the first's committed rows. The counter is raised once per transaction. SQLite serialises
writers anyway; its triggers run per row, at once. Lease bookkeeping (claims) fires neither.

**A later migration that rebuilds ``instances`` on SQLite** (``batch_alter_table`` copies
the table) drops its triggers with it: call :func:`drop_triggers` before and
:func:`create_triggers` after (``tests/test_api.py`` checks that the summary and the counter
follow a change at head).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-20
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# columns of instances whose change the triage list (or the study page) shows
VISIBLE_COLUMNS = (
    "study_instance_uid", "accession_number", "spool_path", "status", "reason", "attempts",
    "send_attempts", "probability", "label", "threshold", "model_version", "population",
    "result_sop_instance_uid", "result_path", "received_at", "scored_at", "sent_at")

SUMMARY_COLUMNS = (
    "study_instance_uid", "accession_number", "images", "received_at", "last_received_at",
    "status", "label", "band", "band_rank", "probability_key", "probability", "threshold",
    "model_version", "population_rank", "scored_at", "sent_at", "is_read", "read_by",
    "read_at")

# -- the per-study aggregate (portable SQL: SQLite and PostgreSQL) ---------------------------
# an image with a result: scored, sent, held, or failed only in its delivery (a dead letter
# of the send; the study is still listed by that result)
_SCORED = ("(i.status IN ('scored', 'sent', 'held') OR (i.status = 'failed' AND "
           "i.reason LIKE 'sending%'))")
_N_SCORED = f"SUM(CASE WHEN {_SCORED} THEN 1 ELSE 0 END)"
_HAS = f"{_N_SCORED} > 0"
_SUSPECTED = (f"{_HAS} AND MAX(CASE WHEN {_SCORED} AND i.label = 'SUSPECTED PNEUMONIA' "
              "THEN 1 ELSE 0 END) = 1")
_POP = "CASE i.population WHEN 'outside' THEN 2 WHEN 'unknown' THEN 1 ELSE 0 END"
_POP_SCORED = f"MAX(CASE WHEN {_SCORED} THEN {_POP} END)"


def _n(condition: str) -> str:
    return f"SUM(CASE WHEN {condition} THEN 1 ELSE 0 END)"


_N_PENDING = _n("i.status = 'received'")
_N_FAILED = _n("i.status = 'failed'")
_N_RETRYING = _n("i.status = 'scored' AND i.send_attempts > 0")
_N_SENT = _n("i.status = 'sent'")
_N_HELD = _n("i.status = 'held'")
# status of a study: a result first (failed / retrying / sent / held / scored), else pending,
# failed, not_scored (as cxr_worker.worklist.studies documents)
_STATUS = (
    f"CASE WHEN {_HAS} AND {_N_FAILED} > 0 THEN 'failed' "
    f"WHEN {_HAS} AND {_N_RETRYING} > 0 THEN 'retrying' "
    f"WHEN {_HAS} AND {_N_SENT} = {_N_SCORED} THEN 'sent' "
    f"WHEN {_HAS} AND {_N_HELD} > 0 THEN 'held' "
    f"WHEN {_HAS} THEN 'scored' WHEN {_N_PENDING} > 0 THEN 'pending' "
    f"WHEN {_N_FAILED} > 0 THEN 'failed' ELSE 'not_scored' END")
_LABEL = (f"CASE WHEN {_SUSPECTED} THEN 'SUSPECTED PNEUMONIA' "
          f"WHEN {_HAS} THEN 'NO PNEUMONIA DETECTED' WHEN {_N_PENDING} > 0 THEN 'PENDING' "
          f"WHEN {_N_FAILED} > 0 THEN 'FAILED' ELSE 'NOT SCORED' END")
# band rank: 0 suspected in population, 1 suspected outside/unknown, 2 negative in
# population, 3 negative outside/unknown, 4 not scored, 5 pending, 6 failed
_RANK = (f"CASE WHEN {_SUSPECTED} AND {_POP_SCORED} = 0 THEN 0 WHEN {_SUSPECTED} THEN 1 "
         f"WHEN {_HAS} AND {_POP_SCORED} = 0 THEN 2 WHEN {_HAS} THEN 3 "
         f"WHEN {_N_PENDING} > 0 THEN 5 WHEN {_N_FAILED} > 0 THEN 6 ELSE 4 END")
# the band of each rank (cxr_worker.worklist.studies.RANK_BANDS)
_BAND = (f"CASE {_RANK} WHEN 0 THEN 'suspected' WHEN 1 THEN 'outside' WHEN 2 THEN 'routine' "
         "WHEN 3 THEN 'outside' WHEN 4 THEN 'not_scored' WHEN 5 THEN 'pending' "
         "ELSE 'failed' END")
_PROBABILITY = f"MAX(CASE WHEN {_SCORED} THEN i.probability END)"
_KPROB = f"CASE WHEN {_SUSPECTED} THEN -COALESCE({_PROBABILITY}, 0.0) ELSE 0.0 END"

_SELECT = (
    "SELECT i.study_instance_uid, MIN(i.accession_number), COUNT(*), MIN(i.received_at), "
    f"MAX(i.received_at), {_STATUS}, {_LABEL}, {_BAND}, {_RANK}, {_KPROB}, {_PROBABILITY}, "
    f"MAX(CASE WHEN {_SCORED} THEN i.threshold END), "
    f"MAX(CASE WHEN {_SCORED} THEN i.model_version END), "
    f"COALESCE({_POP_SCORED}, MAX({_POP})), MAX(CASE WHEN {_SCORED} THEN i.scored_at END), "
    f"CASE WHEN {_STATUS} = 'sent' THEN MAX(CASE WHEN {_SCORED} THEN i.sent_at END) END, "
    "CASE WHEN r.read_at IS NOT NULL AND r.read_at >= MAX(i.received_at) THEN 1 ELSE 0 END, "
    "r.read_by, r.read_at "
    "FROM instances i LEFT JOIN study_reads r ON r.study_instance_uid = i.study_instance_uid")
_GROUP = " GROUP BY i.study_instance_uid, r.read_by, r.read_at"
_INSERT = f"INSERT INTO study_summary ({', '.join(SUMMARY_COLUMNS)}) "


def _refresh(uid: str, only_if: str = "") -> str:
    """Statements that recompute the summary row of study ``uid`` (an SQL expression)."""
    cond = f" AND {only_if}" if only_if else ""
    return (f"DELETE FROM study_summary WHERE study_instance_uid = {uid}{cond}; "
            f"{_INSERT}{_SELECT} WHERE i.study_instance_uid = {uid}{cond}{_GROUP};")


_PG_FUNCTIONS = (
    f"""
CREATE FUNCTION study_summary_refresh(p_uid text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('cxr_worker.study_summary'), hashtext(p_uid));
    {_refresh("p_uid")}
END
$$
""",
    """
CREATE FUNCTION study_summary_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        PERFORM study_summary_refresh(OLD.study_instance_uid);
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE'
            AND NEW.study_instance_uid IS DISTINCT FROM OLD.study_instance_uid) THEN
        PERFORM study_summary_refresh(NEW.study_instance_uid);
    END IF;
    RETURN NULL;
END
$$
""",
    """
CREATE FUNCTION worklist_version_bump() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('cxr_worker.version_bumped', true) IS DISTINCT FROM 'on' THEN
        UPDATE worklist_version SET version = version + 1 WHERE id = 1;
        PERFORM set_config('cxr_worker.version_bumped', 'on', true);
    END IF;
    RETURN NULL;
END
$$
""")
_PG_FUNCTION_NAMES = ("study_summary_changed()", "study_summary_refresh(text)",
                      "worklist_version_bump()")


def _events(table: str) -> list[tuple[str, str]]:
    """(trigger name suffix, event clause) of ``table``."""
    update = f"UPDATE OF {', '.join(VISIBLE_COLUMNS)}" if table == "instances" else "UPDATE"
    return [("ins", "INSERT"), ("upd", update), ("del", "DELETE")]


def create_triggers() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for sql in _PG_FUNCTIONS:
            op.execute(sql)
        for table in ("instances", "study_reads"):
            events = " OR ".join(event for _, event in _events(table))
            for name, function in (("summary", "study_summary_changed"),
                                   ("version", "worklist_version_bump")):
                op.execute(f"CREATE CONSTRAINT TRIGGER worklist_{name}_{table} AFTER {events} "
                           f"ON {table} DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
                           f"EXECUTE FUNCTION {function}()")
        return
    bump = "UPDATE worklist_version SET version = version + 1 WHERE id = 1;"
    for table in ("instances", "study_reads"):
        for suffix, event in _events(table):
            if suffix == "ins":
                body = _refresh("NEW.study_instance_uid")
            elif suffix == "del":
                body = _refresh("OLD.study_instance_uid")
            else:
                body = (_refresh("NEW.study_instance_uid") + " " + _refresh(
                    "OLD.study_instance_uid",
                    "OLD.study_instance_uid IS NOT NEW.study_instance_uid"))
            op.execute(f"CREATE TRIGGER worklist_{table}_{suffix} AFTER {event} ON {table} "
                       f"BEGIN {body} {bump} END")


def drop_triggers() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in ("instances", "study_reads"):
            for name in ("summary", "version"):
                op.execute(f"DROP TRIGGER IF EXISTS worklist_{name}_{table} ON {table}")
        for function in _PG_FUNCTION_NAMES:
            op.execute(f"DROP FUNCTION IF EXISTS {function}")
        return
    for table in ("instances", "study_reads"):
        for suffix, _ in _events(table):
            op.execute(f"DROP TRIGGER IF EXISTS worklist_{table}_{suffix}")


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("last_used_at", sa.DateTime(), nullable=True),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
    )
    op.create_table(
        "api_sessions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("session_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("token_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_api_sessions_token_id", "api_sessions", ["token_id"])
    op.create_table(
        "study_reads",
        sa.Column("study_instance_uid", sa.String(64), primary_key=True),
        sa.Column("read_by", sa.String(64), nullable=False),
        sa.Column("read_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "worker_state",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("updated_by", sa.String(64), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )
    version = op.create_table(
        "worklist_version",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
    )
    op.bulk_insert(version, [{"id": 1, "version": 0}])
    op.create_table(
        "study_summary",
        sa.Column("study_instance_uid", sa.String(64), primary_key=True),
        sa.Column("accession_number", sa.String(16), nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("last_received_at", sa.DateTime(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("label", sa.String(32), nullable=False),
        sa.Column("band", sa.String(16), nullable=False),
        sa.Column("band_rank", sa.Integer(), nullable=False),
        sa.Column("probability_key", sa.Float(), nullable=False),
        sa.Column("probability", sa.Float(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("model_version", sa.String(64), nullable=True),
        sa.Column("population_rank", sa.Integer(), nullable=False),
        sa.Column("scored_at", sa.DateTime(), nullable=True),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
        sa.Column("is_read", sa.Integer(), nullable=False),
        sa.Column("read_by", sa.String(64), nullable=True),
        sa.Column("read_at", sa.DateTime(), nullable=True),
    )
    order = ["band_rank", "probability_key", "received_at", "study_instance_uid"]
    op.create_index("ix_study_summary_order", "study_summary", ["is_read", *order])
    op.create_index("ix_study_summary_band", "study_summary", ["is_read", "band", *order])
    op.create_index("ix_study_summary_status", "study_summary", ["status", "is_read", *order])
    op.create_index("ix_study_summary_last_received_at", "study_summary", ["last_received_at"])
    op.create_index("ix_study_summary_accession_number", "study_summary", ["accession_number"])
    op.create_index("ix_instances_received_at", "instances", ["received_at"])
    op.execute(_INSERT + _SELECT + _GROUP)  # the studies received before this revision
    create_triggers()


def downgrade() -> None:
    drop_triggers()
    op.drop_index("ix_instances_received_at", table_name="instances")
    op.drop_table("study_summary")  # and its indexes
    op.drop_table("worklist_version")
    op.drop_table("worker_state")
    op.drop_table("study_reads")
    op.drop_index("ix_api_sessions_token_id", table_name="api_sessions")
    op.drop_table("api_sessions")
    op.drop_table("api_tokens")

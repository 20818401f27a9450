"""Deliveries: each output of an instance (Secondary Capture, Structured Report, rejection
note, HL7 ORU) delivered and retried on its own, and the triage list's study status from them.

- ``deliveries``: one row per result object and destination (``kind`` sc | sr | kos | hl7),
  with its own status (pending, retrying, sent, failed = the dead letter shown as
  "undelivered", held, cancelled), attempts, last error, backoff and lease, the object's UID
  (MSH-10 for hl7), and, when a later decision replaced it, ``superseded_at`` /
  ``superseded_by`` / ``rejected_by`` (the Key Object Selection that withdrew it);
- ``instances.delivery``: the state of an instance's current deliveries (waiting, retrying,
  sent, undelivered, held, or null), written by the application in the transaction that
  changes them. The summary triggers read it, so no trigger needs to join ``deliveries``;
- the summary's study status: a result whose delivery failed for good no longer makes its
  image ``failed``: the image stays ``scored`` with its score and label, its delivery
  ``undelivered`` (its reason says why: "sending failed N times (kind): error"), and the
  study's status is ``undelivered`` (its band and place in the list unchanged); ``failed``
  is left to images whose processing failed;
- rows written before this revision: each image with a result gets an ``sc`` delivery in the
  state its columns said (sent, held, retrying with its attempts, or failed: then the image
  becomes ``scored`` again, its reason moved to the delivery's ``last_error``);
- the worklist version counter also follows the visible columns of ``deliveries`` (lease
  bookkeeping does not move it).

The summary triggers are revision 0005's with the new status rule: dropped and created again
here (same names); on SQLite ``instances`` is not rebuilt on the way up (a column is added in
place), and the way down rebuilds it between :func:`drop_triggers` and 0005's
``create_triggers``.

Revision ID: 0006
Revises: 0005
Create Date: 2027-01-10
"""

import importlib.util
from pathlib import Path
from types import ModuleType

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

VISIBLE_COLUMNS = (
    "study_instance_uid", "accession_number", "spool_path", "status", "reason", "attempts",
    "send_attempts", "probability", "label", "threshold", "model_version", "population",
    "result_sop_instance_uid", "result_path", "received_at", "scored_at", "sent_at",
    "delivery")
# columns of deliveries a person sees (the version counter follows them, not the leases)
DELIVERY_VISIBLE_COLUMNS = (
    "instance_id", "kind", "status", "attempts", "last_error", "result_uid", "sent_at",
    "superseded_at", "superseded_by", "rejected_by")

SUMMARY_COLUMNS = (
    "study_instance_uid", "accession_number", "images", "received_at", "last_received_at",
    "status", "label", "band", "band_rank", "probability_key", "probability", "threshold",
    "model_version", "population_rank", "scored_at", "sent_at", "is_read", "read_by",
    "read_at")

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

# -- the per-study aggregate (portable SQL: SQLite and PostgreSQL) ---------------------------
# an image with a result: scored, sent or held (a result whose delivery failed is scored,
# its delivery undelivered)
_SCORED = "i.status IN ('scored', 'sent', 'held')"
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
_N_UNDELIVERED = _n(f"{_SCORED} AND i.delivery = 'undelivered'")
_N_RETRYING = _n(f"{_SCORED} AND i.delivery = 'retrying'")
_N_SENT = _n("i.status = 'sent'")
_N_HELD = _n("i.status = 'held'")
# status of a study: a result first (failed / undelivered / retrying / sent / held / scored),
# else pending, failed, not_scored (as cxr_worker.worklist.studies documents)
_STATUS = (
    f"CASE WHEN {_HAS} AND {_N_FAILED} > 0 THEN 'failed' "
    f"WHEN {_HAS} AND {_N_UNDELIVERED} > 0 THEN 'undelivered' "
    f"WHEN {_HAS} AND {_N_RETRYING} > 0 THEN 'retrying' "
    f"WHEN {_HAS} AND {_N_SENT} = {_N_SCORED} THEN 'sent' "
    f"WHEN {_HAS} AND {_N_HELD} > 0 THEN 'held' "
    f"WHEN {_HAS} THEN 'scored' WHEN {_N_PENDING} > 0 THEN 'pending' "
    f"WHEN {_N_FAILED} > 0 THEN 'failed' ELSE 'not_scored' END")
_LABEL = (f"CASE WHEN {_SUSPECTED} THEN 'SUSPECTED PNEUMONIA' "
          f"WHEN {_HAS} THEN 'NO PNEUMONIA DETECTED' WHEN {_N_PENDING} > 0 THEN 'PENDING' "
          f"WHEN {_N_FAILED} > 0 THEN 'FAILED' ELSE 'NOT SCORED' END")
_RANK = (f"CASE WHEN {_SUSPECTED} AND {_POP_SCORED} = 0 THEN 0 WHEN {_SUSPECTED} THEN 1 "
         f"WHEN {_HAS} AND {_POP_SCORED} = 0 THEN 2 WHEN {_HAS} THEN 3 "
         f"WHEN {_N_PENDING} > 0 THEN 5 WHEN {_N_FAILED} > 0 THEN 6 ELSE 4 END")
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
_BUMP = "UPDATE worklist_version SET version = version + 1 WHERE id = 1;"


def _events(table: str) -> list[tuple[str, str]]:
    """(trigger name suffix, event clause) of ``table``."""
    visible = {"instances": VISIBLE_COLUMNS, "deliveries": DELIVERY_VISIBLE_COLUMNS}
    update = f"UPDATE OF {', '.join(visible[table])}" if table in visible else "UPDATE"
    return [("ins", "INSERT"), ("upd", update), ("del", "DELETE")]


def create_triggers() -> None:
    """The summary triggers (instances, study_reads) and the version counter's (those two
    and deliveries)."""
    if op.get_bind().dialect.name == "postgresql":
        for sql in _PG_FUNCTIONS:
            op.execute(sql)
        for table in ("instances", "study_reads", "deliveries"):
            events = " OR ".join(event for _, event in _events(table))
            names = [("version", "worklist_version_bump")]
            if table != "deliveries":
                names.insert(0, ("summary", "study_summary_changed"))
            for name, function in names:
                op.execute(f"CREATE CONSTRAINT TRIGGER worklist_{name}_{table} AFTER {events} "
                           f"ON {table} DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
                           f"EXECUTE FUNCTION {function}()")
        return
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
                       f"BEGIN {body} {_BUMP} END")
    for suffix, event in _events("deliveries"):
        op.execute(f"CREATE TRIGGER worklist_deliveries_{suffix} AFTER {event} ON deliveries "
                   f"BEGIN {_BUMP} END")


def drop_triggers() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in ("instances", "study_reads", "deliveries"):
            for name in ("summary", "version"):
                op.execute(f"DROP TRIGGER IF EXISTS worklist_{name}_{table} ON {table}")
        for function in _PG_FUNCTION_NAMES:
            op.execute(f"DROP FUNCTION IF EXISTS {function}")
        return
    for table in ("instances", "study_reads", "deliveries"):
        for suffix, _ in _events(table):
            op.execute(f"DROP TRIGGER IF EXISTS worklist_{table}_{suffix}")


def _revision_0005() -> ModuleType:
    """Revision 0005's module (its triggers, for the way down)."""
    path = Path(__file__).with_name("0005_web_worklist.py")
    spec = importlib.util.spec_from_file_location("cxr_worker_migration_0005", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rebuild_summary(insert_select_group: str) -> None:
    op.execute("DELETE FROM study_summary")
    op.execute(insert_select_group)


# what an image's delivery was under 0005, as (delivery status, instances.delivery)
_LEGACY = (
    ("i.status = 'sent'", "sent", "sent"),
    ("i.status = 'held'", "held", "held"),
    ("i.status = 'failed' AND i.reason LIKE 'sending%'", "failed", "undelivered"),
    ("i.status = 'scored' AND i.send_attempts > 0", "retrying", "retrying"),
    ("i.status = 'scored' AND i.send_attempts = 0", "pending", "waiting"),
)


def upgrade() -> None:
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(), nullable=True),
        sa.Column("result_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=True),
        sa.Column("series_instance_uid", sa.String(64), nullable=True),
        sa.Column("path", sa.Text(), nullable=True),
        sa.Column("label", sa.String(32), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("model_version", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
        sa.Column("superseded_at", sa.DateTime(), nullable=True),
        sa.Column("superseded_by", sa.String(64), nullable=True),
        sa.Column("rejected_by", sa.String(64), nullable=True),
    )
    op.create_index("ix_deliveries_instance", "deliveries", ["instance_id", "kind"])
    op.create_index("ix_deliveries_due", "deliveries", ["status", "next_attempt_at"])
    drop_triggers()  # 0005's (same names): the rows below are converted without them
    op.add_column("instances", sa.Column("delivery", sa.String(16), nullable=True))
    for condition, status, state in _LEGACY:
        op.execute(
            "INSERT INTO deliveries (instance_id, kind, status, attempts, last_error, "
            "next_attempt_at, result_uid, sop_class_uid, path, label, threshold, "
            "model_version, created_at, sent_at) "
            f"SELECT i.id, 'sc', '{status}', i.send_attempts, "
            f"CASE WHEN '{status}' IN ('failed', 'retrying') THEN i.reason END, "
            "i.next_attempt_at, i.result_sop_instance_uid, "
            f"'{SECONDARY_CAPTURE}', i.result_path, i.label, i.threshold, i.model_version, "
            "COALESCE(i.scored_at, i.received_at), i.sent_at FROM instances i "
            f"WHERE i.result_sop_instance_uid IS NOT NULL AND {condition}")
        op.execute(f"UPDATE instances SET delivery = '{state}' WHERE id IN (SELECT i.id FROM "
                   f"instances i WHERE i.result_sop_instance_uid IS NOT NULL AND {condition})")
    # a dead-lettered delivery: the image keeps its result (scored) and its reason
    # ("sending failed N times: ..."), the delivery the same text as its last error
    op.execute("UPDATE instances SET status = 'scored' "
               "WHERE status = 'failed' AND reason LIKE 'sending%' "
               "AND result_sop_instance_uid IS NOT NULL")
    op.execute("UPDATE instances SET reason = NULL WHERE status = 'scored' "
               "AND reason LIKE 'retrying%' AND delivery = 'retrying'")
    _rebuild_summary(_INSERT + _SELECT + _GROUP)
    create_triggers()


def downgrade() -> None:
    drop_triggers()
    # each image's current Secondary Capture delivery back into its own columns
    op.execute(
        "UPDATE instances SET status = 'failed', reason = COALESCE(reason, 'sending failed') "
        "WHERE status = 'scored' AND delivery = 'undelivered' AND EXISTS (SELECT 1 FROM "
        "deliveries d WHERE d.instance_id = instances.id AND d.kind = 'sc' AND "
        "d.superseded_at IS NULL AND d.status = 'failed')")
    op.execute(
        "UPDATE instances SET send_attempts = COALESCE((SELECT MAX(d.attempts) FROM "
        "deliveries d WHERE d.instance_id = instances.id AND d.superseded_at IS NULL), 0)")
    op.drop_table("deliveries")  # and its indexes
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("delivery")
    previous = _revision_0005()
    _rebuild_summary(previous._INSERT + previous._SELECT + previous._GROUP)
    previous.create_triggers()

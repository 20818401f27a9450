"""``cxr-worker replay``: push stored or given images through the pipeline again.

Use after a model change (new scores, a new result series for the new model version), a
threshold change, or a PACS outage (results re-sent). Results carry UIDs derived from the
source, the model version and the decision: the same decision is sent again as the same
objects (the PACS keeps one copy); a changed decision is new objects, and the earlier ones
that may be at the PACS are withdrawn with a rejection note (IHE IOCM) that the replay sends
too (:mod:`cxr_worker.pipeline`). The report gives each image's deliveries (``deliveries``:
kind, status, attempts, last error, result UID) and the replaced ones (``superseded``).

The replay runs in this process on exactly the selected instances (a running ``serve`` may
take some of them over; the leases keep the two apart). Sends that fail are left to the
service's retries and reported as ``retrying``.

Folders are walked for DICOM files (``DICM`` preamble); other files are skipped and reported
in one line. A path that does not exist stops the replay before anything is done (exit 2). A
progress bar shows on a terminal.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from cxr_worker import inputs, logs
from cxr_worker.compose import build_pipeline, load_scorer, open_worklist
from cxr_worker.errors import ConfigError, UIDConflictError
from cxr_worker.settings import Settings
from cxr_worker.spool import Spool, atomic_write
from cxr_worker.worklist import control, deliveries, queue
from cxr_worker.worklist.header import InstanceHeader, invalid_uids
from cxr_worker.worklist.models import Instance

logger = logging.getLogger(__name__)

REPLAY_AE_TITLE = "REPLAY"  # the calling AE title a replayed file is recorded with


def _given_files(paths: list[Path], notify: Callable[[str], None]) -> list[Path]:
    """The DICOM files of ``paths`` (folders walked); one line about what was skipped."""
    files, skipped = inputs.expand(paths, inputs.is_dicom_file, "replay")
    if skipped:
        notify(inputs.skipped_line(skipped, "not DICOM"))
    return files


def _enqueue_file(engine: Engine, spool: Spool, path: Path) -> tuple[int | None, dict[str, Any]]:
    if not inputs.is_dicom_file(path):  # named on the command line
        return None, {"path": str(path), "status": "error", "reason": inputs.NOT_DICOM}
    try:
        ds = dcmread(path, stop_before_pixels=True)
        bad = invalid_uids(ds)  # as the listener: no such value reaches a name or the worklist
        if bad:
            return None, {"path": str(path), "status": "error",
                          "reason": f"{', '.join(bad)} missing or not a valid UID"}
        header = InstanceHeader.from_dataset(ds)
    except (InvalidDicomError, AttributeError, EOFError, ValueError, KeyError) as exc:
        return None, {"path": str(path), "status": "error", "reason": f"not a DICOM image: {exc}"}
    dest = spool.image_path(header.study_instance_uid, header.sop_instance_uid)
    data = path.read_bytes()

    def write(f: BinaryIO) -> None:
        f.write(data)

    values = header.row_values(
        calling_ae_title=REPLAY_AE_TITLE, spool_path=str(dest),
        transfer_syntax_uid=str(ds.file_meta.get("TransferSyntaxUID", "")))
    try:
        queue.check_conflict(engine, **values)  # before the file held is replaced
        atomic_write(dest, write)
        row_id, _ = queue.enqueue(engine, **values)
    except UIDConflictError as exc:
        return None, {"path": str(path), "status": "error", "reason": str(exc)}
    return row_id, {}


def _select(engine: Engine, study: str | None, since: dt.datetime | None) -> list[int]:
    q = select(Instance.id).where(Instance.spool_path != "")
    if study:
        q = q.where(Instance.study_instance_uid == study)
    if since:
        q = q.where(Instance.received_at >= since)
    with Session(engine) as s:
        return list(s.scalars(q.order_by(Instance.id)).all())


def _describe(engine: Engine, ids: list[int]) -> list[dict[str, Any]]:
    outputs = deliveries.of_instances(engine, ids)
    with Session(engine) as s:
        rows = s.scalars(select(Instance).where(Instance.id.in_(ids)).order_by(Instance.id))
        out = []
        for r in rows:
            mine = outputs.get(r.id, [])
            out.append({
                "sop_instance_uid": r.sop_instance_uid,
                "study_instance_uid": r.study_instance_uid,
                "status": control.instance_status(r.status, r.delivery),
                "label": r.label, "population": r.population,
                "probability": r.probability, "threshold": r.threshold,
                "model_version": r.model_version,
                "result_sop_instance_uid": r.result_sop_instance_uid, "reason": r.reason,
                "deliveries": [deliveries.as_json(d) for d in mine if d.superseded_at is None]
                or None,
                "superseded": [deliveries.as_json(d) for d in mine
                               if d.superseded_at is not None] or None,
            })
        return out


def _drain(pipeline: Any, ids: list[int]) -> None:
    """Process (and send) the replayed jobs, with a progress bar on a terminal."""
    from contextlib import nullcontext

    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    budget = 2 * len(ids) + 10  # as Pipeline.drain(max_jobs=...)
    show = logs.progress_enabled()
    # log lines above the bar, not through it
    with logging_redirect_tqdm() if show else nullcontext(), tqdm(
            total=len(ids), desc="replay", unit="image", disable=not show) as bar:
        while budget > 0 and not pipeline.stopping.is_set():
            processed = pipeline.process_next()
            sent = pipeline.send_next()
            if not (processed or sent):
                break
            bar.update(int(processed))
            budget -= 1


def run(s: Settings, *, paths: list[Path], study: str | None, since: dt.datetime | None,
        dry_run: bool, send: bool,
        notify: Callable[[str], None] = logger.warning) -> list[dict[str, Any]]:
    if not (paths or study or since):
        raise ConfigError("replay needs FILE|DIR, --study UID or --since TIME")
    files = _given_files(paths, notify) if paths else []
    engine = open_worklist(s)
    if dry_run:
        if paths:
            return [{"path": str(p), "status": "would replay"} if inputs.is_dicom_file(p) else
                    {"path": str(p), "status": "error", "reason": inputs.NOT_DICOM}
                    for p in files]
        return [{**d, "status": "would replay (was " + d["status"] + ")"}
                for d in _describe(engine, _select(engine, study, since))]
    spool = Spool(s.data_dir)
    errors: list[dict[str, Any]] = []
    ids: list[int] = []
    for p in files:
        row_id, err = _enqueue_file(engine, spool, p)
        if row_id is None:
            errors.append(err)
        else:
            ids.append(row_id)
    if study or since:
        selected = _select(engine, study, since)
        queue.requeue(engine, selected)
        ids.extend(selected)
    if not ids:
        return errors
    pipeline = build_pipeline(s, load_scorer(s, engine), engine, hold_results=not send,
                              only_ids=set(ids))
    try:
        _drain(pipeline, ids)
    finally:
        pipeline.close_sends()
    return errors + _describe(engine, ids)

"""The wiring: the stage configs, the scorer, the worklist and the pipeline, built from
:class:`~cxr_worker.settings.Settings`.

The one module (besides the pipeline, which runs them) that sees every stage's config: the
running service (:mod:`cxr_worker.service`), the one-shot commands (:mod:`cxr_worker.cli`,
:mod:`cxr_worker.replay`, :mod:`cxr_worker.conformance`) and the tests build what they need
here, from the same settings, the same way. Nothing here starts a thread or a server.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from cxr_worker import gate, receive, report, send, sizes, tls
from cxr_worker.errors import StartupError
from cxr_worker.metrics import Metrics
from cxr_worker.model import card as model_card
from cxr_worker.pipeline import Outputs, Pipeline
from cxr_worker.score import SHIPPED_MODEL_DIR, Scorer, ThresholdChoice
from cxr_worker.settings import Settings, hl7_config
from cxr_worker.spool import Spool
from cxr_worker.worklist import queue, schema, site


def listener_config(s: Settings) -> receive.ListenerConfig:
    li = s.listener
    return receive.ListenerConfig(
        li.ae_title, tuple(li.allowed_calling_ae_titles), li.accept_dx_for_processing,
        max_pdu_bytes=li.max_pdu_bytes, max_associations=li.max_associations,
        max_associations_per_host=li.max_associations_per_host,
        network_timeout_seconds=li.network_timeout_seconds,
        acse_timeout_seconds=li.acse_timeout_seconds,
        dimse_timeout_seconds=li.dimse_timeout_seconds,
        check_called_ae_title=li.check_called_ae_title)


def gate_config(s: Settings) -> gate.GateConfig:
    own = report_config(s)  # the loop guard knows the results by what the report writes
    return gate.GateConfig(
        accept_dx_for_processing=s.listener.accept_dx_for_processing,
        require_body_part_chest=s.gate.require_body_part_chest,
        allow_missing_body_part=s.gate.allow_missing_body_part,
        view_positions=tuple(v.upper() for v in s.gate.view_positions),
        allow_missing_view_position=s.gate.allow_missing_view_position,
        min_age_years=s.gate.min_age_years,
        max_age_years=s.gate.max_age_years,
        refuse_outside_age_range=s.gate.refuse_outside_age_range,
        refuse_unknown_age=s.gate.refuse_unknown_age,
        uid_prefix=own.uid_prefix,
        manufacturer=own.manufacturer,
        series_number=own.series_number,
    )


def report_config(s: Settings) -> report.ReportConfig:
    return report.ReportConfig(s.report.uid_prefix, s.report.series_number,
                               s.report.manufacturer, heatmap=s.report.heatmap)


def pacs_peer(s: Settings) -> send.Peer | None:
    """The PACS (over TLS with ``pacs.tls``); None when none is configured."""
    return tls.pacs_peer(s)


def model_dir(s: Settings) -> Path:
    """The model folder (``model.path``, else the bundled model), checked to be one: a folder
    holding ``model_card.json``. Raises :class:`StartupError` naming ``model.path``."""
    if not s.model.path:
        return SHIPPED_MODEL_DIR
    path = Path(s.model.path).expanduser()
    fix = f"set model.path to the folder that holds {model_card.CARD_FILE} and the .tflite file(s)"
    if path.is_file():
        raise StartupError(f"model.path {path}: is a file, not the model folder: {fix} "
                           f"(here perhaps {path.parent})")
    if not path.is_dir():
        raise StartupError(f"model.path {path}: no such folder: {fix}")
    if not (path / model_card.CARD_FILE).is_file():
        raise StartupError(f"model.path {path}: no {model_card.CARD_FILE} in this folder: {fix}")
    return path


def _unloadable_member(folder: Path, card: dict[str, Any]) -> str:
    """The first member file LiteRT cannot load (the error path of :func:`load_scorer`)."""
    from cxr_worker.model.runtime import TFLiteScorer

    for m in model_card.members(card):
        try:
            TFLiteScorer(folder / str(m["tflite"]), num_threads=1)
        except (ValueError, RuntimeError):
            return str(m["tflite"])
    return "the model"


def load_scorer(s: Settings, engine: Engine | None = None) -> Scorer:
    """The model, with the threshold in force: ``[model] threshold`` if set, else the site
    threshold recorded by ``calibrate --apply`` for this model version (looked up in
    ``engine``'s worklist), else the model card's.

    A model folder that is not one, or whose files LiteRT cannot load although their sha256
    matches the card, raises :class:`StartupError` naming ``model.path`` and the file; a file
    whose sha256 differs stays a :class:`~cxr_worker.errors.ModelIntegrityError`."""
    folder = model_dir(s)
    try:
        scorer = Scorer(folder, s.model.threshold, s.model.num_threads)
    except (ValueError, RuntimeError) as exc:  # LiteRT: "not a valid Flatbuffer buffer", ...
        key = f"model.path {folder}" if s.model.path else f"the bundled model {folder}"
        bad = _unloadable_member(folder, model_card.load_card(folder))
        fix = ("point model.path at a model folder written by 'cxr-worker train'"
               if s.model.path else "reinstall cxr-worker")
        raise StartupError(f"{key}: {bad} cannot be loaded although its sha256 matches the "
                           f"card ({exc}): {fix}") from exc
    if s.model.threshold is None and engine is not None:
        row = site.latest(engine, scorer.model_version)
        if row is not None:
            scorer.use_threshold(ThresholdChoice(row.threshold, site.describe(row)))
    return scorer


def prepare_data_dir(s: Settings) -> Path:
    """Create ``storage.data_dir`` and check that this user can write it; raises
    :class:`StartupError` naming the key otherwise."""
    path = s.data_dir
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise StartupError(
            f"storage.data_dir {path}: cannot create or write it ({exc.strerror}): create it "
            "writable for the worker's user, or set storage.data_dir "
            "(CXR_WORKER__STORAGE__DATA_DIR) to a folder it can write") from exc
    return path


def open_worklist(s: Settings, migrate: bool = False) -> Engine:
    """The worklist database (created under ``storage.data_dir`` unless ``database.url``)."""
    if not s.database.url:
        prepare_data_dir(s)
    return schema.open_database(s.database_url, migrate=migrate)


def existing_worklist(s: Settings) -> Engine | None:
    """The worklist's engine if it exists already (one-shot commands never create one)."""
    with schema.named_errors(s.database_url):  # "not a URL" named like start-up does
        missing = schema.not_created(s.database_url)
    return None if missing else open_worklist(s)


def size_limits(s: Settings) -> sizes.Limits:
    """``[limits]``: the sizes the listener and the decoder refuse (issue 10)."""
    li = s.limits
    return sizes.Limits(max_dataset_bytes=li.max_dataset_bytes,
                         max_decoded_bytes=li.max_decoded_bytes,
                         max_inflated_bytes=li.max_inflated_bytes)


def build_pipeline(s: Settings, scorer: Scorer, engine: Engine, *,
                   hold_results: bool = False, only_ids: set[int] | None = None,
                   metrics: Metrics | None = None, workers: int = 1) -> Pipeline:
    """The pipeline; also sets this process's decode limits (``[limits]``, process-wide:
    the pipeline calls :mod:`cxr_worker.decode` without them; :mod:`cxr_worker.sizes`).
    ``workers`` > 1: that many worker processes (:mod:`cxr_worker.workers`), each running
    the model on ``model.num_threads / workers`` threads (at least one)."""
    sizes.set_limits(size_limits(s))
    retry = queue.RetryPolicy(s.jobs.lease_seconds, s.jobs.max_attempts,
                              s.jobs.retry_base_seconds, s.jobs.retry_max_seconds)
    return Pipeline(engine=engine, spool=Spool(s.data_dir), scorer=scorer,
                    gate_cfg=gate_config(s), report_cfg=report_config(s), retry=retry,
                    pacs=pacs_peer(s), hold_results=hold_results, only_ids=only_ids,
                    metrics=metrics, outputs=outputs_config(s), workers=workers,
                    num_threads=max(s.model.num_threads // max(workers, 1), 1))


def outputs_config(s: Settings) -> Outputs:
    """``[outputs]`` and ``[hl7]``: what is built and where each goes."""
    return Outputs(delivered=s.delivered_kinds,
                   hl7=hl7_config(s) if "hl7" in s.delivered_kinds else None)


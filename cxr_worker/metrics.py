"""Prometheus metrics of the service (``GET /metrics``), on a registry of their own.

Recorded as work happens (by the pipeline):

- ``cxr_worker_time_to_flag_seconds`` (histogram): from the C-STORE row insert (or the
  replay or duplicate C-STORE that re-queued the image) to the image scored;
- ``cxr_worker_stage_seconds{stage}`` (histogram): decode (read, pixels, model input), score,
  report (build and write the Secondary Capture), send (one C-STORE attempt);
- ``cxr_worker_deliveries_total{destination}``, ``cxr_worker_delivery_failures_total
  {destination}`` (counters): results the destination accepted / attempts that failed
  (destination: the PACS's AE title, or ``HL7`` for the RIS);
- ``cxr_worker_model_info{model_version, threshold}``: the model and threshold in force.

Computed from the worklist at scrape time (one GROUP BY query each on images and
deliveries):

- ``cxr_worker_images{status, reason}``: rows by status; ``reason`` buckets why, never the
  free text: the gate rule name, ``quarantined``, ``file_missing`` or ``other`` for
  not_scored; ``process`` for failed; ``retrying`` for a row waiting for a retry;
- ``cxr_worker_deliveries{kind, status}``: current deliveries by output kind (sc, sr, kos,
  hl7) and status (pending, retrying, sent, failed: undelivered, held, cancelled);
- ``cxr_worker_queue_depth{queue}``: images due to ``process``, deliveries due to ``send``;
- ``cxr_worker_positive_rate``: suspected / scored among images scored in the last
  ``RECENT_HOURS`` hours (NaN when none), ``cxr_worker_recent_scored_images`` its denominator;
- ``cxr_worker_pacs_echo_ok{destination}``, ``cxr_worker_pacs_echo_timestamp_seconds
  {destination}``: the last periodic C-ECHO, when a PACS is configured.

Labels never carry patient data, accession numbers or UIDs.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, and_, case, func, select
from sqlalchemy.orm import Session

from cxr_worker.labels import Label
from cxr_worker.worklist.deliveries import OPEN as OPEN_DELIVERIES
from cxr_worker.worklist.deliveries import counts as delivery_counts
from cxr_worker.worklist.models import Instance, Status, utcnow
from cxr_worker.worklist.reasons import reason_bucket

if TYPE_CHECKING:
    from cxr_worker.health import PacsEcho

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STAGES = ("decode", "score", "report", "send")
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TIME_TO_FLAG_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
                        3600.0)
RECENT_HOURS = 24.0


class Metrics:
    """The service's collectors; :meth:`watch_worklist` adds the scrape-time worklist gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.time_to_flag = Histogram(
            "cxr_worker_time_to_flag_seconds",
            "Seconds from the C-STORE row insert (or re-queue) to the image scored",
            buckets=TIME_TO_FLAG_BUCKETS, registry=self.registry)
        self.stage_seconds = Histogram(
            "cxr_worker_stage_seconds", "Seconds per image in each pipeline stage", ["stage"],
            buckets=STAGE_BUCKETS, registry=self.registry)
        self.deliveries = Counter(
            "cxr_worker_deliveries", "Results the destination accepted", ["destination"],
            registry=self.registry)
        self.delivery_failures = Counter(
            "cxr_worker_delivery_failures", "Delivery attempts that failed (retried later)",
            ["destination"], registry=self.registry)
        self.model = Info("cxr_worker_model", "The model in use and the threshold in force",
                          registry=self.registry)
        for stage in STAGES:
            self.stage_seconds.labels(stage)

    def stage(self, name: str) -> AbstractContextManager[Any]:
        """``with metrics.stage("decode"): ...`` observes the block's duration."""
        return self.stage_seconds.labels(name).time()

    def add_destination(self, destination: str) -> None:
        """Show the destination's counters at 0 before its first delivery."""
        self.deliveries.labels(destination)
        self.delivery_failures.labels(destination)

    def set_model(self, model_version: str, threshold: float) -> None:
        self.model.info({"model_version": model_version, "threshold": f"{threshold:g}"})

    def watch_worklist(self, engine: Engine, pacs_configured: bool,
                       pacs_echo: PacsEcho | None = None) -> None:
        self.registry.register(WorklistCollector(engine, pacs_configured, pacs_echo))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class WorklistCollector(Collector):
    def __init__(self, engine: Engine, pacs_configured: bool, pacs_echo: PacsEcho | None) -> None:
        self.engine = engine
        self.pacs_configured = pacs_configured
        self.pacs_echo = pacs_echo

    def describe(self) -> Iterable[Metric]:
        return []  # names vary with the data; nothing to check at registration

    def counts(self) -> list[tuple[str, str, bool, str | None, int]]:
        """(status, reason bucket, due, label if scored recently, rows): one GROUP BY."""
        now = utcnow()
        cutoff = now - dt.timedelta(hours=RECENT_HOURS)
        due = case((Instance.next_attempt_at <= now, 1), else_=0)
        recent = case((and_(Instance.probability.is_not(None), Instance.scored_at >= cutoff),
                       Instance.label), else_=None)
        query = (select(Instance.status.label("st"), reason_bucket().label("bucket"),
                        due.label("due"), recent.label("recent_label"), func.count())
                 .group_by("st", "bucket", "due", "recent_label"))
        with Session(self.engine) as s:
            return [(str(st), str(bucket or ""), bool(d), lbl, int(n))
                    for st, bucket, d, lbl, n in s.execute(query).all()]

    def collect(self) -> Iterator[Metric]:
        ok = GaugeMetricFamily("cxr_worker_worklist_query_ok",
                               "1 when the worklist answered this scrape's query")
        try:
            rows = self.counts()
            output_rows = delivery_counts(self.engine)
        except Exception:
            logger.warning("metrics: the worklist query failed", exc_info=True)
            ok.add_metric([], 0)
            yield ok
            yield from self._echo()
            return
        ok.add_metric([], 1)
        yield ok
        images = {(str(st), ""): 0 for st in (Status.RECEIVED, Status.SCORED, Status.HELD,
                                              Status.SENT)}
        depth = {"process": 0, "send": 0}
        scored = suspected = 0
        for status, bucket, is_due, label, n in rows:
            images[(status, bucket)] = images.get((status, bucket), 0) + n
            if is_due and status == Status.RECEIVED:
                depth["process"] += n
            if label is not None:
                scored += n
                suspected += n if label == Label.SUSPECTED else 0
        g = GaugeMetricFamily("cxr_worker_images", "Images in the worklist by status and reason",
                              labels=["status", "reason"])
        for (status, bucket), n in sorted(images.items()):
            g.add_metric([status, bucket], n)
        yield g
        outputs: dict[tuple[str, str], int] = {}
        for kind, status, is_due, n in output_rows:
            outputs[(kind, status)] = outputs.get((kind, status), 0) + n
            if is_due and status in OPEN_DELIVERIES:
                depth["send"] += n
        g = GaugeMetricFamily("cxr_worker_deliveries", "Current deliveries of results by "
                              "output kind (sc, sr, kos, hl7) and status (failed: undelivered)",
                              labels=["kind", "status"])
        for (kind, status), n in sorted(outputs.items()):
            g.add_metric([kind, status], n)
        yield g
        g = GaugeMetricFamily("cxr_worker_queue_depth", "Rows due to process or to send",
                              labels=["queue"])
        for queue_name, n in depth.items():
            g.add_metric([queue_name], n)
        yield g
        yield GaugeMetricFamily(
            "cxr_worker_positive_rate",
            f"Suspected / scored among images scored in the last {RECENT_HOURS:g} h",
            value=suspected / scored if scored else math.nan)
        yield GaugeMetricFamily(
            "cxr_worker_recent_scored_images",
            f"Images scored in the last {RECENT_HOURS:g} h", value=scored)
        yield from self._echo()

    def _echo(self) -> Iterator[Metric]:
        last = self.pacs_echo.last if self.pacs_echo is not None else None
        if self.pacs_echo is None or last is None:
            return
        labels = [self.pacs_echo.destination]
        g = GaugeMetricFamily("cxr_worker_pacs_echo_ok", "1 when the last C-ECHO succeeded",
                              labels=["destination"])
        g.add_metric(labels, 1 if last.ok else 0)
        yield g
        g = GaugeMetricFamily("cxr_worker_pacs_echo_timestamp_seconds",
                              "When the last C-ECHO ran (Unix time)", labels=["destination"])
        g.add_metric(labels, last.at.timestamp())
        yield g

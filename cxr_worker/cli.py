"""``cxr-worker``: the command line (the composition root for one-shot commands).

Exit codes: 0 success; 1 the command ran but something failed (an input not scored, a peer
that did not answer, a replay with failures); 2 usage or configuration errors.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxr_worker import __version__
from cxr_worker.errors import ConfigError, CxrWorkerError
from cxr_worker.settings import Settings, load_settings

logger = logging.getLogger("cxr_worker")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(getattr(args, "config", None))


def open_worklist(s: Settings) -> Any:
    from cxr_worker.worklist import schema

    return schema.open_database(s.database_url)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, sort_keys=False), flush=True)


# -- serve / echo / db ------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from cxr_worker.service import serve

    return serve(_settings(args), migrate=not args.no_migrate)


def cmd_echo(args: argparse.Namespace) -> int:
    from cxr_worker import send

    s = _settings(args)
    if args.self:
        peer = send.Peer(s.listener.ae_title, s.listener.host, s.listener.port,
                         "CXR_ECHO", s.pacs.timeout_seconds)
    elif not s.pacs_configured:
        print("no PACS configured: set [pacs] ae_title, host and port (or use --self)",
              file=sys.stderr)
        return EXIT_USAGE
    else:
        peer = send.Peer(s.pacs.ae_title, s.pacs.host, s.pacs.port, s.listener.ae_title,
                         s.pacs.timeout_seconds)
    target = f"{peer.ae_title}@{peer.host}:{peer.port}"
    try:
        send.echo(peer)
    except CxrWorkerError as exc:
        print(f"C-ECHO {target} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"C-ECHO {target}: success")
    return EXIT_OK


def cmd_db(args: argparse.Namespace) -> int:
    from cxr_worker.worklist import queue, schema

    s = _settings(args)
    schema.ensure_sqlite_folder(s.database_url)
    engine = queue.make_engine(s.database_url)
    if args.db_command == "upgrade":
        rev = schema.upgrade(engine, args.revision)
        print(f"database at revision {rev} (head {schema.head_revision()})")
    else:
        print(f"database at revision {schema.current_revision(engine)} "
              f"(head {schema.head_revision()})")
    return EXIT_OK


# -- worklist ---------------------------------------------------------------------------
def _t(v: dt.datetime | None) -> str:
    return v.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if v else "-"


def _parse_since(value: str) -> dt.datetime | None:
    """ISO date/time, UTC unless it names a zone; None (with a message) when unreadable."""
    try:
        since = dt.datetime.fromisoformat(value)
    except ValueError:
        print(f"--since: not an ISO date/time: {value!r}", file=sys.stderr)
        return None
    return since if since.tzinfo else since.replace(tzinfo=dt.UTC)


def cmd_worklist(args: argparse.Namespace) -> int:
    from cxr_worker.worklist import studies

    engine = open_worklist(_settings(args))
    since = _parse_since(args.since) if args.since else None
    if args.since and since is None:
        return EXIT_USAGE
    rows = studies.triage_list(engine, args.status, args.limit, since)
    if args.json:
        for r in rows:
            _print_json(r.as_json())
        return EXIT_OK
    from cxr_worker.labels import Population, format_probability

    # the population beside the label: a result is only as good as the population it was
    # validated on (shown for studies with a result; "-" for pending, refused, failed)
    header = f"{'RESULT':<22} {'POPULATION':<28} {'PROB':>6} {'STATUS':<10} " \
             f"{'ACCESSION':<16} {'RECEIVED':<19} {'SCORED':<19} {'SENT':<19} " \
             "STUDY INSTANCE UID / MODEL / REASON"
    print(header)
    for r in rows:
        prob = format_probability(r.probability) if r.probability is not None else "-"
        population = Population(r.population).text if r.probability is not None else "-"
        extra = r.model_version or ""
        if r.reason and r.status != "sent":
            extra += f" ({r.reason})"
        label = r.label if r.status != "not_scored" else "NOT SCORED"
        print(f"{label:<22} {population:<28} {prob:>6} {r.status:<10} "
              f"{r.accession_number or '-':<16} {_t(r.received_at):<19} {_t(r.scored_at):<19} "
              f"{_t(r.sent_at):<19} {r.study_instance_uid} {extra}".rstrip())
    if not rows:
        print("(no studies)")
    return EXIT_OK


# -- score ------------------------------------------------------------------------------
def _score_one(path: Path, scorer: Any, gate_cfg: Any) -> dict[str, Any]:
    from cxr_worker.errors import NotScoredError
    from cxr_worker.labels import Population
    from cxr_worker.pipeline import assess_file

    out: dict[str, Any] = {"path": str(path)}
    try:
        result = assess_file(path, scorer, gate_cfg)
    except NotScoredError as exc:
        refused = {**out, "scored": False, "reason": exc.reason,
                   "rule": getattr(exc, "rule", None)}
        population = getattr(exc, "population", None)
        if population:  # refused for its population (rule patient_age)
            refused["population"] = population
        return refused
    except OSError as exc:
        return {**out, "scored": False, "reason": f"cannot read: {exc.strerror or exc}",
                "rule": None}
    sc = result.score
    if result.gate is not None:
        population, population_text = str(result.gate.population), result.gate.population_text
    else:  # PNG/JPEG: no header, no age
        population = str(Population.UNKNOWN)
        population_text = f"{Population.UNKNOWN.text} (no DICOM header, no patient age)"
    out.update(scored=True, probability=sc.probability, label=sc.label,
               population=population, population_text=population_text,
               threshold=sc.threshold, threshold_source=sc.threshold_source,
               model_version=sc.model_version)
    return out


def cmd_score(args: argparse.Namespace) -> int:
    from cxr_worker.labels import format_probability, format_threshold
    from cxr_worker.service import existing_worklist, gate_config, load_scorer

    s = _settings(args)
    scorer = load_scorer(s, existing_worklist(s))
    gate_cfg = gate_config(s)
    paths: list[Path] = []
    for p in map(Path, args.paths):
        paths.extend(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
    failures = 0
    for p in paths:
        res = _score_one(p, scorer, gate_cfg)
        failures += not res["scored"]
        if args.json:
            _print_json(res)
        elif res["scored"]:
            print(f"{p}: {res['label']} | {res['population_text']} | "
                  f"p={format_probability(res['probability'])} "
                  f"(threshold {format_threshold(res['threshold'])}, "
                  f"{res['threshold_source']}; {res['model_version']})")
        else:
            print(f"{p}: NOT SCORED: {res['reason']}")
    return EXIT_FAILED if failures else EXIT_OK


# -- replay -----------------------------------------------------------------------------
def cmd_replay(args: argparse.Namespace) -> int:
    from cxr_worker import replay
    from cxr_worker.labels import format_probability

    s = _settings(args)
    since = _parse_since(args.since) if args.since else None
    if args.since and since is None:
        return EXIT_USAGE
    results = replay.run(s, paths=[Path(p) for p in args.paths], study=args.study, since=since,
                         dry_run=args.dry_run, send=not args.no_send)
    for r in results:
        if args.json:
            _print_json(r)
        else:
            shown = {k: repr(format_probability(v)) if k == "probability" else v
                     for k, v in r.items() if v is not None}  # probability='> 0.99'
            print(" ".join(f"{k}={v}" for k, v in shown.items()))
    if not results:
        print("nothing to replay", file=sys.stderr)
        return EXIT_FAILED
    bad = [r for r in results if r.get("status") in ("failed", "not_scored", "error")]
    return EXIT_FAILED if bad else EXIT_OK


# -- model --------------------------------------------------------------------------------
def _missing_train_extra(command: str) -> bool:
    """True (with a message) when the training extra is not installed."""
    import importlib.util

    missing = [m for m in ("tensorflow", "sklearn", "matplotlib")
               if importlib.util.find_spec(m) is None]
    if missing:
        print(f"{command} needs the training tools ({', '.join(missing)} missing): "
              "pip install 'cxr-worker[train]'", file=sys.stderr)
    return bool(missing)


def cmd_train(args: argparse.Namespace) -> int:
    if _missing_train_extra("train"):
        return EXIT_USAGE
    from cxr_worker.training.train import TrainConfig, run

    run(TrainConfig(
        data_dir=Path(args.data), weights=Path(args.weights), out_dir=Path(args.out),
        alpha=args.alpha, head_epochs=args.head_epochs, finetune_epochs=args.finetune_epochs,
        batch_size=args.batch_size, seed=args.seed, val_fraction=args.val_fraction,
        min_sensitivity=args.min_sensitivity, max_images=args.max_images,
        steps_per_epoch=args.steps_per_epoch))
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    if _missing_train_extra("evaluate"):
        return EXIT_USAGE
    from cxr_worker.training.evaluate import evaluate

    s = _settings(args)
    result = evaluate(Path(args.data), Path(args.out) if args.out else None,
                      s.model.path or None, s.model.threshold, shifts=args.shifts)
    _print_json(result) if args.json else print(json.dumps(result, indent=2))
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    from cxr_worker import calibrate
    from cxr_worker.errors import CalibrationError
    from cxr_worker.service import existing_worklist, gate_config, load_scorer

    s = _settings(args)
    engine = open_worklist(s) if args.apply else existing_worklist(s)
    scorer = load_scorer(s, engine)
    try:
        rep = calibrate.calibrate(Path(args.data), scorer, gate_config(s),
                                  args.target_sensitivity)
    except CalibrationError as exc:
        print(f"calibrate: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.apply:
        row = calibrate.apply(engine, rep)
        from cxr_worker.worklist import site

        rep["applied"] = {"id": row.id, "description": site.describe(row),
                          "created_at": row.created_at.isoformat()}
    if args.json:
        _print_json(rep)
        return EXIT_OK
    n = rep["n"]
    print(f"{rep['data']}: {n['NORMAL']} NORMAL, {n['PNEUMONIA']} PNEUMONIA scored; "
          f"{n['refused']} refused by the gate; {n['skipped_not_images']} non-image files "
          f"skipped; AUC {rep['auc']:.3f}")
    for r in rep["refused"]:
        print(f"  refused: {r['path']}: {r['reason']}")
    lo, hi = rep["threshold_ci95"]
    print(f"site threshold for sensitivity >= {rep['target_sensitivity']:.2f}: "
          f"{rep['threshold']:.4f} (bootstrap 95% CI {lo:.4f}-{hi:.4f})")
    for title, key in (("at the site threshold", "at_site_threshold"),
                       ("at the model card's threshold", "at_model_threshold")):
        op = rep[key]
        print(f"  {title} {op['threshold']:.4f}: sensitivity {op['sensitivity']:.3f} "
              f"({op['sensitivity_ci95'][0]:.3f}-{op['sensitivity_ci95'][1]:.3f}), "
              f"specificity {op['specificity']:.3f} ({op['specificity_ci95'][0]:.3f}-"
              f"{op['specificity_ci95'][1]:.3f}), positive rate {op['positive_rate']:.2f}")
    if args.apply:
        print(f"applied: {rep['threshold']:.2f} ({rep['applied']['description']}); the service "
              "uses it from its next start, score and replay at once")
    else:
        print("not applied (use --apply to record it as this site's threshold)")
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    from cxr_worker import stats
    from cxr_worker.model import card as model_card
    from cxr_worker.score import SHIPPED_MODEL_DIR
    from cxr_worker.worklist import site

    s = _settings(args)
    since = _parse_since(args.since) if args.since else None
    if args.since and since is None:
        return EXIT_USAGE
    card = model_card.load_card(s.model.path or SHIPPED_MODEL_DIR)
    engine = open_worklist(s)
    site_row = site.latest(engine, card["model_version"]) if s.model.threshold is None else None
    st = stats.compute(engine, card, card["model_version"], since, site_row)
    if args.json:
        _print_json(st)
    else:
        print("\n".join(stats.render(st)))
    return EXIT_OK


# -- parser -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="TOML settings file (default: $CXR_WORKER_CONFIG)")
    common.add_argument("--log-level", default=argparse.SUPPRESS,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p = argparse.ArgumentParser(
        prog="cxr-worker", parents=[common],
        description="Chest X-ray pneumonia triage worker (DICOM in, Secondary Capture out).")
    p.add_argument("--version", action="version", version=f"cxr-worker {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_service_commands(sub, common)
    _add_model_commands(sub, common)
    return p


def _add_service_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    sp = sub.add_parser("serve", parents=[common], help="run the listener and the jobs")
    sp.add_argument("--no-migrate", action="store_true",
                    help="do not upgrade the database schema at start-up")
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("echo", parents=[common], help="C-ECHO the configured PACS")
    sp.add_argument("--self", action="store_true", help="C-ECHO this worker's listener instead")
    sp.set_defaults(func=cmd_echo)

    from cxr_worker.worklist.studies import STATUS_FILTERS

    sp = sub.add_parser("worklist", parents=[common],
                        help="the triage list: suspected pneumonia first")
    sp.add_argument("--status", choices=STATUS_FILTERS)
    sp.add_argument("--limit", type=int, default=50)
    sp.add_argument("--since", metavar="TIME",
                    help="only studies with an image received since this ISO time (UTC unless "
                    "it names a zone), e.g. the start of the reading shift")
    sp.add_argument("--json", action="store_true", help="one JSON object per line")
    sp.set_defaults(func=cmd_worklist)

    sp = sub.add_parser("replay", parents=[common],
                        help="push stored or given images through the pipeline again")
    sp.add_argument("paths", nargs="*", metavar="FILE|DIR")
    sp.add_argument("--study", metavar="UID", help="every stored image of this study")
    sp.add_argument("--since", metavar="TIME", help="every stored image received since "
                    "this ISO time (UTC unless it names a zone)")
    sp.add_argument("--dry-run", action="store_true", help="list what would be replayed")
    sp.add_argument("--no-send", action="store_true",
                    help="build the results but do not send them (status 'held')")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_replay)

    sp = sub.add_parser("score", parents=[common],
                        help="score DICOM, PNG or JPEG files without the service")
    sp.add_argument("paths", nargs="+", metavar="PATH")
    sp.add_argument("--json", action="store_true", help="one JSON object per input")
    sp.set_defaults(func=cmd_score)

    sp = sub.add_parser("db", parents=[common], help="database schema")
    dbsub = sp.add_subparsers(dest="db_command", required=True)
    up = dbsub.add_parser("upgrade", parents=[common], help="apply migrations (Alembic)")
    up.add_argument("revision", nargs="?", default="head")
    dbsub.add_parser("current", parents=[common], help="show the schema revision")
    sp.set_defaults(func=cmd_db)


def _add_model_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    sp = sub.add_parser("train", parents=[common], help="train the pneumonia model")
    sp.add_argument("--data", required=True, help="folder with NORMAL/ and PNEUMONIA/")
    sp.add_argument("--weights", required=True, help="MobileNetV2 ImageNet no_top .h5 file")
    sp.add_argument("--out", required=True, help="output folder (model, TFLite, card)")
    sp.add_argument("--alpha", type=float, default=0.5)
    sp.add_argument("--head-epochs", type=int, default=2)
    sp.add_argument("--finetune-epochs", type=int, default=3)
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--val-fraction", type=float, default=0.15)
    sp.add_argument("--min-sensitivity", type=float, default=0.98)
    sp.add_argument("--max-images", type=int, help="train on a stratified subset (smoke runs)")
    sp.add_argument("--steps-per-epoch", type=int, help="cap batches per epoch (smoke runs)")
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser(
        "calibrate", parents=[common],
        help="choose this site's threshold on its own labelled images",
        description="Score the site's labelled images through the service's own path (gate "
        "included) and choose the most specific threshold that keeps the target sensitivity. "
        "Needs at least 50 scored images of each class. Exit 0 on success, 1 when the data "
        "cannot give a threshold, 2 on usage errors.")
    sp.add_argument("--data", required=True, metavar="DIR|CSV",
                    help="folder with NORMAL/ and PNEUMONIA/ (DICOM, PNG or JPEG), or a CSV of "
                    "path,label (label NORMAL/PNEUMONIA or 0/1; paths relative to the CSV)")
    sp.add_argument("--target-sensitivity", type=float, default=0.98,
                    help="sensitivity the threshold must keep on the site's pneumonias "
                    "(default: %(default)s)")
    sp.add_argument("--apply", action="store_true",
                    help="record the threshold in the worklist database as the site's")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_calibrate)

    sp = sub.add_parser("stats", parents=[common],
                        help="statuses, positive rate and score histogram (drift check)")
    sp.add_argument("--since", metavar="TIME",
                    help="only images received since this ISO time (UTC unless it names a zone)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_stats)

    sp = sub.add_parser("evaluate", parents=[common],
                        help="metrics and plots of the model on a NORMAL/PNEUMONIA folder")
    sp.add_argument("--data", required=True)
    sp.add_argument("--out", help="folder for metrics.json and the PNG plots")
    sp.add_argument("--shifts", action="store_true",
                    help="also score under simulated acquisition shifts (gamma, blur, JPEG...)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_evaluate)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("pynetdicom", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # a wake-up while the drain job runs is "skipped: maximum number of running instances",
    # expected every time images arrive faster than they are scored; job errors stay visible
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    # pydicom's warnings about invalid values quote the value, which may be a patient's name
    # or ID: keep them out of the logs (our own messages name UIDs only)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"cxr-worker: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CxrWorkerError as exc:
        print(f"cxr-worker: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

"""``cxr-worker``: the command line (the composition root for one-shot commands).

Exit codes: 0 success; 1 the command ran but something failed (an input not scored, a peer
that did not answer, a replay with failures); 2 usage or configuration errors.

Every failure a user can cause ends as ONE line on stderr naming the key, path, port or URL and
what to do (:func:`main` catches the worker's error tree, :mod:`cxr_worker.errors`); the
traceback is logged only with ``--log-level DEBUG``.

Text output shows what a sender wrote (accession numbers, UIDs, gate reasons, file names)
through :func:`cxr_worker.text.escape_text`: an escape sequence in an accession number is
shown as ``\\x1b``, never sent to the reader's terminal. ``--json`` output is escaped by
``json.dumps`` (ESC as ``\\u001b``).

Files are private: every command but ``train`` and ``evaluate`` runs with umask 077, so what
it creates under ``storage.data_dir`` (spooled images, results, quarantine, the SQLite
worklist and its -wal/-shm) is mode 0600 in folders of mode 0700: patient data, whatever
umask the shell or unit started it with (the systemd unit sets ``UMask=0077`` too).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxr_worker import __version__, logs
from cxr_worker.errors import ConfigError, CxrWorkerError, StartupError
from cxr_worker.settings import CONFIG_ENV, ENV_PREFIX, Settings, load_settings
from cxr_worker.text import escape_text

logger = logging.getLogger("cxr_worker")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(getattr(args, "config", None))


def _log_format(args: argparse.Namespace) -> str:
    """``[logging] format``, read before the command runs so every record has that form;
    "text" when the settings are invalid (the command then reports them, one line)."""
    try:
        return _settings(args).logging.format
    except CxrWorkerError:
        return "text"


def _err(message: str, level: int = logging.ERROR) -> None:
    """One line for the user on stderr (a JSON log record with ``[logging] format = "json"``,
    so stderr stays JSON lines); escaped, as it may quote a file name or a sender's value."""
    if logs.json_enabled():
        logger.log(level, "%s", message)
    else:
        print(escape_text(message), file=sys.stderr, flush=True)


def open_worklist(s: Settings) -> Any:
    from cxr_worker import compose

    return compose.open_worklist(s)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, sort_keys=False), flush=True)


# -- serve / echo / db ------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from cxr_worker.service import serve
    from cxr_worker.settings import job_roles

    s = _settings(args)
    if args.role is not None:
        s.jobs.role = args.role
        try:
            job_roles(s)
        except ValueError as exc:
            _err(f"--role {exc}")
            return EXIT_USAGE
    return serve(s, migrate=not args.no_migrate)


def cmd_echo(args: argparse.Namespace) -> int:
    from cxr_worker import send
    from cxr_worker.tls import pacs_peer, self_peer

    s = _settings(args)
    peer = self_peer(s, "CXR_ECHO", s.pacs.timeout_seconds) if args.self else pacs_peer(s)
    if peer is None:
        _err("no PACS configured: set [pacs] ae_title, host and port (or use --self)")
        return EXIT_USAGE
    target = f"{peer.ae_title}@{peer.host}:{peer.port}"
    try:
        send.echo(peer)
    except CxrWorkerError as exc:
        _err(f"C-ECHO {target} failed: {exc}")
        return EXIT_FAILED
    print(f"C-ECHO {target}: success")
    return EXIT_OK


def cmd_db(args: argparse.Namespace) -> int:
    from cxr_worker.compose import prepare_data_dir
    from cxr_worker.worklist import queue, schema

    s = _settings(args)
    if not s.database.url:
        prepare_data_dir(s)
    with schema.named_errors(s.database_url):
        schema.ensure_sqlite_folder(s.database_url)
        engine = queue.make_engine(s.database_url)
        if args.db_command == "upgrade":
            rev = schema.upgrade(engine, args.revision)
            print(f"database at revision {rev} (head {schema.head_revision()})")
        else:
            print(f"database at revision {schema.current_revision(engine)} "
                  f"(head {schema.head_revision()})")
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from cxr_worker import doctor

    # a peer that does not answer is reported on its check's line, not as a logged error
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    failed = False
    for check in doctor.run(getattr(args, "config", None)):
        print(check.line(), flush=True)
        failed = failed or check.status == doctor.FAIL
    return EXIT_FAILED if failed else EXIT_OK


def cmd_conformance(args: argparse.Namespace) -> int:
    from cxr_worker import conformance

    print(conformance.statement(), end="")
    return EXIT_OK


# -- worklist ---------------------------------------------------------------------------
def _t(v: dt.datetime | None) -> str:
    return v.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if v else "-"


def _parse_since(value: str) -> dt.datetime | None:
    """ISO date/time, UTC unless it names a zone; None (with a message) when unreadable."""
    try:
        since = dt.datetime.fromisoformat(value)
    except ValueError:
        _err(f"--since: not an ISO date/time: {value!r}")
        return None
    return since if since.tzinfo else since.replace(tzinfo=dt.UTC)


def existing_worklist(args: argparse.Namespace, s: Settings, command: str) -> Any:
    """The worklist's engine; a :class:`StartupError` (exit 2) naming the database and the
    settings read when it does not exist yet: a command run from another folder, or with
    other settings than the service, must not create an empty worklist and show nothing."""
    from cxr_worker.compose import existing_worklist as existing

    engine = existing(s)
    if engine is None:
        from sqlalchemy import make_url

        config = getattr(args, "config", None) or os.environ.get(CONFIG_ENV)
        read = (f"settings from {config}" if config else
                f"no settings file read (built-in defaults; pass --config or set {CONFIG_ENV})")
        raise StartupError(
            f"{command}: no worklist database at {make_url(s.database_url).database} "
            f"({read}; storage.data_dir {s.data_dir}): use the service's settings "
            "(--config), or create it with 'cxr-worker db upgrade' or by starting "
            "'cxr-worker serve'")
    return engine


def cmd_worklist(args: argparse.Namespace) -> int:
    from cxr_worker.worklist import studies

    s = _settings(args)
    since = _parse_since(args.since) if args.since else None
    if args.since and since is None:
        return EXIT_USAGE
    if args.limit < 0:
        _err("--limit: must be 0 (all) or more")
        return EXIT_USAGE
    engine = existing_worklist(args, s, "worklist")
    filters = studies.Filters(status=args.status, since=since, accession=args.accession,
                              band=args.band, read=args.read)
    try:
        page = studies.list_studies(engine, filters, args.limit or None, args.cursor)
    except ValueError as exc:  # the cursor
        _err(f"--{exc}")
        return EXIT_USAGE
    rows = page.rows
    more = (f"more rows: use --cursor {page.next} for the next {args.limit}, or a larger "
            "--limit (0: all)") if page.next else None
    if args.json:
        for r in rows:
            _print_json(r.as_json())
        if more:  # stdout stays one study per line
            _err(more, logging.INFO)
        return EXIT_OK
    from cxr_worker.labels import Population, format_probability

    # the population beside the label: a result is only as good as the population it was
    # validated on (shown for studies with a result; "-" for pending, refused, failed)
    header = f"{'RESULT':<22} {'POPULATION':<28} {'PROB':>6} {'STATUS':<11} " \
             f"{'ACCESSION':<16} {'RECEIVED':<19} {'SCORED':<19} {'SENT':<19} " \
             "STUDY INSTANCE UID / MODEL / DELIVERIES / REASON"
    print(header)
    for r in rows:
        prob = format_probability(r.probability) if r.probability is not None else "-"
        population = Population(r.population).text if r.probability is not None else "-"
        extra = r.model_version or ""
        if r.deliveries:
            extra += " [" + ", ".join(_delivery_text(d) for d in r.deliveries) + "]"
        if r.reason and r.status != "sent":
            extra += f" ({r.reason})"
        label = r.label if r.status != "not_scored" else "NOT SCORED"
        # the accession, the UID and the reason are the sender's text: escaped
        accession = escape_text(r.accession_number or "-")
        print(f"{label:<22} {population:<28} {prob:>6} {r.status:<11} "
              f"{accession:<16} {_t(r.received_at):<19} {_t(r.scored_at):<19} "
              f"{_t(r.sent_at):<19} {escape_text(r.study_instance_uid)} "
              f"{escape_text(extra)}".rstrip())
    if not rows:
        print("(no studies)")
    if more:
        print(more)
    return EXIT_OK


def _delivery_text(d: dict[str, Any]) -> str:
    """``sc sent``, ``sr retrying (3 attempts)``, ``hl7 UNDELIVERED after 10 attempts: ...``."""
    status, attempts = d["status"], d["attempts"]
    if status == "failed":
        return f"{d['kind']} UNDELIVERED after {attempts} attempts: {d['last_error'] or '?'}"
    if status == "retrying":
        return f"{d['kind']} retrying ({attempts} attempts: {d['last_error'] or '?'})"
    return f"{d['kind']} {status}"


def _outputs_text(items: list[dict[str, Any]]) -> str:
    """A replay report's deliveries on one line: ``sc:sent:1.2.3,hl7:retrying:ab12...``."""
    return ",".join(f"{d['kind']}:{d['status']}:{d['result_uid']}" for d in items)


# -- retry ------------------------------------------------------------------------------
def cmd_retry(args: argparse.Namespace) -> int:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from cxr_worker.worklist import control, deliveries, queue
    from cxr_worker.worklist.models import Instance, Status

    s = _settings(args)
    engine = existing_worklist(args, s, "retry")
    if args.sop:
        try:
            what = control.retry_dead_letter(engine, args.sop)
        except ValueError as exc:
            _err(f"retry: {args.sop}: {exc}")
            return EXIT_FAILED
        if what is None:
            _err(f"retry: no image {args.sop} in the worklist")
            return EXIT_FAILED
        print(f"{escape_text(args.sop)}: queued again ({what}); the running service "
              f"{'sends' if what == 'send' else 'processes'} it")
        return EXIT_OK
    with Session(engine) as session:
        q = select(Instance.id, Instance.status)
        if args.study:
            q = q.where(Instance.study_instance_uid == args.study)
        rows = session.execute(q).all() if args.study else session.execute(
            q.where(Instance.status == Status.FAILED)).all()
    if args.study and not rows:
        _err(f"retry: no study {args.study} in the worklist")
        return EXIT_FAILED
    ids = [i for i, _ in rows]
    sent = deliveries.retry_failed(engine, instance_ids=ids if args.study else None)
    failed = [i for i, st in rows if st == Status.FAILED]
    processed = queue.requeue(engine, failed) if failed else 0
    if not sent and not processed:
        _err("retry: nothing failed" + (f" in study {args.study}" if args.study else ""))
        return EXIT_FAILED
    print(f"queued again: {sent} deliveries to send, {processed} images to process; the "
          "running service does it")
    return EXIT_OK


# -- web, tokens ------------------------------------------------------------------------
def cmd_web(args: argparse.Namespace) -> int:
    from cxr_worker.web.app import run_web

    s = _settings(args)
    if not s.http.enabled:
        _err("web: http.enabled is false: nothing to serve (set http.enabled = true)")
        return EXIT_USAGE
    return run_web(s, existing_worklist(args, s, "web"))


def cmd_token(args: argparse.Namespace) -> int:
    from cxr_worker.worklist import tokens

    s = _settings(args)
    engine = existing_worklist(args, s, f"token {args.token_command}")
    if args.token_command == "create":
        try:
            token = tokens.create(engine, args.name, args.role)
        except ValueError as exc:
            _err(f"token create: {exc}")
            return EXIT_USAGE
        print(token, flush=True)  # the token alone, once: only its hash is kept
        return EXIT_OK
    if args.token_command == "revoke":
        try:
            revoked = tokens.revoke(engine, args.name)
        except LookupError as exc:
            _err(f"token revoke: {exc}")
            return EXIT_USAGE
        print(f"token {escape_text(args.name)} "
              f"{'revoked' if revoked else 'was revoked already'}; its sessions are ended")
        return EXIT_OK
    rows = tokens.list_tokens(engine)
    if args.json:
        for t in rows:
            _print_json(t.as_json())
        return EXIT_OK
    print(f"{'NAME':<24} {'ROLE':<7} {'CREATED':<19} {'LAST USED':<19} REVOKED")
    for t in rows:
        print(f"{escape_text(t.name):<24} {t.role:<7} {_t(t.created_at):<19} "
              f"{_t(t.last_used_at):<19} {_t(t.revoked_at)}")
    if not rows:
        print("(no tokens: cxr-worker token create --name NAME --role reader|admin)")
    return EXIT_OK


# -- score ------------------------------------------------------------------------------
def _score_one(path: Path, scorer: Any, gate_cfg: Any) -> dict[str, Any]:
    from cxr_worker.assess import assess_file
    from cxr_worker.errors import NotScoredError
    from cxr_worker.labels import Population

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
    from cxr_worker import inputs
    from cxr_worker.compose import existing_worklist, gate_config, load_scorer
    from cxr_worker.labels import format_probability, format_threshold

    s = _settings(args)
    # folders: DICOM (by its preamble), PNG and JPEG only; files named here are all tried
    paths, skipped = inputs.expand(map(Path, args.paths), inputs.is_image_input, "score")
    if skipped:
        _err(inputs.skipped_line(skipped, "not DICOM, PNG or JPEG"), logging.WARNING)
    scorer = load_scorer(s, existing_worklist(s))
    gate_cfg = gate_config(s)
    failures = 0
    for p in paths:
        res: dict[str, Any]
        if not inputs.is_image_input(p):
            res = {"path": str(p), "scored": False, "reason": inputs.NOT_AN_IMAGE, "rule": None}
        else:
            res = _score_one(p, scorer, gate_cfg)
        failures += not res["scored"]
        if args.json:
            _print_json(res)
        elif res.get("reason") == inputs.NOT_AN_IMAGE:
            _err(f"{p}: {inputs.NOT_AN_IMAGE}")
        elif res["scored"]:
            print(f"{escape_text(str(p))}: {res['label']} | {res['population_text']} | "
                  f"p={format_probability(res['probability'])} "
                  f"(threshold {format_threshold(res['threshold'])}, "
                  f"{res['threshold_source']}; {res['model_version']})")
        else:
            print(escape_text(f"{p}: NOT SCORED: {res['reason']}"))
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
                         dry_run=args.dry_run, send=not args.no_send, notify=_err)
    for r in results:
        if args.json:
            _print_json(r)
        else:
            shown = {k: repr(format_probability(v)) if k == "probability" else
                     _outputs_text(v) if k in ("deliveries", "superseded") else v
                     for k, v in r.items() if v is not None}  # probability='> 0.99'
            print(" ".join(f"{k}={escape_text(str(v))}" for k, v in shown.items()))
    if not results:
        _err("nothing to replay")
        return EXIT_FAILED
    bad = [r for r in results
           if r.get("status") in ("failed", "undelivered", "not_scored", "error")]
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
    from cxr_worker.training.train import MemberSpec, TrainConfig, run

    try:
        members = MemberSpec.parse(args.members)
    except ValueError as exc:
        print(f"--members {args.members!r}: {exc} (expected e.g. 0.5:2,0.5:1)", file=sys.stderr)
        return EXIT_USAGE
    run(TrainConfig(
        data_dir=Path(args.data), weights=Path(args.weights), out_dir=Path(args.out),
        head_epochs=args.head_epochs, finetune_epochs=args.finetune_epochs,
        batch_size=args.batch_size, seed=args.seed, val_fraction=args.val_fraction,
        min_sensitivity=args.min_sensitivity, max_images=args.max_images,
        steps_per_epoch=args.steps_per_epoch), members)
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    if _missing_train_extra("evaluate"):
        return EXIT_USAGE
    from cxr_worker.compose import model_dir
    from cxr_worker.training.evaluate import evaluate

    s = _settings(args)
    result = evaluate(Path(args.data), Path(args.out) if args.out else None,
                      str(model_dir(s)), s.model.threshold, shifts=args.shifts,
                      progress=logs.progress_enabled())
    _print_json(result) if args.json else print(json.dumps(result, indent=2))
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    from cxr_worker import calibrate
    from cxr_worker.compose import existing_worklist, gate_config, load_scorer
    from cxr_worker.errors import CalibrationError

    s = _settings(args)
    engine = open_worklist(s) if args.apply else existing_worklist(s)
    scorer = load_scorer(s, engine)
    try:
        rep = calibrate.calibrate(Path(args.data), scorer, gate_config(s),
                                  args.target_sensitivity)
    except CalibrationError as exc:
        _err(f"calibrate: {exc}")
        return EXIT_FAILED
    if args.apply:
        row = calibrate.apply(engine, rep)
        from cxr_worker.worklist import site

        rep["applied"] = {"id": row.id, "description": site.describe(row),
                          "created_at": row.created_at.isoformat()}
    if args.json:
        _print_json(rep)
        return EXIT_OK
    n, data = rep["n"], escape_text(str(rep["data"]))
    print(f"{data}: {n['NORMAL']} NORMAL, {n['PNEUMONIA']} PNEUMONIA scored; "
          f"{n['refused']} refused by the gate; {n['skipped_not_images']} non-image files "
          f"skipped; AUC {rep['auc']:.3f}")
    for r in rep["refused"]:
        print(escape_text(f"  refused: {r['path']}: {r['reason']}"))
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
    from cxr_worker.compose import model_dir
    from cxr_worker.model import card as model_card
    from cxr_worker.worklist import site

    s = _settings(args)
    since = _parse_since(args.since) if args.since else None
    if args.since and since is None:
        return EXIT_USAGE
    card = model_card.load_card(model_dir(s))
    engine = open_worklist(s)
    site_row = site.latest(engine, card["model_version"]) if s.model.threshold is None else None
    st = stats.compute(engine, card, card["model_version"], since, site_row)
    if args.json:
        _print_json(st)
    else:
        print("\n".join(escape_text(line) for line in stats.render(st)))  # reasons: escaped
    return EXIT_OK


# -- parser -----------------------------------------------------------------------------
EPILOG = f"""\
environment:
  {CONFIG_ENV}      the TOML settings file when --config is not given
  {ENV_PREFIX}<SECTION>__<KEY>
                         any setting, over the file's (lists comma-separated),
                         e.g. {ENV_PREFIX}PACS__HOST=pacs.example.org,
                         {ENV_PREFIX}LOGGING__FORMAT=json

exit codes:
  0  success
  1  the command ran but something failed (an input not scored, a peer
     that did not answer, a database server not answering, a replay with
     failures, a model file whose sha256 differs from its card)
  2  usage or configuration errors: an invalid setting, or one naming what
     cannot be used (data_dir, port, database URL, model folder, input file)

Errors are one line on stderr; --log-level DEBUG adds the traceback.
"""


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default, and keeps the line breaks of descriptions and epilogs
    (each line wrapped on its own)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if ("%(default)" not in text and default is not None and default is not False
                and default is not argparse.SUPPRESS
                and (action.option_strings or action.nargs in ("?", "*"))):
            text += " (default: %(default)s)"
        return text

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        # unindented lines are paragraphs (wrapped); indented ones are laid out already
        return "\n".join(
            textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
            if line and not line[0].isspace() else indent + line
            for line in text.splitlines())


class _Parser(argparse.ArgumentParser):
    """Every parser and sub-parser of the CLI shows defaults (:class:`_HelpFormatter`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help=f"TOML settings file (default: ${CONFIG_ENV}, else built-in "
                        "defaults)")
    common.add_argument("--log-level", default=argparse.SUPPRESS,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level (default: INFO); DEBUG also shows tracebacks")
    p = _Parser(
        prog="cxr-worker", parents=[common], epilog=EPILOG,
        description="Chest X-ray pneumonia triage worker (DICOM in, Secondary Capture out).")
    p.add_argument("--version", action="version", version=f"cxr-worker {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_service_commands(sub, common)
    _add_web_commands(sub, common)
    _add_model_commands(sub, common)
    return p


def _add_service_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    sp = sub.add_parser("serve", parents=[common], help="run the listener and the jobs")
    sp.add_argument("--no-migrate", action="store_true",
                    help="do not upgrade the database schema at start-up")
    sp.add_argument("--role", default=None, metavar="ROLE",
                    help="all (default: jobs.role), or receive, process, send, "
                    "comma-separated: several processes share one PostgreSQL worklist and "
                    "one data_dir (README: Scaling out)")
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("echo", parents=[common], help="C-ECHO the configured PACS")
    sp.add_argument("--self", action="store_true", help="C-ECHO this worker's listener instead")
    sp.set_defaults(func=cmd_echo)

    from cxr_worker.worklist.studies import BANDS, READ_FILTERS, STATUS_FILTERS

    sp = sub.add_parser("worklist", parents=[common],
                        help="the triage list: suspected pneumonia first")
    sp.add_argument("--status", choices=STATUS_FILTERS, help="only studies in this status")
    sp.add_argument("--band", choices=BANDS, help="only this band of the list")
    sp.add_argument("--limit", type=int, default=50,
                    help="at most this many studies (0: all); a last line says when there "
                    "are more")
    sp.add_argument("--cursor", help="continue after the page that printed it")
    sp.add_argument("--since", metavar="TIME",
                    help="only studies with an image received since this ISO time (UTC unless "
                    "it names a zone), e.g. the start of the reading shift")
    sp.add_argument("--accession", help="only the study with this accession number")
    sp.add_argument("--read", choices=READ_FILTERS, default="unread",
                    help="studies marked read on the web page leave the list; 'all' shows "
                    "them too")
    sp.add_argument("--json", action="store_true", help="one JSON object per line (the "
                    "'more rows' line goes to stderr)")
    sp.set_defaults(func=cmd_worklist)

    sp = sub.add_parser(
        "retry", parents=[common],
        help="queue dead letters again: undelivered results (sent again, not rebuilt) and "
        "images whose processing failed",
        description="Queue again what failed for good: deliveries dead-lettered after "
        "jobs.max_attempts (the results are sent again as they were built) and images whose "
        "processing failed (processed again). The running 'serve' does the work. Exit 1 when "
        "there was nothing to retry.")
    which = sp.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", metavar="UID", help="the failures of this study")
    which.add_argument("--sop", metavar="UID", help="the failures of this image")
    which.add_argument("--all-failed", action="store_true", help="every failure")
    sp.set_defaults(func=cmd_retry)

    sp = sub.add_parser("replay", parents=[common],
                        help="push stored or given images through the pipeline again")
    sp.add_argument("paths", nargs="*", metavar="FILE|DIR",
                    help="DICOM files, or folders (their DICOM files; others are skipped)")
    sp.add_argument("--study", metavar="UID", help="every stored image of this study")
    sp.add_argument("--since", metavar="TIME", help="every stored image received since "
                    "this ISO time (UTC unless it names a zone)")
    sp.add_argument("--dry-run", action="store_true", help="list what would be replayed")
    sp.add_argument("--no-send", action="store_true",
                    help="build the results but do not send them (status 'held')")
    sp.add_argument("--json", action="store_true", help="one JSON object per image")
    sp.set_defaults(func=cmd_replay)

    sp = sub.add_parser("score", parents=[common],
                        help="score DICOM, PNG or JPEG files without the service")
    sp.add_argument("paths", nargs="+", metavar="PATH",
                    help="DICOM, PNG or JPEG files, or folders (their DICOM, PNG and JPEG "
                    "files; others are skipped)")
    sp.add_argument("--json", action="store_true", help="one JSON object per input")
    sp.set_defaults(func=cmd_score)

    sp = sub.add_parser("db", parents=[common], help="database schema")
    dbsub = sp.add_subparsers(dest="db_command", required=True)
    up = dbsub.add_parser("upgrade", parents=[common], help="apply migrations (Alembic)")
    up.add_argument("revision", nargs="?", default="head", help="Alembic revision")
    dbsub.add_parser("current", parents=[common], help="show the schema revision")
    sp.set_defaults(func=cmd_db)

    sp = sub.add_parser("doctor", parents=[common],
                        help="check config, port, database, disk, model and PACS (exit 1 on "
                        "any FAIL)")
    sp.set_defaults(func=cmd_doctor)

    sp = sub.add_parser("conformance", parents=[common],
                        help="print the DICOM conformance statement (Markdown)")
    sp.set_defaults(func=cmd_conformance)


def _add_web_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    sp = sub.add_parser("web", parents=[common],
                        help="serve the web worklist and its API alone (no listener, no "
                        "model), against the configured database")
    sp.set_defaults(func=cmd_web)

    sp = sub.add_parser("token", parents=[common], help="API tokens of the web worklist")
    tsub = sp.add_subparsers(dest="token_command", required=True)
    tc = tsub.add_parser("create", parents=[common],
                         help="print a new token (once; only its hash is kept)")
    tc.add_argument("--name", required=True,
                    help="who the token is (recorded when a study is marked read); never "
                    "reused")
    tc.add_argument("--role", required=True, choices=("reader", "admin"),
                    help="reader: the list and marking read; admin: also replay, retry, "
                    "pause and resume sending")
    tl = tsub.add_parser("list", parents=[common], help="the tokens (never the tokens "
                         "themselves)")
    tl.add_argument("--json", action="store_true", help="one JSON object per line")
    tr = tsub.add_parser("revoke", parents=[common], help="revoke a token and end its sessions")
    tr.add_argument("name", help="the token's name")
    sp.set_defaults(func=cmd_token)


def _default_members() -> tuple[Any, ...]:
    # the recipe is data, not TensorFlow: importing train.py does not import TensorFlow
    from cxr_worker.training.train import DEFAULT_MEMBERS

    return DEFAULT_MEMBERS


def _add_model_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    sp = sub.add_parser("train", parents=[common], help="train the pneumonia model")
    sp.add_argument("--data", required=True, help="folder with NORMAL/ and PNEUMONIA/")
    sp.add_argument("--weights", required=True,
                    help="MobileNetV2 ImageNet no_top .h5 file, or a folder holding them under "
                    "their official names (one per alpha of --members)")
    sp.add_argument("--out", required=True, help="output folder (model, TFLite, card)")
    sp.add_argument("--members", default=",".join(
        f"{m.alpha:g}:{m.preprocessing_version}" for m in _default_members()),
        help="networks of the ensemble as alpha:contract_version, comma-separated "
        "(default: %(default)s, the shipped recipe)")
    sp.add_argument("--head-epochs", type=int, default=2,
                    help="epochs training the new head on the frozen backbone")
    sp.add_argument("--finetune-epochs", type=int, default=4,
                    help="epochs fine-tuning the whole backbone (BatchNorm statistics frozen)")
    sp.add_argument("--batch-size", type=int, default=32, help="images per batch")
    sp.add_argument("--seed", type=int, default=0, help="random seed (split, shuffling)")
    sp.add_argument("--val-fraction", type=float, default=0.15,
                    help="share of patients held out for validation")
    sp.add_argument("--min-sensitivity", type=float, default=0.98,
                    help="validation sensitivity the card's threshold must keep")
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
    sp.add_argument("--json", action="store_true", help="the report as one JSON object")
    sp.set_defaults(func=cmd_calibrate)

    sp = sub.add_parser("stats", parents=[common],
                        help="statuses, positive rate and score histogram (drift check)")
    sp.add_argument("--since", metavar="TIME",
                    help="only images received since this ISO time (UTC unless it names a zone)")
    sp.add_argument("--json", action="store_true", help="one JSON object")
    sp.set_defaults(func=cmd_stats)

    sp = sub.add_parser("evaluate", parents=[common],
                        help="metrics and plots of the model on a NORMAL/PNEUMONIA folder")
    sp.add_argument("--data", required=True, help="folder with NORMAL/ and PNEUMONIA/")
    sp.add_argument("--out", help="folder for metrics.json and the PNG plots")
    sp.add_argument("--shifts", action="store_true",
                    help="also score under simulated acquisition shifts (gamma, blur, JPEG...)")
    sp.add_argument("--json", action="store_true", help="the metrics as one JSON line")
    sp.set_defaults(func=cmd_evaluate)


# commands whose files are not patient data and are meant to be shared: a trained model
# folder is installed for the service's user, evaluation plots are read by others
SHARED_OUTPUT_COMMANDS = ("train", "evaluate")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command not in SHARED_OUTPUT_COMMANDS:
        # before anything is created: spool, results, quarantine and the SQLite worklist are
        # patient data, readable by this user only whatever umask the caller had
        os.umask(0o077)
    logs.configure(getattr(args, "log_level", "INFO"), _log_format(args))
    for noisy in ("pynetdicom", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # "skipped: maximum number of running instances" (a C-ECHO or sweep still running when
    # its next run is due) is expected, not a problem; job errors stay visible
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    # pydicom's warnings quote invalid values (a patient's name, birth date): logs.configure
    # keeps them out
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:
        return _fail(*_explain(exc))


def _explain(exc: Exception) -> tuple[str, int]:
    """The line and exit code for an error that reached :func:`main`."""
    if isinstance(exc, ConfigError):
        return f"configuration error: {exc}", EXIT_USAGE
    if isinstance(exc, StartupError):
        return str(exc), EXIT_FAILED if exc.transient else EXIT_USAGE
    if isinstance(exc, CxrWorkerError):
        return str(exc), EXIT_FAILED
    if isinstance(exc, OSError):  # a disk or file problem no stage named: say which file
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}", EXIT_FAILED
    # a bug: one line here too, the traceback with --log-level DEBUG
    return (f"unexpected error {type(exc).__name__}: {exc} (rerun with --log-level DEBUG for "
            "the traceback)", EXIT_FAILED)


def _fail(message: str, code: int) -> int:
    """Print the one line for an error :func:`main` caught (the traceback only at DEBUG)."""
    logger.debug("traceback of the error below", exc_info=True)
    _err(f"cxr-worker: {message}")
    return code


if __name__ == "__main__":
    sys.exit(main())

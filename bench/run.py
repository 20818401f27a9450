"""cxr-worker's peer benchmark: prints figures, asserts nothing (bench/README.md).

    .venv/bin/python bench/run.py [--quick] [--only NAME ...] [--json PATH]

Runs itself in a private network namespace (``unshare -n``, as root): storescp and Orthanc
bind every address, and the concurrent measurement uses source addresses 127.0.0.10-29.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

MEASUREMENTS = ("time_to_flag", "receive", "burst", "concurrent")
NETNS_FLAG = "--in-netns"


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="fewer images and runs (about 4 minutes instead of 15)")
    ap.add_argument("--only", nargs="+", choices=MEASUREMENTS, metavar="NAME",
                    help=f"run only these measurements ({', '.join(MEASUREMENTS)})")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    ap.add_argument("--source", metavar="REV",
                    help="measure a snapshot of this commit (git archive) instead of the "
                         "working tree, e.g. HEAD while the tree is being edited")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    ap.add_argument(NETNS_FLAG, action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def enter_netns(argv: list[str]) -> None:
    """Re-executes this script under ``unshare -n`` unless already there."""
    unshare = shutil.which("unshare") or "/usr/bin/unshare"
    cmd = [unshare, "-n", "--", sys.executable, str(Path(__file__).resolve()), *argv,
           NETNS_FLAG]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(unshare, cmd)
    except OSError as exc:
        sys.exit(f"cannot re-run in a private network namespace ({' '.join(cmd[:3])}): {exc}")


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    from common import REPO

    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    rev = args.source or "HEAD"
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev],
                            capture_output=True, text=True, check=False).stdout.strip() or "?"
    what = (f"a snapshot of {rev} (git archive), not the working tree" if args.source
            else "the working tree as it was at run time")
    storescu = subprocess.run(["/usr/bin/storescu", "--version"], capture_output=True,
                              text=True, check=False).stdout.splitlines()
    orthanc = subprocess.run([shutil.which("Orthanc") or "/usr/sbin/Orthanc", "--version"],
                             capture_output=True, text=True, check=False).stdout.splitlines()
    import pydicom
    import pynetdicom

    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": f"{commit} ({what})",
        "machine": f"{len(os.sched_getaffinity(0))} CPUs (nproc), {platform.machine()}, "
                   f"Linux {platform.release()}",
        "cpu": cpu,
        "memory": mem,
        "mode": "quick" if args.quick else "full",
        "load": f"1-minute load average {os.getloadavg()[0]:.2f} at the start",
        "network": "private network namespace (unshare -n), loopback only",
        "tools": f"{(storescu or ['dcmtk ?'])[0].strip('$ ')}; "
                 f"{(orthanc or ['Orthanc ?'])[0]}; pydicom {pydicom.__version__}, "
                 f"pynetdicom {pynetdicom.__version__}; Python {platform.python_version()}",
    }


def sizes(quick: bool) -> dict[str, int]:
    if quick:
        return {"ttf_n": 8, "recv_m": 20, "recv_repeats": 1, "burst": 40}
    return {"ttf_n": 30, "recv_m": 60, "recv_repeats": 3, "burst": 200}


def run_all(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import measure
    import report
    from common import log
    from images import SYNTAXES, ImageFactory, describe

    n = sizes(args.quick)
    only = list(args.only or MEASUREMENTS)
    info = machine_info(args)
    factory = ImageFactory(tmp / "images")
    img = describe(factory.rows, factory.cols)
    info["images"] = (f"{img['rows']} x {img['cols']} (rows x cols), {img['bits_stored']} bits "
                      f"stored in 16, {img['uncompressed_mb']} MB of pixels, {img['sop_class']}; "
                      f"{factory.distinct} distinct pictures (Kermany validation PNGs, NORMAL/"
                      f"PNEUMONIA alternating), fresh UIDs for every file")
    syntaxes = list(SYNTAXES.values()) if "time_to_flag" in only else [SYNTAXES["explicit-le"]]
    factory.prepare(syntaxes)
    info["encodings"] = "; ".join(factory.notes) or "explicit VR LE only"
    info["image_mb"] = img["uncompressed_mb"]
    ctx = measure.Ctx(tmp, factory, args.quick)
    results: dict[str, Any] = {"info": info, "sizes": n, "errors": {}}
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "time_to_flag": lambda: measure.time_to_flag(ctx, n["ttf_n"]),
        "receive": lambda: measure.receive(ctx, n["recv_m"], n["recv_repeats"]),
        "burst": lambda: measure.burst(ctx, n["burst"]),
        "concurrent": lambda: measure.concurrent(ctx),
    }
    for name in MEASUREMENTS:
        if name not in only:
            continue
        t0 = time.perf_counter()
        log(f"-- {name}")
        try:
            results[name] = steps[name]()
            results[name]["elapsed_s"] = time.perf_counter() - t0
        except Exception as exc:  # one measurement failing never stops the others
            results["errors"][name] = "".join(traceback.format_exception(exc))[-3000:]
            log(f"{name} FAILED: {type(exc).__name__}: {exc}")
        log(f"-- {name} done in {time.perf_counter() - t0:.0f} s")
    results["goals"] = report.goals(results)
    return results


def print_report(res: dict[str, Any]) -> None:
    import report

    report.header(res["info"])
    mb = res["info"].get("image_mb", 10.24)
    printers: dict[str, Callable[[dict[str, Any]], None]] = {
        "time_to_flag": report.print_time_to_flag,
        "receive": lambda r: report.print_receive(r, mb),
        "burst": report.print_burst,
        "concurrent": report.print_concurrent,
    }
    for name in MEASUREMENTS:
        if name in res:
            printers[name](res[name])
            print(f"\n  ({name} took {res[name]['elapsed_s']:.0f} s)")
        if name in res["errors"]:
            report.section(f"{name}: FAILED")
            print(res["errors"][name])
    notes = []
    if res["sizes"]["burst"] != 200 and "burst" in res:
        notes.append(f"--quick: the burst is {res['sizes']['burst']} images, not 200")
    report.print_goals(res["goals"], notes)


def use_snapshot(rev: str, tmp: Path) -> None:
    """Extracts ``rev`` (read-only ``git archive``) and makes it the code measured: first on
    ``sys.path`` and ``PYTHONPATH``, and every process runs from a scratch folder so that
    ``python -m cxr_worker.cli`` never finds the working tree's package first."""
    repo = Path(__file__).resolve().parent.parent
    src = tmp / "src"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", rev],
                             capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
    os.environ["CXR_BENCH_SOURCE"] = str(src)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(src), os.environ.get("PYTHONPATH", "")) if p)
    sys.path.insert(0, str(src))
    scratch = tmp / "cwd"
    scratch.mkdir()
    os.chdir(scratch)


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def main() -> None:
    argv = sys.argv[1:]
    args = parse_args(argv)
    if not args.in_netns:
        enter_netns(argv)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    # SIGTERM ends the run through the ``finally`` blocks: every process started is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-"))
    if args.json is not None:
        args.json = args.json.resolve()
    try:
        if args.source:
            use_snapshot(args.source, tmp)
        res = run_all(args, tmp)
        res["info"]["total_s"] = round(time.perf_counter() - t0, 1)
        res["info"]["load"] += (f", {os.getloadavg()[0]:.2f} at the end (other work on this "
                                f"machine shows in the timings)")
        print_report(res)
        print(f"\n  whole run: {res['info']['total_s']:.0f} s")
        if args.json is not None:
            args.json.write_text(json.dumps(_clean(res), indent=2))
            print(f"  figures written to {args.json}")
    finally:
        if args.keep:
            print(f"  kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Time to send one result to the PACS, per result (issue 12).

Prints figures; asserts nothing. Sends N Secondary Captures (1024 x 1024, 8-bit, about 1 MB,
like the worker's) on loopback to dcmtk's storescp (``TCP_NODELAY=1``, discarding) and, with
``--orthanc``, to an Orthanc started here, four ways (the first three interleaved round
by round, then the kept association on its own):

- before: a new association per result, Nagle on (the code before issue 12)
- per-assoc+nodelay: a new association per result, TCP_NODELAY on (``send.store``)
- kept: one association kept open and reused, TCP_NODELAY on (``send.Sender``: the service)
- storescu: dcmtk's storescu, one association per file (``TCP_NODELAY=1``), as a peer

    python tests/benchmarks/bench_send.py [--n 30] [--orthanc]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from conftest import (  # noqa: E402
    DCMTK_ENV,
    Orthanc,
    free_port,
    need,
    secondary_capture,
    wait_until,
)
from pydicom.dataset import Dataset  # noqa: E402

from cxr_worker import send  # noqa: E402


def _nagle_on(event: Any) -> None:  # the code before issue 12: pynetdicom's default socket
    return None


def fmt(xs: list[float]) -> str:
    ms = [x * 1000 for x in xs]
    return f"median {statistics.median(ms):6.1f} ms  [{min(ms):5.1f}-{max(ms):6.1f}]"


def bench(name: str, peer: send.Peer, n: int, tmp: Path) -> None:
    sender = send.Sender(peer, send.Outbound(), idle_release_seconds=60)
    sample = secondary_capture(1024)
    sample_file = tmp / "sc.dcm"
    sample.save_as(sample_file, enforce_file_format=True)
    real_hook = send._on_conn_open
    times: dict[str, list[float]] = {k: [] for k in
                                     ("before", "per-assoc+nodelay", "kept", "storescu")}

    def before(ds: Dataset) -> None:
        send._on_conn_open = _nagle_on  # type: ignore[assignment]
        try:
            send.store(peer, ds, send.Outbound())
        finally:
            send._on_conn_open = real_hook  # type: ignore[assignment]

    def storescu(ds: Dataset) -> None:
        subprocess.run([need("storescu"), "-aet", "CXR_WORKER", "-aec", peer.ae_title,
                        "127.0.0.1", str(peer.port), str(sample_file)],
                       env=DCMTK_ENV, check=True, capture_output=True)

    ways: dict[str, Callable[[Dataset], None]] = {
        "before": before,
        "per-assoc+nodelay": lambda ds: send.store(peer, ds, send.Outbound()),
        "storescu": storescu,
    }
    for way in ways.values():  # warm-up
        way(secondary_capture(1024))
    for _ in range(n):  # interleaved round by round
        for key, way in ways.items():
            ds = secondary_capture(1024)
            t0 = time.perf_counter()
            way(ds)
            times[key].append(time.perf_counter() - t0)
    # then the kept association on its own: storescp (no --fork) serves one association at
    # a time, so the others would wait for its release
    sender.store(secondary_capture(1024))  # opens it (the first result pays the association)
    for _ in range(n):
        ds = secondary_capture(1024)
        t0 = time.perf_counter()
        sender.store(ds)
        times["kept"].append(time.perf_counter() - t0)
    sender.close()
    print(f"\n{name}: {n} results of {len(sample.PixelData) / 1e6:.1f} MB, per result "
          f"(kept association opened {sender.opened}x)")
    for key, xs in times.items():
        print(f"  {key:18s} {fmt(xs)}")
    base = statistics.median(times["before"])
    for key in ("per-assoc+nodelay", "kept", "storescu"):
        print(f"  before / {key:18s} x{base / statistics.median(times[key]):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--orthanc", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        port = free_port()
        out = tmp / "storescp"
        out.mkdir()
        scp = subprocess.Popen([need("storescp"), "--ignore", "-aet", "STORESCP", str(port)],
                               env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, cwd=out)
        try:
            peer = send.Peer("STORESCP", "127.0.0.1", port, "CXR_WORKER", timeout_seconds=30)
            wait_until(lambda: _echo_ok(peer), 10, "storescp")
            bench("dcmtk storescp (--ignore, TCP_NODELAY=1)", peer, args.n, tmp)
        finally:
            scp.terminate()
            scp.wait(10)
        if args.orthanc:
            pacs = Orthanc(tmp / "orthanc")
            pacs.start()
            try:
                bench("Orthanc", send.Peer(pacs.aet, "127.0.0.1", pacs.dicom_port,
                                           "CXR_WORKER", timeout_seconds=30), args.n, tmp)
            finally:
                pacs.stop()


def _echo_ok(peer: send.Peer) -> bool:
    try:
        send.echo(peer, send.Outbound())
    except send.SendError:
        return False
    return True


if __name__ == "__main__":
    main()

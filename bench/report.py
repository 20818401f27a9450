"""The plain-text report (stdout) and the goals, computed from the figures."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common import median

RULE = "=" * 96


def ms(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x * 1000:.0f}"


def num(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, fmt)


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or b == 0:
        return "-"
    return f"x{a / b:.2f}"


def header(info: dict[str, Any]) -> None:
    print(RULE)
    print("cxr-worker peer benchmark")
    print(RULE)
    for key in ("date", "commit", "machine", "cpu", "memory", "load", "mode", "images",
                "encodings", "network", "tools"):
        if key in info:
            print(f"  {key:10s} {info[key]}")


def section(title: str) -> None:
    print()
    print(RULE)
    print(title)
    print(RULE)


# -- 1 ---------------------------------------------------------------------------------------
def print_time_to_flag(r: dict[str, Any]) -> None:
    section("1. Time to flag: end of the modality's C-STORE -> Secondary Capture at the PACS")
    print(f"  cxr-worker serve, PACS = dcmtk storescp --fork +xa; dcmtk storescu, one association "
          f"per image,\n  {r['n']} images per transfer syntax after {r.get('warm', 1)} warm-up "
          f"image(s) (one per worker process);\n  clock from storescu's exit to the result file "
          f"closed in storescp's folder\n  ({r.get('watcher', '?')}). Milliseconds.")
    print(f"  worker: {r.get('worker_line', '?')}")
    print()
    print(f"  {'transfer syntax':20s} {'n':>4s} {'missing':>7s} {'p50':>6s} {'p95':>6s}   "
          f"{'[min - max]':>14s}")
    rows = r["syntaxes"]
    for name, s in rows.items():
        if "skipped" in s:
            print(f"  {name:20s} skipped: {s['skipped']}")
            continue
        lat = s["latency"]
        print(f"  {name:20s} {lat['n']:4d} {s['missing'] + s['send_failed']:7d} "
              f"{ms(lat['p50']):>6s} {ms(lat['p95']):>6s}   "
              f"[{ms(lat['lo']):>5s} - {ms(lat['hi']):>5s}]")
    print()
    print("  the same, clock from the C-STORE response as storescu logged it (Unix time in ms,")
    print("  before its release and exit; a late exit on a busy machine does not shorten it)")
    for name, s in rows.items():
        if "skipped" in s or "from_response" not in s:
            continue
        lat = s["from_response"]
        print(f"  {name:20s} {lat['n']:4d} {s['missing'] + s['send_failed']:7d} "
              f"{ms(lat['p50']):>6s} {ms(lat['p95']):>6s}   "
              f"[{ms(lat['lo']):>5s} - {ms(lat['hi']):>5s}]")
    print()
    print("  peer: storescu's whole run (connect, associate, C-STORE, release), same file,")
    print("  to the worker and straight to the PACS (storescp); median [min - max] ms")
    print(f"  {'transfer syntax':20s} {'to cxr-worker':>20s} {'to storescp':>20s}  "
          f"{'worker/storescp':>15s}")
    for name, s in rows.items():
        if "skipped" in s:
            continue
        a, b = s["store_to_worker"], s["store_to_storescp"]
        print(f"  {name:20s} {ms(a['p50']):>6s} [{ms(a['lo']):>4s}-{ms(a['hi']):>5s}]  "
              f"{ms(b['p50']):>6s} [{ms(b['lo']):>4s}-{ms(b['hi']):>5s}]  "
              f"{ratio(a['p50'], b['p50']):>15s}")
    print()
    print("  stage floor: the worker's own GET /metrics, mean per image over the timed images")
    print("  (decode, score, report = the pipeline stages; send = one C-STORE to the PACS;")
    print("  row->scored = cxr_worker_time_to_flag_seconds, the worker's own clock), ms")
    stages = ("decode", "score", "report", "send")
    print(f"  {'transfer syntax':20s} " + " ".join(f"{st:>7s}" for st in stages)
          + f" {'sum':>7s} {'row->scored':>12s} {'images':>7s}")
    for name, s in rows.items():
        st = s.get("stages") or {}
        if "skipped" in s or not st:
            print(f"  {name:20s} (not available)")
            continue
        total = sum(st.get(k, 0.0) for k in stages)
        print(f"  {name:20s} " + " ".join(f"{ms(st.get(k)):>7s}" for k in stages)
              + f" {ms(total):>7s} {ms(st.get('ttf')):>12s} {st.get('n:decode', 0):>7.0f}")
    warm = {name: s["warm_up_ms"] for name, s in rows.items() if "warm_up_ms" in s}
    if warm:
        print("  warm-up images (not counted), ms: " + "; ".join(
            f"{k} {', '.join(ms(None if v is None else v / 1000) for v in vs)}"
            for k, vs in warm.items()))


# -- 2 ---------------------------------------------------------------------------------------
def print_receive(r: dict[str, Any], mb: float) -> None:
    section("2. Durable receive: one association, many images, storescu start -> exit")
    print(f"  one dcmtk storescu, {r['m']} images ({r['m'] * mb:.0f} MB) on its command line, "
          f"explicit VR LE; {r['repeats']} run(s)\n  per receiver, receivers interleaved (order "
          f"rotated each run). The worker has a PACS (storescp)\n  and scores, reports and "
          f"sends while it receives. images/s, median [min - max]")
    print()
    worker = median(r["rates"].get("cxr-worker", []))
    print(f"  {'receiver':34s} {'images/s':>9s} {'[min - max]':>15s} {'MB/s':>7s} "
          f"{'worker/this':>12s}")
    for name in r["receivers"]:
        xs = r["rates"].get(name, [])
        med = median(xs)
        rng = f"[{num(min(xs)) if xs else '-'} - {num(max(xs)) if xs else '-'}]"
        label = name + (" (processing meanwhile)" if name == "cxr-worker" else "")
        print(f"  {label:34s} {num(med):>9s} {rng:>15s} {num(med * mb):>7s} "
              f"{ratio(worker, med) if name != 'cxr-worker' else '':>12s}")
        for err in r["failures"].get(name, [])[:1]:
            print(f"    storescu failed: {err.strip().splitlines()[-1] if err.strip() else '?'}")
    drains = r.get("worker_all_results_s", [])
    if drains:
        print(f"\n  cxr-worker: all {r['m']} results at the PACS {num(median(drains))} s after "
              f"storescu started (median; {num(r['m'] / median(drains))} images/s end to end), "
              f"missing {r['worker_results_missing']}")


# -- 3 ---------------------------------------------------------------------------------------
def print_burst(r: dict[str, Any]) -> None:
    section("3. Burst: images sent as fast as possible by concurrent storescu processes")
    w = r.get("worker", {})
    print(f"  {r['total']} images, explicit VR LE, {r['procs']} storescu at once (one "
          f"association each, {r['per_proc']} images each)")
    print()
    if w:
        print(f"  cxr-worker end to end (first send -> last result at the PACS): "
              f"{num(w['end_to_end_rate'])} images/s ({num(w['end_to_end_s'])} s; "
              f"results {w['results']}/{r['total']}, missing {w['missing']})")
        print(f"  cxr-worker receive only (first send -> last storescu exit):    "
              f"{num(w['receive_rate'])} images/s ({num(w['receive_s'])} s; "
              f"storescu failed {w['storescu_failed']})")
        if w.get("first_result_s") is not None:
            print(f"  first result at the PACS after {num(w['first_result_s'], '.2f')} s")
    for name, p in r.get("peers", {}).items():
        print(f"  peer {name:32s} receive only {num(p['receive_rate']):>6s} images/s "
              f"({num(p['receive_s'])} s, storescu failed {p['storescu_failed']}); "
              f"worker receive/peer {ratio(w.get('receive_rate'), p['receive_rate'])}")


# -- 4 ---------------------------------------------------------------------------------------
def print_concurrent(r: dict[str, Any]) -> None:
    section(f"4. Concurrent: {r['n']} modalities associating at once")
    print(f"  {r['n']} pynetdicom threads started together, each its own source address "
          f"127.0.0.10-{9 + r['n']} (one row:\n  all from 127.0.0.1); every accepted "
          f"association is held until all {r['n']} have an answer, then\n  stores "
          f"{r['per']} images and releases. refused = rejected (A-ASSOCIATE-RJ), aborted, "
          f"no answer\n  within 20 s, or an error.")
    print()
    print(f"  {'receiver':28s} {'accepted':>8s} {'refused':>8s} {'held':>5s} {'stored':>9s} "
          f"{'results':>8s}  answers")
    for name, x in r["receivers"].items():
        answers = ", ".join(f"{k} {v}" for k, v in sorted(x["answers"].items()))
        res = str(x.get("results_at_pacs", "")) or "-"
        print(f"  {name:28s} {x['accepted']:>8d} {x['refused']:>8d} {x['held_together']:>5d} "
              f"{x['stored']:>4d}/{x['sent']:<4d} {res:>8s}  {answers}")
    print("  (held: established at the moment all had their answer; results: Secondary "
          "Captures at the\n  worker's PACS for the images it stored)")


# -- goals ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Goal:
    text: str
    measured: Callable[[dict[str, Any]], float | None]
    met: Callable[[float], bool]
    show: Callable[[float], str]


def _ttf(key: str, syntax: str) -> Callable[[dict[str, Any]], float | None]:
    def get(res: dict[str, Any]) -> float | None:
        s = res.get("time_to_flag", {}).get("syntaxes", {}).get(syntax)
        if not s or "skipped" in s:
            return None
        v = s["latency"][key]
        return math.inf if v is None else float(v)
    return get


def _burst(res: dict[str, Any]) -> float | None:
    w = res.get("burst", {}).get("worker")
    return None if not w else float(w["end_to_end_rate"]) if w["missing"] == 0 else 0.0


def _receive_ratio(res: dict[str, Any]) -> float | None:
    r = res.get("receive", {}).get("rates", {})
    w, o = median(r.get("cxr-worker", [])), median(r.get("Orthanc", []))
    return None if not math.isfinite(w) or not math.isfinite(o) else w / o


def _refused(res: dict[str, Any]) -> float | None:
    x = res.get("concurrent", {}).get("receivers", {}).get("cxr-worker")
    return None if not x else float(x["refused"])


GOALS = [
    Goal("uncompressed time to flag p50 <= 100 ms", _ttf("p50", "explicit-le"),
         lambda v: v <= 0.100, lambda v: f"{ms(v)} ms"),
    Goal("uncompressed time to flag p95 <= 150 ms", _ttf("p95", "explicit-le"),
         lambda v: v <= 0.150, lambda v: f"{ms(v)} ms"),
    Goal("JPEG 2000 lossless time to flag p50 <= 250 ms", _ttf("p50", "jpeg2000-lossless"),
         lambda v: v <= 0.250, lambda v: f"{ms(v)} ms"),
    Goal("JPEG-LS lossless time to flag p50 <= 150 ms", _ttf("p50", "jpeg-ls-lossless"),
         lambda v: v <= 0.150, lambda v: f"{ms(v)} ms"),
    Goal("burst >= 12 images/s end to end (all results)", _burst,
         lambda v: v >= 12.0, lambda v: f"{v:.1f} images/s"),
    Goal("durable receive >= 1.3x Orthanc while processing runs", _receive_ratio,
         lambda v: v >= 1.3, lambda v: f"x{v:.2f}"),
    Goal("0 of 20 simultaneous associations refused", _refused,
         lambda v: v == 0, lambda v: f"{v:.0f} refused"),
]


def goals(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for g in GOALS:
        v = g.measured(res)
        out.append({"goal": g.text, "measured": None if v is None or not math.isfinite(v)
                    else v, "shown": "not measured" if v is None else g.show(v),
                    "status": "not measured" if v is None else
                    ("met" if g.met(v) else "NOT met")})
    return out


def print_goals(rows: list[dict[str, Any]], notes: list[str]) -> None:
    section("Summary against the goals (computed from the figures above)")
    print(f"  {'goal':56s} {'measured':>18s}   status")
    for row in rows:
        print(f"  {row['goal']:56s} {row['shown']:>18s}   {row['status']}")
    for note in notes:
        print(f"  note: {note}")

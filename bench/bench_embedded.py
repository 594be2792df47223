"""onceflow embedded-backend benchmark: throughput, the Bytewax baseline, latency.

    .venv/bin/python bench/bench_embedded.py            # the full run of `make bench`
    .venv/bin/python bench/bench_embedded.py --quick    # smoke check, about 10 seconds

Prints the figures as tables, writes them to bench/out/embedded.json, and compares them
with the targets of the issue. A missed target is reported, not fatal: this is a
benchmark. A wrong output is fatal (exit 1): a fast wrong answer is not a result.
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pstats
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

import onceflow
from _common import (
    Defaults,
    Mismatch,
    SumChecker,
    Target,
    add_latency_flags,
    add_run_flags,
    build_pipeline,
    check_event_bytes,
    check_run_stats,
    event_items,
    label,
    print_targets,
    report_console,
    resolve_shared_flags,
    run_until_idle,
    stderr_logger,
    summary_head,
    warn_onceflow_overrides,
    write_json,
)
from latency import COMMIT_EVERY, LatencyResult, measure_latency, settle
from onceflow import App, Consumer, Producer

Guarantee = Literal["exactly-once", "at-least-once"]

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
OUT_JSON = BENCH_DIR / "out" / "embedded.json"
GUARANTEES: tuple[Guarantee, Guarantee] = ("exactly-once", "at-least-once")
# Pre-produce in chunks this big: one durable transaction each, untimed.
PRODUCE_CHUNK = 50_000

# The targets of the issue.
TARGET_EPS_AT_100MS = 200_000
TARGET_VS_BYTEWAX = 2.0
TARGET_EO_OVER_ALO = 0.8


DEFAULTS = Defaults(
    events=1_000_000,
    quick_events=100_000,
    latency_events=50_000,
    quick_latency_events=10_000,
    latency_rate=20_000,
)

log = stderr_logger("bench")


# -- throughput -------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    eps: float
    commits: int
    gc_seconds: float  # of `seconds`, spent in the cyclic garbage collector


class GcTimer:
    """Adds up the time the cyclic GC runs while installed (a `gc.callbacks` hook).

    The profile charges GC pauses to whatever allocation triggered them, so they are
    invisible there; this makes them a figure of their own.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0 = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._t0

    def __enter__(self) -> GcTimer:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)


@dataclass
class Throughput:
    interval_s: float
    guarantee: str
    runs: list[Run]

    @property
    def median_eps(self) -> float:
        return statistics.median(r.eps for r in self.runs)

    @property
    def median_commits(self) -> float:
        return statistics.median(r.commits for r in self.runs)

    @property
    def median_gc_share(self) -> float:
        return statistics.median(r.gc_seconds / r.seconds for r in self.runs)

    def to_json(self) -> dict[str, Any]:
        return {
            "interval_s": self.interval_s,
            "guarantee": self.guarantee,
            "median_eps": round(self.median_eps, 1),
            "median_commits": self.median_commits,
            "median_gc_share": round(self.median_gc_share, 3),
            "runs": [asdict(r) for r in self.runs],
        }


def produce(store: str, events: int, keys: int) -> None:
    with Producer(store, producer_id="bench-input") as p:
        for start in range(0, events, PRODUCE_CHUNK):
            p.send_batch("in", event_items(start, min(events, start + PRODUCE_CHUNK), keys))


def verify(store: str, events: int, keys: int) -> None:
    """Every output, in order, against the reference fold (see `SumChecker`)."""
    checker = SumChecker(keys)
    with Consumer(store, group="bench-verify", topics=["out"]) as c:
        while batch := c.poll(max_records=100_000):
            for r in batch:
                checker.feed(r.key, r.value)
    checker.finish(events)


def throughput_run(
    events: int,
    keys: int,
    interval: float,
    guarantee: Guarantee,
    profile: Path | None = None,
) -> Run:
    """One timed `App.run(until_idle=True)` over N pre-produced events, in a fresh store.

    With `profile`, the run is under cProfile (so slower) and the stats go to that file.
    """
    with tempfile.TemporaryDirectory(prefix="onceflow-bench-") as tmp:
        store = os.path.join(tmp, "bench.db")
        produce(store, events, keys)
        app = App(
            "bench",
            store=store,
            guarantee=guarantee,
            commit_interval=interval,
            commit_every=COMMIT_EVERY,
            partitions=1,
        )
        build_pipeline(app)
        settle()
        with GcTimer() as gc_time:
            stats, seconds = run_until_idle(app, profile)
        check_run_stats(stats, events)
        verify(store, events, keys)
    return Run(
        round(seconds, 4), round(events / seconds, 1), stats.commits, round(gc_time.seconds, 4)
    )


def measure_throughput(
    events: int, keys: int, intervals: list[float], runs: int
) -> list[Throughput]:
    results = {(i, g): Throughput(i, g, []) for i in intervals for g in GUARANTEES}
    # Runs interleave the settings, and alternate which guarantee goes first, so that a
    # slow phase of the machine does not land on one setting and skew the ratio.
    for n in range(runs):
        for interval in intervals:
            order = GUARANTEES if n % 2 == 0 else GUARANTEES[::-1]
            for g in order:
                r = throughput_run(events, keys, interval, g)
                results[(interval, g)].runs.append(r)
                log(
                    f"run {n + 1}/{runs} {label(interval)} {g}: {r.seconds:.2f}s, "
                    f"{r.eps:,.0f} ev/s, {r.commits} commits, GC {r.gc_seconds:.2f}s, outputs ok"
                )
    return list(results.values())


def run_latency(args: argparse.Namespace) -> list[LatencyResult]:
    out: list[LatencyResult] = []
    with tempfile.TemporaryDirectory(prefix="onceflow-latency-") as tmp:
        for i in args.intervals:
            r = measure_latency(
                Path(tmp),
                interval=i,
                events=args.latency_events,
                keys=args.keys,
                rate=args.latency_rate,
                batch=args.latency_batch,
            )
            out.append(r)
            log(
                f"latency {label(i)}: p50 {r.p50_ms:.1f} ms, p99 {r.p99_ms:.1f} ms at "
                f"{r.rate_achieved:,.0f} ev/s (send p99 {r.send_p99_ms:.1f} ms), "
                f"{r.commits} commits, outputs ok"
            )
    return out


def run_profiles(args: argparse.Namespace) -> int:
    """--profile: one exactly-once run per interval under cProfile, stats to bench/out."""
    for i in args.intervals:
        path = OUT_JSON.parent / f"profile-eo-{i * 1000:g}ms.pstats"
        r = throughput_run(args.events, args.keys, i, "exactly-once", profile=path)
        print(f"\n== exactly-once, {label(i)}: {r.eps:,.0f} ev/s under cProfile; {path}")
        pstats.Stats(str(path)).sort_stats("tottime").print_stats(15)
    return 0


# -- Bytewax ----------------------------------------------------------------------


def run_bytewax(events: int, keys: int, epoch_ms: list[int], runs: int) -> dict[str, Any]:
    """The baseline in its own venv and process; {"results": [...]} or {"error": ...}."""
    setup = subprocess.run(
        ["bash", str(BENCH_DIR / "make_baseline_venv.sh"), "bytewax", "0.21.1"], cwd=REPO
    )
    if setup.returncode != 0:
        return {"error": f"bench/make_baseline_venv.sh exited {setup.returncode}"}
    cmd = [
        str(REPO / ".venv-bytewax" / "bin" / "python"),
        str(BENCH_DIR / "bytewax_baseline.py"),
        "--events",
        str(events),
        "--keys",
        str(keys),
        "--epoch-ms",
        ",".join(str(e) for e in epoch_ms),
        "--runs",
        str(runs),
    ]
    log("bytewax: " + " ".join(cmd))
    # stderr (its progress lines) passes through; stdout carries one JSON line per epoch.
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        return {"error": f"bytewax_baseline.py exited {proc.returncode}", "results": rows}
    return {"results": rows}


# -- report -----------------------------------------------------------------------


def evaluate(
    tp: dict[tuple[float, str], Throughput], intervals: list[float], bw: dict[float, float]
) -> list[Target]:
    out: list[Target] = []
    eo100 = tp.get((0.1, "exactly-once"))
    out.append(
        Target(
            "throughput, exactly-once, 100 ms",
            f">= {TARGET_EPS_AT_100MS:,} ev/s",
            f"{eo100.median_eps:,.0f} ev/s" if eo100 else "not measured",
            eo100.median_eps >= TARGET_EPS_AT_100MS if eo100 else None,
        )
    )
    for i in (0.1, 1.0):
        eo = tp.get((i, "exactly-once"))
        if eo is None or i not in bw:
            out.append(Target(f"vs Bytewax, {label(i)}", f">= {TARGET_VS_BYTEWAX:g}x", "n/a", None))
            continue
        ratio = eo.median_eps / bw[i]
        out.append(
            Target(
                f"vs Bytewax, {label(i)}",
                f">= {TARGET_VS_BYTEWAX:g}x",
                f"{ratio:.2f}x",
                ratio >= TARGET_VS_BYTEWAX,
            )
        )
    for i in intervals:
        eo, alo = tp[(i, "exactly-once")], tp[(i, "at-least-once")]
        ratio = eo.median_eps / alo.median_eps
        out.append(
            Target(
                f"exactly-once / at-least-once, {label(i)}",
                f">= {TARGET_EO_OVER_ALO:g}",
                f"{ratio:.2f}",
                ratio >= TARGET_EO_OVER_ALO,
            )
        )
    return out


def print_report(
    console: Console,
    args: argparse.Namespace,
    tp: dict[tuple[float, str], Throughput],
    bw: dict[float, float],
    bw_version: str,
    lat: list[LatencyResult],
    targets: list[Target],
) -> None:
    t = Table(
        title=f"Throughput: {args.events:,} events, {args.keys:,} keys, median of {args.runs} "
        "run(s), events/s",
        title_justify="left",
    )
    cols = ("commit interval", "exactly-once", "at-least-once", "EO / ALO", "commits EO/ALO")
    for col in (*cols, "GC time EO"):
        t.add_column(col, justify="right")
    t.add_column(f"Bytewax {bw_version}".strip(), justify="right")
    t.add_column("EO / Bytewax", justify="right")
    for i in args.intervals:
        eo, alo = tp[(i, "exactly-once")], tp[(i, "at-least-once")]
        b = bw.get(i)
        t.add_row(
            label(i),
            f"{eo.median_eps:,.0f}",
            f"{alo.median_eps:,.0f}",
            f"{eo.median_eps / alo.median_eps:.2f}",
            f"{eo.median_commits:g} / {alo.median_commits:g}",
            f"{eo.median_gc_share:.0%}",
            f"{b:,.0f}" if b else "-",
            f"{eo.median_eps / b:.2f}x" if b else "-",
        )
    console.print(t)
    if lat:
        lt = Table(
            title="Latency, send -> committed output visible to a consumer, exactly-once",
            title_justify="left",
        )
        lcols = ("commit interval", "events", "rate ev/s", "p50 ms", "p99 ms", "max ms")
        for col in (*lcols, "send p99 ms", "commits"):
            lt.add_column(col, justify="right")
        for r in lat:
            lt.add_row(
                label(r.interval_s),
                f"{r.events:,}",
                f"{r.rate_achieved:,.0f}",
                f"{r.p50_ms:.1f}",
                f"{r.p99_ms:.1f}",
                f"{r.max_ms:.1f}",
                f"{r.send_p99_ms:.1f}",
                str(r.commits),
            )
        console.print(lt)
    print_targets(console, targets)


# -- main -------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="onceflow embedded benchmark: throughput, Bytewax baseline, latency"
    )
    add_run_flags(p, DEFAULTS)
    p.add_argument(
        "--intervals",
        default="0.01,0.1,1",
        help="commit intervals in seconds, comma list (default 0.01,0.1,1)",
    )
    p.add_argument("--no-bytewax", action="store_true", help="skip the Bytewax baseline")
    add_latency_flags(p, DEFAULTS)
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead of the figures: profile one exactly-once run per interval "
        "(bench/out/profile-eo-<ms>ms.pstats)",
    )
    p.add_argument("--json", type=Path, default=OUT_JSON, help=f"summary file ({OUT_JSON})")
    args = p.parse_args(argv)
    resolve_shared_flags(p, args, DEFAULTS)
    try:
        # Unique, in the given order: a repeated interval would only repeat a row.
        args.intervals = list(
            dict.fromkeys(float(x) for x in args.intervals.split(",") if x.strip())
        )
    except ValueError:
        p.error(f"--intervals must be a comma list of seconds, got {args.intervals!r}")
    if not args.intervals or any(i <= 0 for i in args.intervals):
        p.error("--intervals must be positive seconds")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile:
        try:
            return run_profiles(args)
        except Mismatch as exc:
            log(f"CORRECTNESS MISMATCH: {exc}")
            return 1
    t_start = time.perf_counter()
    console = report_console()
    warn_onceflow_overrides(log)
    check_event_bytes("bytewax_baseline.py")
    summary: dict[str, Any] = {
        **summary_head(onceflow.__version__, sqlite=sqlite3.sqlite_version),
        "params": {
            "events": args.events,
            "keys": args.keys,
            "runs": args.runs,
            "intervals_s": args.intervals,
            "commit_every": COMMIT_EVERY,
            "produce_chunk": PRODUCE_CHUNK,
            "latency_events": args.latency_events,
            "latency_rate": args.latency_rate,
            "latency_batch": args.latency_batch,
        },
    }
    try:
        # Latency first, on a quiet disk: it is the figure most hurt by other I/O.
        lat = [] if args.no_latency else run_latency(args)
        tps = measure_throughput(args.events, args.keys, args.intervals, args.runs)
        tp = {(x.interval_s, x.guarantee): x for x in tps}
        bw: dict[float, float] = {}
        bw_version = ""
        epochs = [round(i * 1000) for i in args.intervals if i >= 0.1]
        if not args.no_bytewax and epochs:
            settle()
            bytewax = run_bytewax(args.events, args.keys, epochs, args.runs)
            summary["bytewax"] = bytewax
            if "error" in bytewax:
                log(f"warning: no Bytewax baseline: {bytewax['error']}")
            else:
                for row in bytewax["results"]:
                    bw[row["epoch_ms"] / 1000] = float(row["median_eps"])
                    bw_version = str(row["version"])
    except Mismatch as exc:
        log(f"CORRECTNESS MISMATCH: {exc}")
        summary["error"] = f"correctness mismatch: {exc}"
        write_json(args.json, summary)
        return 1
    targets = evaluate(tp, args.intervals, bw)
    wall = time.perf_counter() - t_start
    summary.update(
        {
            "throughput": [x.to_json() for x in tps],
            "eo_over_alo": {
                str(i): round(
                    tp[(i, "exactly-once")].median_eps / tp[(i, "at-least-once")].median_eps, 3
                )
                for i in args.intervals
            },
            "vs_bytewax": {
                str(i): round(tp[(i, "exactly-once")].median_eps / b, 3)
                for i, b in bw.items()
                if (i, "exactly-once") in tp
            },
            "latency": [r.to_json() for r in lat],
            "targets": [asdict(x) for x in targets],
            "wall_seconds": round(wall, 1),
        }
    )
    print_report(console, args, tp, bw, bw_version, lat, targets)
    write_json(args.json, summary)
    console.print(f"wall time {wall:.0f} s; summary written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The embedded benchmark's latency figure: send -> committed output, exactly-once.

The latency App lives here rather than in `bench_embedded.py` because it runs in a child
process (`python -m onceflow._worker latency:build_app`) that imports this module, and that
child must not import the runner (rich, argument parsing, Bytewax). Its pipeline, events and
reference check come from `_common.py`, so both figures run the same pipeline.

Latency, three processes, so that no two of them share a GIL:

* the App: an `onceflow._supervisor.Child`, a real process stopped by SIGTERM;
* the producer: a `multiprocessing` 'spawn' process sending fixed-size batches on a fixed
  schedule, each stamped `timestamp=time.time()` just before its `send_batch`;
* this process: a `Consumer` tailing `out`. Outputs inherit their input's timestamp, so
  `time.time() - record.timestamp` when a record is first returned is the time from send
  to committed, visible output, and includes the producer's own durable write.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import sqlite3
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from _common import (
    Mismatch,
    SendReport,
    SumChecker,
    build_pipeline,
    event_items,
    percentile_ms,
    send_steady,
    tail_outputs,
)
from onceflow import App, Consumer, Producer
from onceflow._supervisor import Child

BENCH_DIR = Path(__file__).resolve().parent
APP_NAME = "bench"
# The App child's commit interval; the worker builds its App from ONCEFLOW_* settings.
INTERVAL_ENV = "ONCEFLOW_COMMIT_INTERVAL"
# Commits are triggered by the interval only: a count limit would make the short epochs
# of the 10 ms setting and the long ones of the 1 s setting look alike.
COMMIT_EVERY = 10**9


# -- the workload (its parts shared with the other benches live in _common) ------------


def build_app() -> App:
    """The latency App, for `python -m onceflow._worker latency:build_app --store S`.

    The worker replaces the store; the commit interval comes from ONCEFLOW_COMMIT_INTERVAL.
    """
    app = App(APP_NAME, commit_every=COMMIT_EVERY, partitions=1)
    build_pipeline(app)
    return app


def settle() -> None:
    """Untimed, before each timed run: collect garbage and flush dirty pages, so that a run
    pays neither for the garbage nor for the disk writeback of the run before it (600 MB
    written and deleted just before a latency run raised its p99 from ~14 to 367 ms).
    """
    gc.collect()
    os.sync()


# -- the latency figure -------------------------------------------------------------


@dataclass
class LatencyResult:
    interval_s: float
    events: int
    rate_target: float
    rate_achieved: float
    batch: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    send_p50_ms: float
    send_p99_ms: float
    send_max_ms: float
    producer_max_behind_ms: float
    commits: int
    samples: int
    warmup_events: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def app_commits(store: str) -> int:
    """The App's committed epochs, from the store's own counter (what `onceflow status`
    shows); read directly because the App runs in another process."""
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT commits FROM apps WHERE app=?", (APP_NAME,)).fetchone()
    finally:
        conn.close()
    return 0 if row is None else int(row[0])


def produce_steady(
    store: str,
    first: int,
    events: int,
    keys: int,
    rate: float,
    batch: int,
    report: Connection,
) -> None:
    """Producer process: `send_steady` from its own process (no GIL shared with the App
    or the consumer); reports a `SendReport`, sends ascending, through `report`."""
    rep = SendReport()
    with Producer(store, producer_id="bench-latency") as producer:
        send_steady(producer, first, events, keys, rate, batch, rep)
        rep.sends.sort()
        report.send(rep)
    report.close()


def measure_latency(
    workdir: Path,
    *,
    interval: float,
    events: int,
    keys: int,
    rate: float,
    batch: int,
    warmup: int = 2000,
) -> LatencyResult:
    """One latency run at one commit interval, in a fresh store under `workdir`.

    Warm-up events go in first and must come out before the timed producer starts, so the
    App's start-up (imports, opening the store, leases) is not counted as latency.
    """
    # A directory of its own: two runs at one interval must not share a store.
    store = str(Path(tempfile.mkdtemp(prefix=f"latency-{interval:g}-", dir=workdir)) / "l.db")
    with Producer(store, producer_id="bench-warmup") as p:
        p.send_batch("in", event_items(0, warmup, keys))
    settle()
    env = {INTERVAL_ENV: repr(interval)}
    child = Child("latency:build_app", store=store, env=env, cwd=str(BENCH_DIR))
    checker = SumChecker(keys)
    latencies: list[float] = []
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    producer: Any = None

    def check() -> None:
        if not child.alive():
            raise RuntimeError(f"the App process exited early: {child.stderr()[-2000:]}")
        if producer is not None and producer.exitcode not in (None, 0):
            raise RuntimeError(f"the producer process failed (exit {producer.exitcode})")

    try:
        with Consumer(store, group="bench-latency", topics=["out"]) as consumer:
            tail_outputs(consumer, checker, warmup, time.monotonic() + 60, check)
            commits_before = app_commits(store)
            producer = ctx.Process(
                target=produce_steady,
                args=(store, warmup, events, keys, rate, batch, send),
                name="bench-latency-producer",
            )
            producer.start()
            send.close()
            # Bounded: the send schedule, plus slack for a slow start and the last commit.
            deadline = time.monotonic() + events / rate * 3 + 30 + interval
            tail_outputs(consumer, checker, warmup + events, deadline, check, latencies, warmup)
            producer.join(30)
            check()
            sent: SendReport = recv.recv()
            # Nothing may follow the last expected output, even after a final commit.
            child_rc = child.stop()
            if child_rc != 0:
                raise RuntimeError(f"the App process exited with {child_rc}: {child.stderr()}")
            commits = app_commits(store) - commits_before
            extra = consumer.poll(max_records=10)
            if extra:
                raise Mismatch(f"output after the last expected one: offset {extra[0].offset}")
    finally:
        if child.alive():
            child.kill()
        if producer is not None and producer.is_alive():
            producer.kill()
            producer.join()
        recv.close()
    checker.finish(warmup + events)
    lat = sorted(latencies)
    return LatencyResult(
        interval_s=interval,
        events=events,
        rate_target=rate,
        rate_achieved=round(events / sent.seconds, 1),
        batch=batch,
        p50_ms=percentile_ms(lat, 50),
        p99_ms=percentile_ms(lat, 99),
        max_ms=round(lat[-1] * 1000, 2),
        send_p50_ms=percentile_ms(sent.sends, 50),
        send_p99_ms=percentile_ms(sent.sends, 99),
        send_max_ms=round(sent.sends[-1] * 1000, 2),
        producer_max_behind_ms=round(sent.max_behind * 1000, 2),
        commits=commits,
        samples=len(lat),
        warmup_events=warmup,
    )


if __name__ == "__main__":  # a manual check of one setting: python bench/latency.py 0.1
    with tempfile.TemporaryDirectory(prefix="onceflow-latency-") as tmp:
        interval = float(sys.argv[1]) if len(sys.argv) > 1 else 0.1
        res = measure_latency(
            Path(tmp), interval=interval, events=20_000, keys=1000, rate=20_000, batch=50
        )
        print(res)

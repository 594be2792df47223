"""The benchmark workload, and the latency figure: send -> committed output, exactly-once.

The workload lives here rather than in `bench_embedded.py` because the App of the latency
figure runs in a child process (`python -m onceflow._worker latency:build_app`) that imports
this module, and that child must not import the runner (rich, argument parsing, Bytewax).
`bench_embedded.py` imports the workload from here, so both figures run the same pipeline.

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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from onceflow import App, Consumer, Producer, Stream
from onceflow._supervisor import Child

BENCH_DIR = Path(__file__).resolve().parent
APP_NAME = "bench"
# The App child's commit interval; the worker builds its App from ONCEFLOW_* settings.
INTERVAL_ENV = "ONCEFLOW_COMMIT_INTERVAL"
# Commits are triggered by the interval only: a count limit would make the short epochs
# of the 10 ms setting and the long ones of the 1 s setting look alike.
COMMIT_EVERY = 10**9


class Mismatch(Exception):
    """The pipeline's outputs differ from the workload's reference fold."""


# -- the workload ---------------------------------------------------------------------


def event_bytes(i: int, keys: int) -> bytes:
    """Event i, byte for byte the line `bytewax_baseline.py` writes for it (compact JSON)."""
    return f'{{"id":{i},"account":"acct-{i % keys}","amount":{(i * 7919) % 1000}}}'.encode()


def event_items(start: int, stop: int, keys: int) -> list[tuple[str | None, Any, str | None]]:
    """Events start..stop-1 as `Producer.send_batch` items, keyed by account."""
    return [(f"acct-{i % keys}", event_bytes(i, keys), None) for i in range(start, stop)]


def add_amount(acc: int, event: dict[str, int]) -> int:
    # No type checks or conversions: the Bytewax side pays for none either.
    return acc + event["amount"]


def build_pipeline(app: App) -> Stream:
    """in -> running sum of `amount` per key (the account) -> out, one output per event."""
    return app.source("in").reduce(name="sum", fn=add_amount, initial=0).to("out")


def build_app() -> App:
    """The latency App, for `python -m onceflow._worker latency:build_app --store S`.

    The worker replaces the store; the commit interval comes from ONCEFLOW_COMMIT_INTERVAL.
    """
    app = App(APP_NAME, commit_every=COMMIT_EVERY, partitions=1)
    build_pipeline(app)
    return app


def expected_totals(events: int, keys: int) -> list[int]:
    """The final sum per key index, by a plain loop independent of the checker's fold."""
    totals = [0] * min(events, keys)
    for i in range(events):
        totals[i % keys] += (i * 7919) % 1000
    return totals


class SumChecker:
    """Checks every output of the pipeline, in the order one partition returns them.

    The n-th output of key `acct-k` must be the running sum over events k, k+K, ..., so a
    lost, duplicated, reordered or wrong output is caught where it happens, not only in
    the final sums.
    """

    def __init__(self, keys: int) -> None:
        self.keys = keys
        self.count = 0
        self._seen = [0] * keys
        self._sums = [0] * keys

    def feed(self, key: str | None, value: bytes) -> None:
        if key is None or not key.startswith("acct-"):
            raise Mismatch(f"output {self.count} has key {key!r}, expected acct-<n>")
        k = int(key[5:])
        if not 0 <= k < self.keys:
            raise Mismatch(f"output {self.count} has key {key!r}, outside the {self.keys} keys")
        n = self._seen[k]
        i = k + n * self.keys
        self._seen[k] = n + 1
        self._sums[k] += (i * 7919) % 1000
        got = int(value)
        if got != self._sums[k]:
            raise Mismatch(
                f"output {self.count} (event {i}, {key}) is {got}, expected {self._sums[k]}"
            )
        self.count += 1

    def finish(self, events: int) -> None:
        if self.count != events:
            raise Mismatch(f"{self.count} outputs, expected exactly {events}")
        totals = expected_totals(events, self.keys)
        bad = [k for k, total in enumerate(totals) if self._sums[k] != total]
        if bad:
            raise Mismatch(f"{len(bad)} keys end on a wrong sum, e.g. acct-{bad[0]}")


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


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending list."""
    if not sorted_values:
        raise ValueError("no samples")
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def app_commits(store: str) -> int:
    """The App's committed epochs, from the store's own counter (what `onceflow status`
    shows); read directly because the App runs in another process."""
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT commits FROM apps WHERE app=?", (APP_NAME,)).fetchone()
    finally:
        conn.close()
    return 0 if row is None else int(row[0])


@dataclass
class ProducerReport:
    seconds: float
    max_behind: float
    sends: list[float]  # seconds each send_batch took, ascending


def produce_steady(
    store: str,
    first: int,
    events: int,
    keys: int,
    rate: float,
    batch: int,
    report: Connection,
) -> None:
    """Producer process: events first..first+events-1 at `rate`/s in batches of `batch`.

    Batch b is due at t0 + b*batch/rate on an absolute schedule, so one slow send is
    caught up on rather than shifting every later send (which would quietly lower the
    rate). Reports a `ProducerReport` through `report`.
    """
    sends: list[float] = []
    with Producer(store, producer_id="bench-latency") as producer:
        t0 = time.perf_counter()
        behind = 0.0
        for b, start in enumerate(range(first, first + events, batch)):
            due = t0 + b * batch / rate
            now = time.perf_counter()
            if now < due:
                time.sleep(due - now)
            else:
                behind = max(behind, now - due)
            items = event_items(start, min(first + events, start + batch), keys)
            t_send = time.perf_counter()
            producer.send_batch("in", items, timestamp=time.time())
            sends.append(time.perf_counter() - t_send)
        report.send(ProducerReport(time.perf_counter() - t0, behind, sorted(sends)))
    report.close()


def _wait_outputs(
    consumer: Consumer,
    checker: SumChecker,
    want: int,
    deadline: float,
    check: Callable[[], None],
    latencies: list[float] | None = None,
    first_timed: int = 0,
) -> None:
    """Tail `out` until `want` outputs were checked; record latencies from `first_timed`.

    Polls without the Consumer's own 20 ms wait, sleeping 1 ms when there is nothing, so
    the measurement adds at most about 1 ms; the poll is a few small reads, cheap enough
    not to starve the App and the producer on two cores. `check` raises when a process
    the run depends on has died, so a failure ends the run at once, not at the deadline.
    """
    while checker.count < want:
        recs = consumer.poll(max_records=5000)
        now = time.time()
        if not recs:
            check()
            if time.monotonic() > deadline:
                raise Mismatch(f"only {checker.count} of {want} outputs before the deadline")
            time.sleep(0.001)
            continue
        for r in recs:
            if latencies is not None and r.offset >= first_timed:
                latencies.append(now - r.timestamp)
            checker.feed(r.key, r.value)


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
            _wait_outputs(consumer, checker, warmup, time.monotonic() + 60, check)
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
            _wait_outputs(consumer, checker, warmup + events, deadline, check, latencies, warmup)
            producer.join(30)
            check()
            sent: ProducerReport = recv.recv()
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
        p50_ms=round(percentile(lat, 50) * 1000, 2),
        p99_ms=round(percentile(lat, 99) * 1000, 2),
        max_ms=round(lat[-1] * 1000, 2),
        send_p50_ms=round(percentile(sent.sends, 50) * 1000, 2),
        send_p99_ms=round(percentile(sent.sends, 99) * 1000, 2),
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

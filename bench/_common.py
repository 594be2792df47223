"""What the benchmark scripts share: the workload and its reference check, the steady
producer and the output tail of the latency figures, the shared flags, the report.

Who imports it, and from where:

* the bench scripts, run as files (`python bench/X.py`), so `bench/` is `sys.path[0]`;
* the App child processes of the latency figures, started with `cwd=bench/` (the worker
  puts its cwd on `sys.path`) and the 'spawn' producer (it inherits the parent's path);
* `quix_baseline.py` and `bytewax_baseline.py`, in their own virtualenvs, where onceflow
  and rich are not installed.

So the top level imports only the standard library: rich and confluent_kafka are
imported inside the functions that need them, and onceflow only for type checking.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from onceflow import App, Consumer, Producer, RunStats, Stream


class Mismatch(Exception):
    """The pipeline's outputs differ from the workload's reference fold."""


# -- the workload -----------------------------------------------------------------------


def event_bytes(i: int, keys: int) -> bytes:
    """Event i, compact JSON: the input of every engine in every bench, byte for byte."""
    return f'{{"id":{i},"account":"acct-{i % keys}","amount":{(i * 7919) % 1000}}}'.encode()


def event_items(start: int, stop: int, keys: int) -> list[tuple[str | None, Any, str | None]]:
    """Events start..stop-1 as onceflow `Producer.send_batch` items, keyed by account."""
    return [(f"acct-{i % keys}", event_bytes(i, keys), None) for i in range(start, stop)]


def check_event_bytes(baseline: str) -> None:
    """Exit when `event_bytes` drifted from the documented line: the baselines' outputs
    are checked against the same fold, so a drift would compare different work."""
    if event_bytes(12, 10) != b'{"id":12,"account":"acct-2","amount":28}':
        raise SystemExit(f"event_bytes() no longer matches {baseline}'s input")


def add_amount(acc: int, event: dict[str, int]) -> int:
    # No type checks or conversions: the baselines pay for none either.
    return acc + event["amount"]


def build_pipeline(app: App) -> Stream:
    """in -> running sum of `amount` per key (the account) -> out, one output per event."""
    return app.source("in").reduce(name="sum", fn=add_amount, initial=0).to("out")


def expected_totals(events: int, keys: int) -> list[int]:
    """The final sum per key index, by a plain loop independent of the checker's fold."""
    totals = [0] * min(events, keys)
    for i in range(events):
        totals[i % keys] += (i * 7919) % 1000
    return totals


class SumChecker:
    """Checks every output of the pipeline: the n-th output of `acct-k` must be the
    running sum over events k, k+K, ..., k+(n-1)K. A key lives in one partition, so its
    outputs arrive in order whatever the interleaving of partitions: a lost, duplicated,
    reordered or wrong output is caught where it happens, not only in the final sums.
    """

    def __init__(self, keys: int) -> None:
        self.keys = keys
        self.count = 0
        self._seen = [0] * keys
        self._sums = [0] * keys

    def feed(self, key: bytes | str | None, value: bytes | int | None) -> None:
        if isinstance(key, bytes):
            key = key.decode()
        if key is None or not key.startswith("acct-"):
            raise Mismatch(f"output {self.count} has key {key!r}, expected acct-<n>")
        k = int(key[5:])
        if not 0 <= k < self.keys:
            raise Mismatch(f"output {self.count} has key {key!r}, outside the {self.keys} keys")
        if value is None:
            raise Mismatch(f"output {self.count} ({key}) has no value")
        n = self._seen[k]
        i = k + n * self.keys
        self._seen[k] = n + 1
        self._sums[k] += (i * 7919) % 1000
        got = int(value)
        if got != self._sums[k]:
            raise Mismatch(
                f"output {self.count} (event {i}, {key}, its output {n + 1}) is {got}, "
                f"expected {self._sums[k]}"
            )
        self.count += 1

    def finish(self, events: int) -> None:
        if self.count != events:
            raise Mismatch(f"{self.count} outputs, expected exactly {events}")
        totals = expected_totals(events, self.keys)
        bad = [k for k, total in enumerate(totals) if self._sums[k] != total]
        if bad:
            raise Mismatch(f"{len(bad)} keys end on a wrong sum, e.g. acct-{bad[0]}")


# -- the window workload ----------------------------------------------------------------
#
# The same events (`event_bytes`, keyed by account), with event time in the record
# timestamp: event i happens at t0 + i * 1000 // WINDOW_RATE ms, so time advances by one
# second every WINDOW_RATE events and each 1-second window holds WINDOW_RATE / K events
# of every key. Timestamps never go back within a partition (the input is produced in
# order of i), so no record is late. A window [w, w + size) closes, in every engine
# that keeps event time per input partition (Kafka Streams' stream time, Quix's and
# onceflow's watermarks), once that partition has seen a timestamp >= w + size + grace;
# the last window of the input never closes (nothing later arrives), by design, so
# the expected results do not depend on wall-clock idleness.

WINDOW_MS = 1000
WINDOW_RATE = 10_000  # events per second of event time
WINDOW_GRACE_MS = 0


def window_t0_ms(now: float | None = None, window_ms: int = WINDOW_MS) -> int:
    """The first event's time: an hour ago, on a window boundary (windows are aligned
    to the epoch). Not older: a broker deletes records older than its retention (7
    days by default) by their timestamps, and a window store's changelog has a retention
    of a day. Not newer than now: Kafka 4 rejects timestamps over an hour ahead."""
    ms = int((time.time() if now is None else now) * 1000) - 3_600_000
    return ms - ms % window_ms


def window_event_ms(i: int, t0_ms: int, rate: int = WINDOW_RATE) -> int:
    return t0_ms + i * 1000 // rate


def expected_windows(
    events: int,
    keys: int,
    t0_ms: int,
    *,
    window_ms: int = WINDOW_MS,
    grace_ms: int = WINDOW_GRACE_MS,
    rate: int = WINDOW_RATE,
) -> dict[tuple[int, int], int]:
    """The final sum of every window that the input closes: (key index, window start ms)
    -> sum of `amount`, by a plain loop over the events.

    Raises ValueError when a window would close in some partitions only (its end + grace
    lies between the earliest and the latest last timestamp of a key): then what is
    emitted would depend on how keys fall on partitions, and engines could not be
    compared. Whole seconds of events with rate a multiple of keys never do that.
    """
    if events < keys:
        raise ValueError(f"the window workload needs at least one event per key ({keys})")
    sums: dict[tuple[int, int], int] = {}
    for i in range(events):
        ts = t0_ms + i * 1000 // rate
        w = (ts // window_ms) * window_ms
        kw = (i % keys, w)
        sums[kw] = sums.get(kw, 0) + (i * 7919) % 1000
    # The last event of key k is event events - keys + k (keys are i % keys).
    last = [t0_ms + i * 1000 // rate for i in range(events - keys, events)]
    earliest, latest = min(last), max(last)
    closed: dict[tuple[int, int], int] = {}
    for (key, w), total in sums.items():
        end = w + window_ms + grace_ms
        if earliest < end <= latest:
            raise ValueError(
                f"window {w} (end + grace {end}) closes in some partitions only: "
                f"choose --window-events as a multiple of {rate} events (one second)"
            )
        if end <= earliest:
            closed[(key, w)] = total
    return closed


class WindowChecker:
    """Checks final window results: each expected (key, window) exactly once, with its
    sum; nothing else. Feed it the parsed (key, window start ms, sum) of each output."""

    def __init__(self, expected: dict[tuple[int, int], int]) -> None:
        self.expected = expected
        self.count = 0
        self._seen: set[tuple[int, int]] = set()

    def feed(self, key: bytes | str | None, start: int, total: int) -> None:
        if isinstance(key, bytes):
            key = key.decode()
        if key is None or not key.startswith("acct-"):
            raise Mismatch(f"window output {self.count} has key {key!r}, expected acct-<n>")
        kw = (int(key[5:]), int(start))
        if kw in self._seen:
            raise Mismatch(f"window {start} of {key} emitted twice (output {self.count})")
        want = self.expected.get(kw)
        if want is None:
            raise Mismatch(f"window {start} of {key} was emitted but does not close (or exist)")
        if int(total) != want:
            raise Mismatch(f"window {start} of {key} has sum {total}, expected {want}")
        self._seen.add(kw)
        self.count += 1

    def finish(self) -> None:
        if self.count != len(self.expected):
            missing = sorted(set(self.expected) - self._seen)
            raise Mismatch(
                f"{self.count} window results, expected {len(self.expected)}; "
                f"missing e.g. window {missing[0][1]} of acct-{missing[0][0]}"
            )


# -- throughput ---------------------------------------------------------------------------


def run_until_idle(app: App, profile: Path | None = None) -> tuple[RunStats, float]:
    """`app.run(until_idle=True)` and its wall time in seconds, nothing else timed.

    With `profile`, the run is under cProfile (so slower); the stats are written to that
    file after the timer stops, so writing them is not counted.
    """
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof is not None:
        prof.enable()
    stats = app.run(until_idle=True)
    if prof is not None:
        prof.disable()
    seconds = time.perf_counter() - t0
    if prof is not None and profile is not None:
        profile.parent.mkdir(parents=True, exist_ok=True)
        prof.dump_stats(profile)
    return stats, seconds


def check_run_stats(stats: RunStats, events: int) -> None:
    """The run's own counts must say N in, N out, no dead letter."""
    if (stats.records_in, stats.records_out, stats.dead_letters) != (events, events, 0):
        raise Mismatch(
            f"run stats: {stats.records_in} in, {stats.records_out} out, "
            f"{stats.dead_letters} dead letters; expected {events}, {events}, 0"
        )


class LoadWatch:
    """The machine's 1-minute load average during a run: when it started, and the mean
    and the maximum of samples taken every `every` seconds until it ended (a thread; a
    sample costs one read of /proc/loadavg).

        with LoadWatch() as load:
            run()
        load.start, load.mean, load.max
    """

    def __init__(self, every: float = 0.5) -> None:
        self.every = every
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="load-watch", daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadWatch:
        self.samples.append(os.getloadavg()[0])
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    @property
    def start(self) -> float:
        return round(self.samples[0], 2)

    @property
    def mean(self) -> float:
        return round(sum(self.samples) / len(self.samples), 2)

    @property
    def max(self) -> float:
        return round(max(self.samples), 2)


# -- latency ------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending list."""
    if not sorted_values:
        raise ValueError("no samples")
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def percentile_ms(sorted_seconds: list[float], q: float) -> float:
    return round(percentile(sorted_seconds, q) * 1000, 2)


@dataclass
class SendReport:
    """What the steady producer reports; `error` is set by a producer thread that failed."""

    seconds: float = 0.0
    max_behind: float = 0.0
    sends: list[float] = field(default_factory=list)  # seconds each send_batch took
    error: BaseException | None = None


def send_steady(
    producer: Producer,
    first: int,
    events: int,
    keys: int,
    rate: float,
    batch: int,
    rep: SendReport,
) -> None:
    """Events first..first+events-1 at `rate`/s in batches of `batch`, into `in`.

    Batch b is due at t0 + b*batch/rate on an absolute schedule, so one slow send is
    caught up on rather than shifting every later send (which would quietly lower the
    rate). Each batch is stamped `timestamp=time.time()` just before its `send_batch`.
    """
    t0 = time.perf_counter()
    for b, start in enumerate(range(first, first + events, batch)):
        due = t0 + b * batch / rate
        now = time.perf_counter()
        if now < due:
            time.sleep(due - now)
        else:
            rep.max_behind = max(rep.max_behind, now - due)
        items = event_items(start, min(first + events, start + batch), keys)
        t_send = time.perf_counter()
        producer.send_batch("in", items, timestamp=time.time())
        rep.sends.append(time.perf_counter() - t_send)
    rep.seconds = time.perf_counter() - t0


def tail_outputs(
    consumer: Consumer,
    checker: SumChecker,
    want: int,
    deadline: float,
    check: Callable[[], None],
    latencies: list[float] | None = None,
    first_timed: int = 0,
) -> None:
    """Tail `out` until `want` outputs were checked; record latencies from offset
    `first_timed` on (0 on several partitions, where offsets do not order the input).

    Polls without waiting in the client (a waiting poll returns late, or waits for a
    full batch), sleeping 1 ms when there is nothing, so the measurement adds at most
    about 1 ms; the poll is a few small reads, cheap enough not to starve the App and
    the producer on two cores. `check` raises when a process or thread the run depends
    on has died, so a failure ends the run at once, not at the deadline.
    """
    while checker.count < want:
        recs = consumer.poll(max_records=5000, timeout=0)
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


# -- Kafka plumbing (plain confluent-kafka clients, untimed) ------------------------------


def produce_kafka_input(
    bootstrap: str, topic: str, events: int, keys: int, t0_ms: int | None = None
) -> None:
    """The N events, keyed by account, by a plain idempotent producer: the one input
    path of onceflow's Kafka bench and of its Quix Streams and Kafka Streams baselines.
    With `t0_ms`, each record's timestamp is its event time (`window_event_ms`)."""
    from confluent_kafka import KafkaError, Producer

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,
            "enable.idempotence": True,
            "acks": "all",
        }
    )
    failures: list[str] = []

    def on_delivery(err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            failures.append(str(err))

    for i in range(events):
        key = f"acct-{i % keys}".encode()
        value = event_bytes(i, keys)
        while True:
            try:
                if t0_ms is None:
                    producer.produce(topic, value, key, on_delivery=on_delivery)
                else:
                    ts = window_event_ms(i, t0_ms)
                    producer.produce(topic, value, key, on_delivery=on_delivery, timestamp=ts)
                break
            except BufferError:  # local queue full: let deliveries drain
                producer.poll(0.05)
        if i % 10_000 == 0:
            producer.poll(0)
    remaining = producer.flush(120)
    if remaining or failures:
        raise RuntimeError(
            f"input production failed: {remaining} undelivered, {len(failures)} errors "
            f"{failures[:3]}"
        )


def read_committed(
    bootstrap: str,
    topic: str,
    partitions: int,
    on_record: Callable[[Any], None],
    *,
    group_prefix: str,
    timeout: float = 120.0,
) -> int:
    """Pass every committed record of `topic` (read_committed, from the beginning to the
    end of every partition) to `on_record`; return how many were read."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{group_prefix}-{uuid.uuid4().hex}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        }
    )
    count = 0
    at_eof: set[int] = set()
    deadline = time.monotonic() + timeout
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        while len(at_eof) < partitions:
            if time.monotonic() > deadline:
                raise Mismatch(f"{topic} not read to its end in {timeout:.0f}s ({count} records)")
            for msg in consumer.consume(10_000, timeout=1.0):
                err = msg.error()
                part = msg.partition() or 0
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        at_eof.add(part)
                        continue
                    raise RuntimeError(f"output read failed: {err}")
                at_eof.discard(part)
                count += 1
                on_record(msg)
    finally:
        consumer.close()
    return count


def delete_kafka_topics(admin: Any, names: list[str], log: Callable[[str], None]) -> None:
    """Delete `names`; a topic that cannot be deleted is logged, not fatal (cleanup only)."""
    from confluent_kafka import KafkaException

    if not names:
        return
    for name, future in admin.delete_topics(names, operation_timeout=30).items():
        try:
            future.result()
        except KafkaException as exc:
            log(f"warning: could not delete topic {name}: {exc}")


# -- the shared flags ---------------------------------------------------------------------


@dataclass(frozen=True)
class Defaults:
    """One bench's defaults for the shared flags, full run and `--quick`."""

    events: int
    quick_events: int
    latency_events: int
    quick_latency_events: int
    latency_rate: float
    latency_batch: int = 50


def add_run_flags(p: argparse.ArgumentParser, d: Defaults) -> None:
    """--events --keys --runs (the bench's own flags follow them in --help)."""
    p.add_argument("--events", type=int, help=f"events per throughput run (default {d.events:,})")
    p.add_argument("--keys", type=int, default=1000, help="distinct accounts (default 1000)")
    p.add_argument("--runs", type=int, help="runs per setting, median reported (default 3)")


def add_latency_flags(p: argparse.ArgumentParser, d: Defaults) -> None:
    """--no-latency --latency-events --latency-rate --latency-batch --quick."""
    p.add_argument("--no-latency", action="store_true", help="skip the latency figure")
    p.add_argument(
        "--latency-events",
        type=int,
        help=f"timed events per latency run (default {d.latency_events:,})",
    )
    p.add_argument(
        "--latency-rate",
        type=float,
        default=d.latency_rate,
        help=f"events/s (default {d.latency_rate:,.0f})",
    )
    p.add_argument(
        "--latency-batch",
        type=int,
        default=d.latency_batch,
        help=f"events per send (default {d.latency_batch})",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke check: {d.quick_events:,} events, 1 run, {d.quick_latency_events:,} "
        "latency events (explicit flags win)",
    )


def resolve_shared_flags(p: argparse.ArgumentParser, args: argparse.Namespace, d: Defaults) -> None:
    """Fill in the defaults `--quick` changes and reject values that cannot run."""
    # Explicit flags win over --quick, so they have no argparse default.
    if args.events is None:
        args.events = d.quick_events if args.quick else d.events
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.latency_events is None:
        args.latency_events = d.quick_latency_events if args.quick else d.latency_events
    if min(args.events, args.keys, args.runs, args.latency_events, args.latency_batch) <= 0:
        p.error("--events, --keys, --runs, --latency-events and --latency-batch must be > 0")
    if args.latency_rate <= 0:
        p.error("--latency-rate must be > 0")


# -- the report ---------------------------------------------------------------------------


def stderr_logger(tag: str) -> Callable[[str], None]:
    """Progress goes to stderr, so stdout carries only the figures."""

    def log(msg: str) -> None:
        print(f"[{tag}] {msg}", file=sys.stderr, flush=True)

    return log


def label(interval: float) -> str:
    return f"{interval * 1000:g} ms" if interval < 1 else f"{interval:g} s"


def warn_onceflow_overrides(log: Callable[[str], None]) -> None:
    overrides = sorted(k for k in os.environ if k.startswith("ONCEFLOW_"))
    if overrides:
        log(f"warning: {', '.join(overrides)} set; they change the App's defaults")


def report_console() -> Console:
    from rich.console import Console

    # A fixed width when piped, so a captured report has whole table rows.
    return Console(width=None if sys.stdout.isatty() else 140)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summary_head(version: str, **machine_extra: Any) -> dict[str, Any]:
    """The start of a JSON summary: when, which onceflow, on what machine."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "onceflow": version,
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": cpu_model(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            **machine_extra,
        },
    }


def write_json(path: Path, summary: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


@dataclass
class Target:
    name: str
    target: str
    measured: str
    met: bool | None  # None: not measured in this run


def print_targets(console: Console, targets: list[Target]) -> None:
    from rich.table import Table

    tt = Table(title="Targets (from the issue)", title_justify="left")
    tt.add_column("target")
    tt.add_column("wanted", justify="right")
    tt.add_column("measured", justify="right")
    tt.add_column("met")
    for x in targets:
        met = "not measured" if x.met is None else ("yes" if x.met else "NO")
        tt.add_row(x.name, x.target, x.measured, met)
    console.print(tt)

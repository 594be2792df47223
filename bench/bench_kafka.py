"""onceflow on Kafka benchmark: throughput (exactly-once, at-least-once) beside Quix Streams
and Kafka Streams, latency beside Kafka Streams, and a tumbling-window workload.

    .venv/bin/python bench/bench_kafka.py             # the full run
    .venv/bin/python bench/bench_kafka.py --quick     # smoke check
    .venv/bin/python bench/bench_kafka.py --profile   # one exactly-once run under cProfile

Starts its own single-node Kafka broker (infra/kafka_broker.py) in a temp dir and stops it
at the end. Prints the figures as tables, writes them to bench/out/kafka.json and compares
them with the targets of the issue. A missed target is reported, not fatal; a wrong output
is fatal (exit 1). See bench/README.md, section "Kafka", for what each figure means. The
Kafka Streams baseline (bench/kstreams/, Java) is built by Maven on first use
(kstreams_baseline.py); --no-kstreams runs without it.

The latency figure's App runs in a child process that imports this module
(`python -m onceflow._worker bench_kafka:latency_app`, cwd = bench/, so that `_common` is
importable there too), so the module's top level imports only onceflow, `_common` and the
standard library.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import kstreams_baseline as ks
import onceflow
from _common import (
    WINDOW_GRACE_MS,
    WINDOW_MS,
    WINDOW_RATE,
    Defaults,
    LoadWatch,
    Mismatch,
    SendReport,
    SumChecker,
    Target,
    WindowChecker,
    add_latency_flags,
    add_run_flags,
    build_pipeline,
    check_event_bytes,
    check_run_stats,
    delete_kafka_topics,
    event_items,
    expected_windows,
    label,
    percentile_ms,
    print_targets,
    produce_kafka_input,
    read_committed,
    report_console,
    resolve_shared_flags,
    run_until_idle,
    send_steady,
    stderr_logger,
    summary_head,
    tail_outputs,
    warn_onceflow_overrides,
    window_t0_ms,
    write_json,
)
from onceflow import App, Consumer, Hooks, Producer
from onceflow._supervisor import Child

if TYPE_CHECKING:
    from rich.console import Console

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
OUT_JSON = BENCH_DIR / "out" / "kafka.json"
QUIX_VERSION = "3.28.1"
QUIX_VENV = REPO / ".venv-quixstreams"

PARTITIONS = 4
MAX_BATCH = 5000
APP_NAME = "bench"
LATENCY_APP_NAME = "bench-latency"
LATENCY_TARGET = "bench_kafka:latency_app"

Guarantee = Literal["exactly-once", "at-least-once"]
GUARANTEES: tuple[Guarantee, Guarantee] = ("exactly-once", "at-least-once")

# From issue 12 (same broker, same run): onceflow exactly-once >= 4x Quix Streams and
# >= 2.5x Kafka Streams exactly_once_v2; latency p99 at most Kafka Streams' at the same
# commit interval.
TARGET_VS_QUIX = 4.0
TARGET_VS_KSTREAMS = 2.5
# The embedded bench's target for the cost of the guarantee, shown here for reference.
TARGET_EO_OVER_ALO = 0.8

DEFAULTS = Defaults(
    events=200_000,
    quick_events=20_000,
    latency_events=20_000,
    quick_latency_events=5_000,
    latency_rate=5000,
)
# The window workload (issue 10, section 5): 1,000,000 events over 1000 keys, 100 s of
# event time (99 windows close: 99,000 final results).
WINDOW_EVENTS = 1_000_000
QUICK_WINDOW_EVENTS = 100_000

log = stderr_logger("bench-kafka")


# -- the workload (the same as quix_baseline.py; the events come from _common) -------


def latency_app() -> App:
    """The latency App, for `python -m onceflow._worker bench_kafka:latency_app`.

    The worker sets the store (`--store kafka://...`); the commit interval and the state
    dir come from ONCEFLOW_COMMIT_INTERVAL and ONCEFLOW_STATE_DIR.
    """
    app = App(LATENCY_APP_NAME, partitions=PARTITIONS, max_batch=MAX_BATCH)
    build_pipeline(app)
    return app


# -- Kafka plumbing (plain confluent-kafka clients, untimed) ------------------------


class Kafka:
    """Admin, producer and verifying consumer on the bench broker, outside onceflow."""

    def __init__(self, bootstrap: str) -> None:
        from confluent_kafka.admin import AdminClient

        self.bootstrap = bootstrap
        self.admin = AdminClient({"bootstrap.servers": bootstrap})

    def create_topics(self, names: list[str], partitions: int = PARTITIONS) -> None:
        from confluent_kafka.cimpl import NewTopic

        futures = self.admin.create_topics(
            [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names],
            operation_timeout=30,
            request_timeout=30,
        )
        for future in futures.values():
            future.result()
        # Leaders are elected asynchronously: wait until every partition has one.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            md = self.admin.list_topics(timeout=30).topics
            if all(
                n in md
                and md[n].error is None
                and len(md[n].partitions) == partitions
                and all(p.leader >= 0 for p in md[n].partitions.values())
                for n in names
            ):
                return
            time.sleep(0.1)
        raise RuntimeError(f"topics {names} have no leaders after 30 s")

    def delete_namespace(self, namespace: str) -> None:
        """Delete every topic of one run's namespace (inputs, outputs, changelogs, meta)."""
        names = [n for n in self.admin.list_topics(timeout=30).topics if n.startswith(namespace)]
        delete_kafka_topics(self.admin, names, log)

    def produce_input(self, topic: str, events: int, keys: int) -> None:
        """The N events, keyed by account, as quix_baseline.py produces them."""
        produce_kafka_input(self.bootstrap, topic, events, keys)

    def verify(self, topic: str, events: int, keys: int, timeout: float = 120.0) -> None:
        """Read the committed output (read_committed) to its end; check every record."""
        checker = SumChecker(keys)
        read_committed(
            self.bootstrap,
            topic,
            PARTITIONS,
            lambda msg: checker.feed(msg.key(), msg.value()),
            group_prefix="bench-verify",
            timeout=timeout,
        )
        checker.finish(events)

    def verify_windows(
        self, topic: str, expected: dict[tuple[int, int], int], timeout: float = 120.0
    ) -> int:
        """Read the committed window results (read_committed) to their end; check each
        (key, window) once with its sum, and that all expected ones are there."""
        checker = WindowChecker(expected)

        def feed(msg: Any) -> None:
            row = json.loads(msg.value())
            checker.feed(msg.key(), row["start"], row["sum"])

        read_committed(
            self.bootstrap, topic, PARTITIONS, feed, group_prefix="bench-verify", timeout=timeout
        )
        checker.finish()
        return checker.count


# -- throughput ---------------------------------------------------------------------


@dataclass
class Load:
    """The 1-minute load average during one run: at its start, mean and max."""

    start: float
    mean: float
    max: float

    @classmethod
    def of(cls, watch: LoadWatch) -> Load:
        return cls(watch.start, watch.mean, watch.max)


@dataclass
class Run:
    round: int
    seconds: float  # the whole App.run(until_idle=True)
    eps: float
    setup_seconds: float  # of `seconds`: run() start to its poll loop (topics, producer)
    commit_seconds: float  # of `seconds`: inside commits
    commits: int
    load: Load


@dataclass
class Throughput:
    guarantee: str
    runs: list[Run] = field(default_factory=list)

    @property
    def median_eps(self) -> float:
        return statistics.median(r.eps for r in self.runs)

    @property
    def median_seconds(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def median_setup(self) -> float:
        return statistics.median(r.setup_seconds for r in self.runs)

    @property
    def median_commit_seconds(self) -> float:
        return statistics.median(r.commit_seconds for r in self.runs)

    @property
    def median_commits(self) -> float:
        return statistics.median(r.commits for r in self.runs)

    def to_json(self) -> dict[str, Any]:
        return {
            "guarantee": self.guarantee,
            "median_eps": round(self.median_eps, 1),
            "median_seconds": round(self.median_seconds, 3),
            "median_setup_seconds": round(self.median_setup, 3),
            "median_commit_seconds": round(self.median_commit_seconds, 3),
            "median_commits": self.median_commits,
            "runs": [asdict(r) for r in self.runs],
        }


class PhaseTimer(Hooks):
    """Splits a run: `recovered` fires when run() enters its poll loop (what came before
    is setup: topics, topology check, transactional producer), and `commit_finished`
    gives each commit's duration (steps 3a-3g and the after-commit work)."""

    def __init__(self) -> None:
        self.setup = 0.0
        self.commit = 0.0

    def recovered(self, seconds: float, positions: dict[tuple[str, int], int]) -> None:
        self.setup = seconds

    def commit_finished(
        self, epoch: int, records_in: int, records_out: int, seconds: float
    ) -> None:
        self.commit += seconds


def throughput_run(
    kafka: Kafka,
    events: int,
    keys: int,
    interval: float,
    guarantee: Guarantee,
    profile: Path | None = None,
    round_no: int = 0,
) -> Run:
    """One timed `App.run(until_idle=True)` over N pre-produced events, in a fresh
    namespace (topics, group, transactional id, state dir all new), verified after."""
    ns = f"bk-{'eo' if guarantee == 'exactly-once' else 'alo'}-{uuid.uuid4().hex[:10]}"
    kafka.create_topics([f"{ns}.in"])
    kafka.produce_input(f"{ns}.in", events, keys)
    timer = PhaseTimer()
    app = App(
        APP_NAME,
        store=f"kafka://{kafka.bootstrap}/{ns}",
        commit_interval=interval,
        guarantee=guarantee,
        partitions=PARTITIONS,
        max_batch=MAX_BATCH,
        hooks=[timer],
    )
    build_pipeline(app)
    gc.collect()
    with LoadWatch() as load:
        stats, seconds = run_until_idle(app, profile)
    check_run_stats(stats, events)
    kafka.verify(f"{ns}.out", events, keys)
    kafka.delete_namespace(ns)
    return Run(
        round_no,
        round(seconds, 4),
        round(events / seconds, 1),
        round(timer.setup, 4),
        round(timer.commit, 4),
        stats.commits,
        Load.of(load),
    )


def setup_quix() -> str | None:
    """Create (once) the Quix Streams venv; None when ready, else why not."""
    done = subprocess.run(
        ["bash", str(BENCH_DIR / "make_baseline_venv.sh"), "quixstreams", QUIX_VERSION],
        cwd=REPO,
    )
    return None if done.returncode == 0 else f"make_baseline_venv.sh exited {done.returncode}"


@dataclass
class BaselineRun:
    """One run of Quix Streams or Kafka Streams, in its own process."""

    round: int
    eps: float
    seconds: float
    setup_seconds: float | None  # Quix: before its timer; Kafka Streams: inside it
    commits: int | None
    version: str
    load: Load
    # Kafka Streams: its stream thread's metrics (commit latency, share of time polling,
    # processing, committing), to tell where a slow run's time went.
    thread_metrics: dict[str, float] | None = None


class BaselineFailed(Exception):
    pass


def quix_run(
    bootstrap: str, events: int, keys: int, interval: float, g: Guarantee, round_no: int
) -> BaselineRun:
    """One run of quix_baseline.py (its own venv and process, its own fresh topics)."""
    cmd = [
        str(QUIX_VENV / "bin" / "python"),
        str(BENCH_DIR / "quix_baseline.py"),
        "--bootstrap",
        bootstrap,
        "--events",
        str(events),
        "--keys",
        str(keys),
        "--runs",
        "1",
        "--commit-interval",
        repr(interval),
        "--guarantee",
        g,
    ]
    # Its stdout is one JSON line; its stderr (progress, warnings) is kept for errors.
    # The watch spans the whole process (input production and verification included):
    # quix_baseline.py times its run inside.
    with LoadWatch() as load:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not rows:
        raise BaselineFailed(
            f"quix_baseline.py --guarantee {g} exited {proc.returncode}: {proc.stderr[-2000:]}"
        )
    row = rows[-1]
    eps = float(row["median_eps"])
    return BaselineRun(
        round_no,
        eps,
        round(events / eps, 4),
        float(row["setup_s"][0]),
        None,
        str(row["version"]),
        Load.of(load),
    )


@dataclass
class KStreams:
    """The built Kafka Streams baseline: the `java` to run and its classpath."""

    java: str
    classpath: str
    state_dir: Path


def kstreams_sum_run(
    kafka: Kafka,
    kst: KStreams,
    events: int,
    keys: int,
    interval: float,
    g: Guarantee,
    round_no: int,
) -> BaselineRun:
    """One timed KStreamsBench `sum` run over N pre-produced events in fresh topics, the
    record cache off (one output per input), verified read_committed after."""
    ns = f"ks-{'eo' if g == 'exactly-once' else 'alo'}-{uuid.uuid4().hex[:10]}"
    kafka.create_topics([f"{ns}.in", f"{ns}.out"])
    kafka.produce_input(f"{ns}.in", events, keys)
    cmd = ks.command(
        kst.java,
        kst.classpath,
        "sum",
        bootstrap=kafka.bootstrap,
        input_topic=f"{ns}.in",
        output_topic=f"{ns}.out",
        app_id=ns,
        state_dir=kst.state_dir / ns,
        interval=interval,
        guarantee=g,
        cache_max_bytes=0,
    )
    try:
        with LoadWatch() as load:
            row = ks.run_timed(cmd)
    except ks.KStreamsFailed as exc:
        raise BaselineFailed(str(exc)) from exc
    if row["events"] != events:
        raise Mismatch(f"Kafka Streams saw {row['events']} input records, expected {events}")
    kafka.verify(f"{ns}.out", events, keys)
    kafka.delete_namespace(ns)
    return BaselineRun(
        round_no,
        float(row["eps"]),
        float(row["seconds"]),
        row.get("setup_s"),
        row.get("commits"),
        str(row["version"]),
        Load.of(load),
        row.get("thread_metrics"),
    )


@dataclass
class Figures:
    onceflow: dict[str, Throughput]
    quix: dict[str, list[BaselineRun]]
    kstreams: dict[str, list[BaselineRun]]
    quix_error: str | None = None
    kstreams_error: str | None = None

    def baseline(self, engine: str) -> dict[str, list[BaselineRun]]:
        return self.quix if engine == "quix" else self.kstreams

    def median(self, engine: str, g: str) -> float | None:
        runs = self.baseline(engine).get(g)
        return statistics.median(r.eps for r in runs) if runs else None

    def version(self, engine: str) -> str:
        return next((r.version for rs in self.baseline(engine).values() for r in rs), "")

    def round_ratios(self, engine: str, g: str) -> list[tuple[int, float]]:
        """(round, onceflow / engine) for every round where both ran."""
        ours = {r.round: r.eps for r in self.onceflow[g].runs}
        theirs = self.baseline(engine)[g]
        return [(b.round, ours[b.round] / b.eps) for b in theirs if b.round in ours]


ENGINE_NAMES = {"quix": "Quix Streams", "kstreams": "Kafka Streams"}


def ratio_summary(ratios: list[tuple[int, float]]) -> dict[str, Any] | None:
    if not ratios:
        return None
    values = [r for _, r in ratios]
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "per_round": [round(r, 3) for r in values],
    }


def measure_throughput(
    kafka: Kafka, args: argparse.Namespace, quix: bool, kst: KStreams | None
) -> Figures:
    """`args.runs` rounds; each runs onceflow EO and ALO, then Quix EO and ALO, then Kafka
    Streams EO and ALO (A, B, C, A, B, C ...).

    Interleaved, alternating which guarantee goes first, so that a slow phase of the
    machine lands on every engine and guarantee alike instead of skewing one ratio; each
    round's ratio compares runs minutes apart at most.
    """
    fig = Figures(
        {g: Throughput(g) for g in GUARANTEES},
        {g: [] for g in GUARANTEES},
        {g: [] for g in GUARANTEES},
        kstreams_error=None if kst is not None or args.no_kstreams else "not built",
    )
    for n in range(args.runs):
        order = GUARANTEES if n % 2 == 0 else GUARANTEES[::-1]
        for g in order:
            r = throughput_run(kafka, args.events, args.keys, args.interval, g, round_no=n + 1)
            fig.onceflow[g].runs.append(r)
            log(
                f"round {n + 1}/{args.runs} onceflow {g}: {r.seconds:.2f}s "
                f"(setup {r.setup_seconds:.2f}s, in {r.commits} commits {r.commit_seconds:.2f}s)"
                f", {r.eps:,.0f} ev/s, load {r.load.mean:.1f} (max {r.load.max:.1f}), outputs ok"
            )
        if quix and not fig.quix_error:
            for g in order:
                try:
                    q = quix_run(kafka.bootstrap, args.events, args.keys, args.interval, g, n + 1)
                except BaselineFailed as exc:
                    fig.quix_error = str(exc)
                    log(f"warning: no more Quix runs: {exc}")
                    break
                fig.quix[g].append(q)
                log(
                    f"round {n + 1}/{args.runs} quixstreams {g}: {q.seconds:.2f}s, "
                    f"{q.eps:,.0f} ev/s, load {q.load.mean:.1f} (max {q.load.max:.1f}), "
                    "outputs ok"
                )
        if kst is not None and not fig.kstreams_error:
            for g in order:
                try:
                    k = kstreams_sum_run(
                        kafka, kst, args.events, args.keys, args.interval, g, n + 1
                    )
                except BaselineFailed as exc:
                    fig.kstreams_error = str(exc)
                    log(f"warning: no more Kafka Streams runs: {exc}")
                    break
                fig.kstreams[g].append(k)
                log(
                    f"round {n + 1}/{args.runs} kafka-streams {g}: {k.seconds:.2f}s "
                    f"(to RUNNING {k.setup_seconds or 0:.2f}s, {k.commits} commits of "
                    f"{(k.thread_metrics or {}).get('commit_latency_avg', 0):.0f} ms avg), "
                    f"{k.eps:,.0f} ev/s, load {k.load.mean:.1f} (max {k.load.max:.1f}), "
                    "outputs ok"
                )
    return fig


def run_profile(kafka: Kafka, args: argparse.Namespace) -> int:
    path = OUT_JSON.parent / "profile-kafka-eo.pstats"
    r = throughput_run(kafka, args.events, args.keys, args.interval, "exactly-once", path)
    print(f"\n== exactly-once on Kafka, {label(args.interval)}: {r.eps:,.0f} ev/s under cProfile")
    print(f"   (whole run {r.seconds:.2f}s, setup {r.setup_seconds:.2f}s); stats in {path}")
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(25)
    return 0


# -- windows ------------------------------------------------------------------------


@dataclass
class WindowRun:
    engine: str
    round: int
    eps: float
    seconds: float
    setup_seconds: float | None
    commits: int | None
    results: int  # final window results, all verified
    version: str
    load: Load
    thread_metrics: dict[str, float] | None = None


@dataclass
class WindowFigures:
    events: int
    keys: int
    grace_ms: int
    expected_results: int
    produce_seconds: float
    runs: list[WindowRun] = field(default_factory=list)
    error: str | None = None

    def median(self, engine: str) -> float | None:
        eps = [r.eps for r in self.runs if r.engine == engine]
        return statistics.median(eps) if eps else None


def measure_windows(kafka: Kafka, args: argparse.Namespace, kst: KStreams) -> WindowFigures:
    """The tumbling-window workload: one input topic for every run (produced once,
    untimed), each run a fresh application and output topic, timed to its committed
    final results, which are verified against `expected_windows`."""
    tag = f"bw-{uuid.uuid4().hex[:10]}"
    in_topic = f"{tag}.in"
    kafka.create_topics([in_topic])
    t0 = window_t0_ms()
    started = time.perf_counter()
    produce_kafka_input(kafka.bootstrap, in_topic, args.window_events, args.window_keys, t0)
    produced = time.perf_counter() - started
    expected = expected_windows(
        args.window_events, args.window_keys, t0, grace_ms=args.window_grace_ms
    )
    fig = WindowFigures(
        args.window_events, args.window_keys, args.window_grace_ms, len(expected), produced
    )
    log(
        f"windows: produced {args.window_events:,} events ({args.window_keys} keys, "
        f"{args.window_events / WINDOW_RATE:g} s of event time) in {produced:.1f}s; "
        f"{len(expected):,} window results expected"
    )
    try:
        for n in range(args.window_runs):
            app_id = f"{tag}-ks{n + 1}"
            out = f"{app_id}.out"
            kafka.create_topics([out])
            cmd = ks.command(
                kst.java,
                kst.classpath,
                "window",
                bootstrap=kafka.bootstrap,
                input_topic=in_topic,
                output_topic=out,
                app_id=app_id,
                state_dir=kst.state_dir / app_id,
                interval=args.interval,
                guarantee="exactly-once",
                cache_max_bytes=None,
                window_ms=WINDOW_MS,
                grace_ms=args.window_grace_ms,
            )
            try:
                with LoadWatch() as load:
                    row = ks.run_timed(cmd)
            except ks.KStreamsFailed as exc:
                fig.error = str(exc)
                log(f"warning: no more Kafka Streams window runs: {exc}")
                break
            results = kafka.verify_windows(out, expected)
            run = WindowRun(
                "kstreams",
                n + 1,
                float(row["eps"]),
                float(row["seconds"]),
                row.get("setup_s"),
                row.get("commits"),
                results,
                str(row["version"]),
                Load.of(load),
                row.get("thread_metrics"),
            )
            fig.runs.append(run)
            log(
                f"windows round {n + 1}/{args.window_runs} kafka-streams: {run.seconds:.2f}s, "
                f"{run.eps:,.0f} ev/s, {results:,} final results ok, load {run.load.mean:.1f} "
                f"(max {run.load.max:.1f})"
            )
    finally:
        kafka.delete_namespace(tag)
    return fig


# -- latency ------------------------------------------------------------------------


@dataclass
class LatencyResult:
    engine: str
    interval_s: float
    events: int
    rate_target: float
    rate_achieved: float
    batch: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    send_p50_ms: float
    send_p99_ms: float
    producer_max_behind_ms: float
    samples: int
    warmup_events: int
    load: Load


class AppProcess(Protocol):
    """What the latency measurement needs of the App's process (onceflow's supervisor
    `Child`, or `kstreams_baseline.KStreamsApp`)."""

    def alive(self) -> bool: ...
    def stop(self, timeout: float = ...) -> int: ...
    def kill(self) -> None: ...
    def stderr(self) -> str: ...


def produce_steady(
    store: str, first: int, events: int, keys: int, rate: float, batch: int, rep: SendReport
) -> None:
    """Producer thread: `send_steady`, its failure kept in `rep.error` for the tail's
    check. On Kafka the batch timestamp becomes the record timestamp (milliseconds)."""
    try:
        with Producer(store, producer_id="bench-latency", partitions=PARTITIONS) as producer:
            send_steady(producer, first, events, keys, rate, batch, rep)
    except BaseException as exc:
        rep.error = exc


def onceflow_latency_app(interval: float, state_dir: Path) -> Callable[[str, str], AppProcess]:
    def start(store: str, ns: str) -> AppProcess:
        env = {"ONCEFLOW_COMMIT_INTERVAL": repr(interval), "ONCEFLOW_STATE_DIR": str(state_dir)}
        return Child(LATENCY_TARGET, store=store, env=env, cwd=str(BENCH_DIR))

    return start


def kstreams_latency_app(
    kafka: Kafka, kst: KStreams, interval: float
) -> Callable[[str, str], AppProcess]:
    def start(store: str, ns: str) -> AppProcess:
        cmd = ks.command(
            kst.java,
            kst.classpath,
            "sum",
            bootstrap=kafka.bootstrap,
            input_topic=f"{ns}.in",
            output_topic=f"{ns}.out",
            app_id=ns,
            state_dir=kst.state_dir / ns,
            interval=interval,
            guarantee="exactly-once",
            cache_max_bytes=0,
            serve=True,
        )
        return ks.KStreamsApp(cmd)

    return start


def measure_latency(
    kafka: Kafka,
    engine: str,
    start_app: Callable[[str, str], AppProcess],
    *,
    interval: float,
    events: int,
    keys: int,
    rate: float,
    batch: int,
    warmup: int = 2000,
) -> LatencyResult:
    """Send -> committed output visible to a read_committed consumer, exactly-once.

    The App runs in a child process (its own GIL, or its own JVM); warm-up events go in
    first and must come out before the timed producer starts, so start-up (group join,
    producer init, topic creation) is not counted. Every output is checked, warm-up
    included. The producer and the tail are onceflow's for every engine: a topic `t` of
    the store is the Kafka topic `<ns>.t`.
    """
    ns = f"bk-lat-{engine}-{uuid.uuid4().hex[:10]}"
    store = f"kafka://{kafka.bootstrap}/{ns}"
    kafka.create_topics([f"{ns}.in", f"{ns}.out"])
    with Producer(store, producer_id="bench-warmup", partitions=PARTITIONS) as p:
        p.send_batch("in", event_items(0, warmup, keys))
    child = start_app(store, ns)
    checker = SumChecker(keys)
    latencies: list[float] = []
    rep = SendReport()
    thread: threading.Thread | None = None

    def check() -> None:
        if not child.alive():
            raise RuntimeError(f"the App process exited early: {child.stderr()[-2000:]}")
        if rep.error is not None:
            raise RuntimeError(f"the producer thread failed: {rep.error!r}")

    try:
        with Consumer(store, group="bench-latency", topics=["out"]) as consumer:
            tail_outputs(consumer, checker, warmup, time.monotonic() + 180, check)
            thread = threading.Thread(
                target=produce_steady,
                args=(store, warmup, events, keys, rate, batch, rep),
                name="bench-latency-producer",
                daemon=True,
            )
            with LoadWatch() as load:
                thread.start()
                # Bounded: the send schedule x 3, plus slack for the last commit.
                deadline = time.monotonic() + events / rate * 3 + 30 + interval
                tail_outputs(consumer, checker, warmup + events, deadline, check, latencies)
                thread.join(30)
            check()
            child_rc = child.stop()
            if child_rc != 0:
                raise RuntimeError(f"the App process exited with {child_rc}: {child.stderr()}")
            # Nothing may follow the last expected output, even after the final commit.
            t_end = time.monotonic() + 1.0
            while time.monotonic() < t_end:
                extra = consumer.poll(max_records=10, timeout=0.2)
                if extra:
                    raise Mismatch(f"output after the last expected one: {extra[0]}")
    finally:
        if child.alive():
            child.kill()
    checker.finish(warmup + events)
    kafka.delete_namespace(ns)
    lat = sorted(latencies)
    sends = sorted(rep.sends)
    return LatencyResult(
        engine=engine,
        interval_s=interval,
        events=events,
        rate_target=rate,
        rate_achieved=round(events / rep.seconds, 1),
        batch=batch,
        p50_ms=percentile_ms(lat, 50),
        p90_ms=percentile_ms(lat, 90),
        p99_ms=percentile_ms(lat, 99),
        max_ms=round(lat[-1] * 1000, 2),
        send_p50_ms=percentile_ms(sends, 50),
        send_p99_ms=percentile_ms(sends, 99),
        producer_max_behind_ms=round(rep.max_behind * 1000, 2),
        samples=len(lat),
        warmup_events=warmup,
        load=Load.of(load),
    )


def latency_phase(
    kafka: Kafka, args: argparse.Namespace, state_dir: Path, kst: KStreams | None
) -> list[LatencyResult]:
    """onceflow's latency, then Kafka Streams' at the same interval and load: first in
    the bench, on a quiet broker and disk, as it is the figure most hurt by noise."""
    engines: list[tuple[str, Callable[[str, str], AppProcess]]] = [
        ("onceflow", onceflow_latency_app(args.interval, state_dir / "latency"))
    ]
    if kst is not None:
        engines.append(("kstreams", kstreams_latency_app(kafka, kst, args.interval)))
    out = []
    for engine, start in engines:
        try:
            lat = measure_latency(
                kafka,
                engine,
                start,
                interval=args.interval,
                events=args.latency_events,
                keys=args.keys,
                rate=args.latency_rate,
                batch=args.latency_batch,
            )
        except RuntimeError as exc:
            if engine == "onceflow":
                raise
            log(f"warning: no Kafka Streams latency figure: {exc}")
            continue
        out.append(lat)
        log(
            f"latency {engine}: p50 {lat.p50_ms:.1f} ms, p99 {lat.p99_ms:.1f} ms at "
            f"{lat.rate_achieved:,.0f} ev/s (send p99 {lat.send_p99_ms:.1f} ms), "
            f"load {lat.load.mean:.1f} (max {lat.load.max:.1f}), outputs ok"
        )
        if lat.rate_achieved < 0.9 * lat.rate_target:
            log(
                "warning: the producer fell behind its schedule "
                f"({lat.rate_achieved:,.0f} of {lat.rate_target:,.0f} ev/s): "
                "an overloaded machine? The App saw a slower, burstier input"
            )
    return out


# -- report -------------------------------------------------------------------------


def evaluate(fig: Figures, lats: list[LatencyResult]) -> list[Target]:
    eo = fig.onceflow["exactly-once"].median_eps
    alo = fig.onceflow["at-least-once"].median_eps
    targets = []
    for engine, want in (("quix", TARGET_VS_QUIX), ("kstreams", TARGET_VS_KSTREAMS)):
        b = fig.median(engine, "exactly-once")
        summary = ratio_summary(fig.round_ratios(engine, "exactly-once"))
        measured = "n/a"
        if b and summary:
            measured = f"{eo / b:.2f}x (rounds {summary['min']:.2f}-{summary['max']:.2f})"
        targets.append(
            Target(
                f"onceflow EO / {ENGINE_NAMES[engine]} EO",
                f">= {want:g}x",
                measured,
                eo / b >= want if b else None,
            )
        )
    by = {x.engine: x for x in lats}
    ours, theirs = by.get("onceflow"), by.get("kstreams")
    targets.append(
        Target(
            "latency p99: onceflow <= Kafka Streams",
            "<=",
            f"{ours.p99_ms:.1f} vs {theirs.p99_ms:.1f} ms" if ours and theirs else "n/a",
            ours.p99_ms <= theirs.p99_ms if ours and theirs else None,
        )
    )
    targets.append(
        Target(
            "onceflow EO / ALO (the embedded bench's target)",
            f">= {TARGET_EO_OVER_ALO:g}",
            f"{eo / alo:.2f}",
            eo / alo >= TARGET_EO_OVER_ALO,
        )
    )
    return targets


def fmt(v: float | None, spec: str = ",.0f", suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def print_report(
    console: Console,
    args: argparse.Namespace,
    fig: Figures,
    lats: list[LatencyResult],
    win: WindowFigures | None,
    targets: list[Target],
) -> None:
    from rich.table import Table

    t = Table(
        title=f"Throughput on Kafka: {args.events:,} events, {args.keys:,} keys, "
        f"{PARTITIONS} partitions, commit interval {label(args.interval)}, "
        f"median of {args.runs} round(s), events/s",
        title_justify="left",
    )
    t.add_column("engine")
    for col in ("exactly-once", "at-least-once", "EO / ALO", "EO run s", "of which setup s"):
        t.add_column(col, justify="right")
    t.add_column("of which commits s", justify="right")
    t.add_column("EO load mean (max)", justify="right")
    eo, alo = fig.onceflow["exactly-once"], fig.onceflow["at-least-once"]
    t.add_row(
        f"onceflow {onceflow.__version__}",
        f"{eo.median_eps:,.0f}",
        f"{alo.median_eps:,.0f}",
        f"{eo.median_eps / alo.median_eps:.2f}",
        f"{eo.median_seconds:.2f}",
        f"{eo.median_setup:.2f}",
        f"{eo.median_commit_seconds:.2f} ({eo.median_commits:g})",
        load_cell([r.load for r in eo.runs]),
    )
    for engine in ("quix", "kstreams"):
        beo, balo = fig.median(engine, "exactly-once"), fig.median(engine, "at-least-once")
        if not (beo or balo):
            continue
        runs = fig.baseline(engine)["exactly-once"]
        setups = [r.setup_seconds for r in runs if r.setup_seconds is not None]
        commits = [r.commits for r in runs if r.commits is not None]
        t.add_row(
            f"{ENGINE_NAMES[engine]} {fig.version(engine)}",
            fmt(beo),
            fmt(balo),
            f"{beo / balo:.2f}" if beo and balo else "-",
            fmt(statistics.median(r.seconds for r in runs) if runs else None, ".2f"),
            # Quix's setup is before its timer, Kafka Streams' (start to RUNNING) in it.
            (
                f"({statistics.median(setups):.2f})"
                if engine == "quix"
                else f"{statistics.median(setups):.2f}"
            )
            if setups
            else "-",
            f"- ({statistics.median(commits):g})" if commits else "-",
            load_cell([r.load for r in runs]),
        )
        t.add_row(
            f"onceflow / {ENGINE_NAMES[engine]}",
            f"{eo.median_eps / beo:.2f}x" if beo else "-",
            f"{alo.median_eps / balo:.2f}x" if balo else "-",
            "",
            "",
            "",
            "",
            "",
        )
    console.print(t)
    rt = Table(
        title="Per round, exactly-once (each round runs onceflow, Quix, Kafka Streams in turn): "
        "events/s and onceflow's ratio",
        title_justify="left",
    )
    rt.add_column("round", justify="right")
    for col in ("onceflow", "Quix", "Kafka Streams", "/ Quix", "/ Kafka Streams"):
        rt.add_column(col, justify="right")
    rt.add_column("load mean (max): onceflow, Quix, Kafka Streams", justify="right")
    by_round: dict[str, dict[int, BaselineRun]] = {
        e: {r.round: r for r in fig.baseline(e)["exactly-once"]} for e in ("quix", "kstreams")
    }
    for r in eo.runs:
        q, k = by_round["quix"].get(r.round), by_round["kstreams"].get(r.round)
        rt.add_row(
            str(r.round),
            f"{r.eps:,.0f}",
            fmt(q.eps if q else None),
            fmt(k.eps if k else None),
            fmt(r.eps / q.eps if q else None, ".2f", "x"),
            fmt(r.eps / k.eps if k else None, ".2f", "x"),
            ", ".join(f"{x.load.mean:.1f} ({x.load.max:.1f})" if x else "-" for x in (r, q, k)),
        )
    for engine, pos in (("quix", 4), ("kstreams", 5)):
        summary = ratio_summary(fig.round_ratios(engine, "exactly-once"))
        if summary:
            cells = [""] * 6
            cells[pos - 1] = f"{summary['median']:.2f}x [{summary['min']:.2f}-{summary['max']:.2f}]"
            rt.add_row(f"median [min-max] {ENGINE_NAMES[engine]}", *cells)
    console.print(rt)
    if lats:
        lt = Table(
            title="Latency on Kafka, send -> committed output seen by a read_committed "
            "consumer, exactly-once, one after the other in this run",
            title_justify="left",
        )
        lt.add_column("engine")
        for col in ("commit interval", "events", "rate ev/s", "p50 ms", "p90 ms", "p99 ms"):
            lt.add_column(col, justify="right")
        for col in ("max ms", "send p50 ms", "send p99 ms", "load mean (max)"):
            lt.add_column(col, justify="right")
        for lat in lats:
            lt.add_row(
                "onceflow" if lat.engine == "onceflow" else ENGINE_NAMES[lat.engine],
                label(lat.interval_s),
                f"{lat.events:,}",
                f"{lat.rate_achieved:,.0f}",
                f"{lat.p50_ms:.1f}",
                f"{lat.p90_ms:.1f}",
                f"{lat.p99_ms:.1f}",
                f"{lat.max_ms:.1f}",
                f"{lat.send_p50_ms:.1f}",
                f"{lat.send_p99_ms:.1f}",
                f"{lat.load.mean:.1f} ({lat.load.max:.1f})",
            )
        console.print(lt)
    if win is not None:
        wt = Table(
            title=f"Tumbling {WINDOW_MS / 1000:g} s window sum per key, final emission, "
            f"grace {win.grace_ms} ms, exactly-once: {win.events:,} events, {win.keys:,} keys, "
            f"{win.expected_results:,} final results, commit interval {label(args.interval)}",
            title_justify="left",
        )
        wt.add_column("engine")
        wt.add_column("round", justify="right")
        for col in ("events/s", "run s", "to RUNNING s", "commits", "results ok"):
            wt.add_column(col, justify="right")
        wt.add_column("load mean (max)", justify="right")
        for w in win.runs:
            wt.add_row(
                f"{ENGINE_NAMES[w.engine]} {w.version}",
                str(w.round),
                f"{w.eps:,.0f}",
                f"{w.seconds:.2f}",
                fmt(w.setup_seconds, ".2f"),
                fmt(w.commits, "g"),
                f"{w.results:,}",
                f"{w.load.mean:.1f} ({w.load.max:.1f})",
            )
        m = win.median("kstreams")
        if m:
            wt.add_row("Kafka Streams, median", "", f"{m:,.0f}", "", "", "", "", "")
        wt.add_row("onceflow", "", "not measured: no windows yet (issue 10)", "", "", "", "", "")
        console.print(wt)
    print_targets(console, targets)


def load_cell(loads: list[Load]) -> str:
    if not loads:
        return "-"
    return f"{statistics.mean(x.mean for x in loads):.1f} ({max(x.max for x in loads):.1f})"


# -- main ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="onceflow on Kafka: throughput EO/ALO beside Quix Streams and Kafka "
        "Streams, latency, a tumbling-window workload"
    )
    add_run_flags(p, DEFAULTS)
    p.add_argument(
        "--interval", type=float, default=0.1, help="commit interval, seconds (default 0.1)"
    )
    p.add_argument("--no-quix", action="store_true", help="skip the Quix Streams baseline")
    p.add_argument(
        "--no-kstreams",
        action="store_true",
        help="skip the Kafka Streams baseline (Java 17+ and Maven; its throughput, "
        "latency and window runs)",
    )
    add_latency_flags(p, DEFAULTS)
    p.add_argument("--no-windows", action="store_true", help="skip the window workload")
    p.add_argument(
        "--window-events",
        type=int,
        help=f"events of the window workload (default {WINDOW_EVENTS:,}; "
        f"--quick {QUICK_WINDOW_EVENTS:,}); a multiple of {WINDOW_RATE:,} (1 s of event time)",
    )
    p.add_argument(
        "--window-keys", type=int, default=1000, help="keys of the window workload (1000)"
    )
    p.add_argument(
        "--window-runs", type=int, help="runs of the window workload per engine (default: --runs)"
    )
    p.add_argument(
        "--window-grace-ms",
        type=int,
        default=WINDOW_GRACE_MS,
        help=f"window grace, ms (default {WINDOW_GRACE_MS})",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead of the figures: one exactly-once run under cProfile "
        "(bench/out/profile-kafka-eo.pstats)",
    )
    p.add_argument("--json", type=Path, default=OUT_JSON, help=f"summary file ({OUT_JSON})")
    args = p.parse_args(argv)
    resolve_shared_flags(p, args, DEFAULTS)
    if args.interval <= 0:
        p.error("--interval must be > 0")
    if args.window_events is None:
        args.window_events = QUICK_WINDOW_EVENTS if args.quick else WINDOW_EVENTS
    if args.window_runs is None:
        args.window_runs = args.runs
    if min(args.window_events, args.window_keys, args.window_runs) <= 0 or args.window_grace_ms < 0:
        p.error("--window-events, --window-keys, --window-runs must be > 0, grace >= 0")
    return args


def build_kstreams(args: argparse.Namespace, state_dir: Path) -> tuple[KStreams | None, str | None]:
    """The Kafka Streams baseline, built once (Maven, Maven Central) into its cache;
    (None, why) when it cannot be built here."""
    if args.no_kstreams or args.profile:
        return None, None
    try:
        java, cp = ks.build(log)
    except ks.KStreamsUnavailable as exc:
        log(f"warning: no Kafka Streams baseline: {exc}")
        return None, str(exc)
    except ks.KStreamsFailed as exc:
        log(f"warning: no Kafka Streams baseline, its build failed: {exc}")
        return None, str(exc)
    return KStreams(java, cp, state_dir), None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import confluent_kafka
    from infra.kafka_broker import KafkaBroker, kafka_version

    console = report_console()
    warn_onceflow_overrides(log)
    check_event_bytes("quix_baseline.py")
    summary: dict[str, Any] = {
        **summary_head(
            onceflow.__version__,
            confluent_kafka=confluent_kafka.version()[0],
            librdkafka=confluent_kafka.libversion()[0],
        ),
        "kafka": kafka_version(),
        "params": {
            "events": args.events,
            "keys": args.keys,
            "runs": args.runs,
            "interval_s": args.interval,
            "partitions": PARTITIONS,
            "max_batch": MAX_BATCH,
            "latency_events": args.latency_events,
            "latency_rate": args.latency_rate,
            "latency_batch": args.latency_batch,
            "window_events": args.window_events,
            "window_keys": args.window_keys,
            "window_runs": args.window_runs,
            "window_ms": WINDOW_MS,
            "window_grace_ms": args.window_grace_ms,
            "window_rate": WINDOW_RATE,
        },
    }
    quix_ready = False
    if not args.no_quix and not args.profile:
        why_not = setup_quix()
        quix_ready = why_not is None
        if why_not:
            log(f"warning: no Quix Streams baseline: {why_not}")
            summary["quix_error"] = why_not
    with tempfile.TemporaryDirectory(prefix="onceflow-bench-kafka-") as tmp:
        state_dir = Path(tmp) / "state"
        os.environ["ONCEFLOW_STATE_DIR"] = str(state_dir)
        kst, kst_error = build_kstreams(args, Path(tmp) / "kstreams")
        broker = KafkaBroker(Path(tmp) / "kafka")
        log(f"starting a Kafka {kafka_version()} broker in {broker.workdir}")
        broker.start()
        log(f"broker ready at {broker.bootstrap} in {broker.timings.get('total', 0):.1f}s")
        summary["broker_start_s"] = round(broker.timings.get("total", 0.0), 1)
        kafka: Kafka | None = None
        try:
            kafka = Kafka(broker.bootstrap)
            if args.profile:
                return run_profile(kafka, args)
            lats = [] if args.no_latency else latency_phase(kafka, args, state_dir, kst)
            fig = measure_throughput(kafka, args, quix=quix_ready, kst=kst)
            if kst_error:
                fig.kstreams_error = kst_error
            win = None
            if kst is not None and not args.no_windows:
                win = measure_windows(kafka, args, kst)
        except Mismatch as exc:
            log(f"CORRECTNESS MISMATCH: {exc}")
            summary["error"] = f"correctness mismatch: {exc}"
            write_json(args.json, summary)
            return 1
        finally:
            # Our clients go first, so librdkafka does not log the broker going away.
            kafka = None
            gc.collect()
            broker.stop()
            log("broker stopped")
    targets = evaluate(fig, lats)
    wall = time.perf_counter() - t_start
    eo = fig.onceflow["exactly-once"].median_eps
    alo = fig.onceflow["at-least-once"].median_eps
    loads = [r.load.max for t in fig.onceflow.values() for r in t.runs]
    for engine in ("quix", "kstreams"):
        loads += [r.load.max for rs in fig.baseline(engine).values() for r in rs]
    loads += [x.load.max for x in lats] + ([w.load.max for w in win.runs] if win else [])

    def baseline_json(engine: str, error: str | None) -> dict[str, Any]:
        return {
            "version": fig.version(engine),
            "error": error,
            "results": [
                {
                    "guarantee": g,
                    "median_eps": round(m, 1),
                    "runs": [asdict(r) for r in fig.baseline(engine)[g]],
                }
                for g in GUARANTEES
                if (m := fig.median(engine, g)) is not None
            ],
            "vs": {
                g: round(fig.onceflow[g].median_eps / m, 3)
                for g in GUARANTEES
                if (m := fig.median(engine, g)) is not None
            },
            "round_ratios": {g: ratio_summary(fig.round_ratios(engine, g)) for g in GUARANTEES},
        }

    summary.update(
        {
            "throughput": [x.to_json() for x in fig.onceflow.values()],
            "eo_over_alo": round(eo / alo, 3),
            "quix": baseline_json("quix", fig.quix_error),
            "kstreams": baseline_json("kstreams", fig.kstreams_error),
            "latency": [asdict(x) for x in lats],
            "windows": asdict(win) if win is not None else None,
            "targets": [asdict(x) for x in targets],
            "max_load1": max(loads),
            "wall_seconds": round(wall, 1),
        }
    )
    print_report(console, args, fig, lats, win, targets)
    write_json(args.json, summary)
    cpus = os.cpu_count() or 1
    if max(loads) > cpus:
        console.print(
            f"warning: the 1-minute load average reached {max(loads):.1f} on {cpus} CPUs "
            "during the timed runs: other work shared the machine, the figures are noisy"
        )
    console.print(f"wall time {wall:.0f} s; summary written to {args.json}")
    if fig.quix_error:
        log(f"Quix baseline incomplete: {fig.quix_error[:300]}")
    if fig.kstreams_error:
        log(f"Kafka Streams baseline incomplete: {fig.kstreams_error[:300]}")
    if win is not None and win.error:
        log(f"window runs incomplete: {win.error[:300]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

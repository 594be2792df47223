"""onceflow on Kafka benchmark: throughput (exactly-once, at-least-once), Quix Streams, latency.

    .venv/bin/python bench/bench_kafka.py             # the full run, 2-2.5 min on 2 vCPUs
    .venv/bin/python bench/bench_kafka.py --quick     # smoke check, about 30 seconds
    .venv/bin/python bench/bench_kafka.py --profile   # one exactly-once run under cProfile

Starts its own single-node Kafka broker (infra/kafka_broker.py) in a temp dir and stops it
at the end. Prints the figures as tables, writes them to bench/out/kafka.json and compares
them with the targets of the issue. A missed target is reported, not fatal; a wrong output
is fatal (exit 1). See bench/README.md, section "Kafka", for what each figure means.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import onceflow
from _common import (
    Defaults,
    Mismatch,
    SendReport,
    SumChecker,
    Target,
    add_latency_flags,
    add_run_flags,
    build_pipeline,
    check_event_bytes,
    check_run_stats,
    delete_kafka_topics,
    event_items,
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

# From the issue: onceflow exactly-once >= 1.5 x Quix Streams exactly-once on one broker.
TARGET_VS_QUIX = 1.5
# The embedded bench's target for the cost of the guarantee, shown here for reference.
TARGET_EO_OVER_ALO = 0.8

DEFAULTS = Defaults(
    events=200_000,
    quick_events=20_000,
    latency_events=20_000,
    quick_latency_events=5_000,
    latency_rate=5000,
)

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


# -- throughput ---------------------------------------------------------------------


@dataclass
class Run:
    seconds: float  # the whole App.run(until_idle=True)
    eps: float
    setup_seconds: float  # of `seconds`: run() start to its poll loop (topics, producer)
    commit_seconds: float  # of `seconds`: inside commits
    commits: int
    load1: float  # the machine's 1-minute load average when the run started


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
    load = os.getloadavg()[0]
    stats, seconds = run_until_idle(app, profile)
    check_run_stats(stats, events)
    kafka.verify(f"{ns}.out", events, keys)
    kafka.delete_namespace(ns)
    return Run(
        round(seconds, 4),
        round(events / seconds, 1),
        round(timer.setup, 4),
        round(timer.commit, 4),
        stats.commits,
        round(load, 2),
    )


def setup_quix() -> str | None:
    """Create (once) the Quix Streams venv; None when ready, else why not."""
    done = subprocess.run(
        ["bash", str(BENCH_DIR / "make_baseline_venv.sh"), "quixstreams", QUIX_VERSION],
        cwd=REPO,
    )
    return None if done.returncode == 0 else f"make_baseline_venv.sh exited {done.returncode}"


def quix_run(bootstrap: str, events: int, keys: int, interval: float, g: Guarantee) -> QuixRun:
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
    load = os.getloadavg()[0]
    # Its stdout is one JSON line; its stderr (progress, warnings) is kept for errors.
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not rows:
        raise QuixFailed(
            f"quix_baseline.py --guarantee {g} exited {proc.returncode}: {proc.stderr[-2000:]}"
        )
    row = rows[-1]
    return QuixRun(
        float(row["median_eps"]), float(row["setup_s"][0]), str(row["version"]), round(load, 2)
    )


@dataclass
class QuixRun:
    eps: float
    setup_seconds: float  # quixstreams' own setup (topic checks), outside its timer
    version: str
    load1: float


class QuixFailed(Exception):
    pass


@dataclass
class Figures:
    onceflow: dict[str, Throughput]
    quix: dict[str, list[QuixRun]]
    quix_error: str | None = None

    def quix_median(self, g: str) -> float | None:
        runs = self.quix.get(g)
        return statistics.median(r.eps for r in runs) if runs else None

    @property
    def quix_version(self) -> str:
        return next((r.version for rs in self.quix.values() for r in rs), "")


def measure_throughput(kafka: Kafka, args: argparse.Namespace, quix: bool) -> Figures:
    """`args.runs` rounds; each runs onceflow EO and ALO, then Quix EO and ALO.

    Interleaved, alternating which guarantee goes first, so that a slow phase of the
    machine lands on every engine and guarantee alike instead of skewing one ratio.
    """
    fig = Figures({g: Throughput(g) for g in GUARANTEES}, {g: [] for g in GUARANTEES})
    for n in range(args.runs):
        order = GUARANTEES if n % 2 == 0 else GUARANTEES[::-1]
        for g in order:
            r = throughput_run(kafka, args.events, args.keys, args.interval, g)
            fig.onceflow[g].runs.append(r)
            log(
                f"round {n + 1}/{args.runs} onceflow {g}: {r.seconds:.2f}s "
                f"(setup {r.setup_seconds:.2f}s, in {r.commits} commits {r.commit_seconds:.2f}s)"
                f", {r.eps:,.0f} ev/s, load {r.load1:.1f}, outputs ok"
            )
        if not quix or fig.quix_error:
            continue
        for g in order:
            try:
                q = quix_run(kafka.bootstrap, args.events, args.keys, args.interval, g)
            except QuixFailed as exc:
                fig.quix_error = str(exc)
                log(f"warning: no more Quix runs: {exc}")
                break
            fig.quix[g].append(q)
            log(
                f"round {n + 1}/{args.runs} quixstreams {g}: {args.events / q.eps:.2f}s, "
                f"{q.eps:,.0f} ev/s, load {q.load1:.1f}, outputs ok"
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


# -- latency ------------------------------------------------------------------------


@dataclass
class LatencyResult:
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


def measure_latency(
    kafka: Kafka,
    state_dir: Path,
    *,
    interval: float,
    events: int,
    keys: int,
    rate: float,
    batch: int,
    warmup: int = 2000,
) -> LatencyResult:
    """Send -> committed output visible to a read_committed consumer, exactly-once.

    The App runs in a child process (its own GIL); warm-up events go in first and must
    come out before the timed producer starts, so start-up (group join, producer init,
    topic creation) is not counted. Every output is checked, warm-up included.
    """
    ns = f"bk-lat-{uuid.uuid4().hex[:10]}"
    store = f"kafka://{kafka.bootstrap}/{ns}"
    kafka.create_topics([f"{ns}.in", f"{ns}.out"])
    with Producer(store, producer_id="bench-warmup", partitions=PARTITIONS) as p:
        p.send_batch("in", event_items(0, warmup, keys))
    env = {"ONCEFLOW_COMMIT_INTERVAL": repr(interval), "ONCEFLOW_STATE_DIR": str(state_dir)}
    child = Child(LATENCY_TARGET, store=store, env=env, cwd=str(BENCH_DIR))
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
            tail_outputs(consumer, checker, warmup, time.monotonic() + 120, check)
            thread = threading.Thread(
                target=produce_steady,
                args=(store, warmup, events, keys, rate, batch, rep),
                name="bench-latency-producer",
                daemon=True,
            )
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
    )


# -- report -------------------------------------------------------------------------


def evaluate(fig: Figures) -> list[Target]:
    eo = fig.onceflow["exactly-once"].median_eps
    alo = fig.onceflow["at-least-once"].median_eps
    q = fig.quix_median("exactly-once")
    return [
        Target(
            "onceflow EO / Quix Streams EO",
            f">= {TARGET_VS_QUIX:g}x",
            f"{eo / q:.2f}x" if q else "n/a",
            eo / q >= TARGET_VS_QUIX if q else None,
        ),
        Target(
            "onceflow EO / ALO (the embedded bench's target)",
            f">= {TARGET_EO_OVER_ALO:g}",
            f"{eo / alo:.2f}",
            eo / alo >= TARGET_EO_OVER_ALO,
        ),
    ]


def print_report(
    console: Console,
    args: argparse.Namespace,
    fig: Figures,
    lat: LatencyResult | None,
    targets: list[Target],
) -> None:
    from rich.table import Table

    t = Table(
        title=f"Throughput on Kafka: {args.events:,} events, {args.keys:,} keys, "
        f"{PARTITIONS} partitions, commit interval {label(args.interval)}, "
        f"median of {args.runs} run(s), events/s",
        title_justify="left",
    )
    t.add_column("engine")
    for col in ("exactly-once", "at-least-once", "EO / ALO", "EO run s", "of which setup s"):
        t.add_column(col, justify="right")
    t.add_column("of which commits s", justify="right")
    eo, alo = fig.onceflow["exactly-once"], fig.onceflow["at-least-once"]
    t.add_row(
        f"onceflow {onceflow.__version__}",
        f"{eo.median_eps:,.0f}",
        f"{alo.median_eps:,.0f}",
        f"{eo.median_eps / alo.median_eps:.2f}",
        f"{eo.median_seconds:.2f}",
        f"{eo.median_setup:.2f}",
        f"{eo.median_commit_seconds:.2f} ({eo.median_commits:g})",
    )
    qeo, qalo = fig.quix_median("exactly-once"), fig.quix_median("at-least-once")
    if qeo or qalo:
        t.add_row(
            f"Quix Streams {fig.quix_version}",
            f"{qeo:,.0f}" if qeo else "-",
            f"{qalo:,.0f}" if qalo else "-",
            f"{qeo / qalo:.2f}" if qeo and qalo else "-",
            f"{args.events / qeo:.2f}" if qeo else "-",
            "-",
            "-",
        )
        t.add_row(
            "onceflow / Quix",
            f"{eo.median_eps / qeo:.2f}x" if qeo else "-",
            f"{alo.median_eps / qalo:.2f}x" if qalo else "-",
            "",
            "",
            "",
            "",
        )
    console.print(t)
    if lat is not None:
        lt = Table(
            title="Latency on Kafka, send -> committed output seen by a read_committed "
            "consumer, exactly-once",
            title_justify="left",
        )
        for col in ("commit interval", "events", "rate ev/s", "p50 ms", "p90 ms", "p99 ms"):
            lt.add_column(col, justify="right")
        for col in ("max ms", "send p50 ms", "send p99 ms"):
            lt.add_column(col, justify="right")
        lt.add_row(
            label(lat.interval_s),
            f"{lat.events:,}",
            f"{lat.rate_achieved:,.0f}",
            f"{lat.p50_ms:.1f}",
            f"{lat.p90_ms:.1f}",
            f"{lat.p99_ms:.1f}",
            f"{lat.max_ms:.1f}",
            f"{lat.send_p50_ms:.1f}",
            f"{lat.send_p99_ms:.1f}",
        )
        console.print(lt)
    print_targets(console, targets)


# -- main ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="onceflow on Kafka: throughput EO/ALO, Quix Streams baseline, latency"
    )
    add_run_flags(p, DEFAULTS)
    p.add_argument(
        "--interval", type=float, default=0.1, help="commit interval, seconds (default 0.1)"
    )
    p.add_argument("--no-quix", action="store_true", help="skip the Quix Streams baseline")
    add_latency_flags(p, DEFAULTS)
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
    return args


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
            lat = None
            if not args.no_latency:
                # First, on a quiet broker and disk: it is the figure most hurt by noise.
                lat = measure_latency(
                    kafka,
                    state_dir / "latency",
                    interval=args.interval,
                    events=args.latency_events,
                    keys=args.keys,
                    rate=args.latency_rate,
                    batch=args.latency_batch,
                )
                log(
                    f"latency: p50 {lat.p50_ms:.1f} ms, p99 {lat.p99_ms:.1f} ms at "
                    f"{lat.rate_achieved:,.0f} ev/s (send p99 {lat.send_p99_ms:.1f} ms), "
                    "outputs ok"
                )
                if lat.rate_achieved < 0.9 * lat.rate_target:
                    log(
                        "warning: the producer fell behind its schedule "
                        f"({lat.rate_achieved:,.0f} of {lat.rate_target:,.0f} ev/s): "
                        "an overloaded machine? The App saw a slower, burstier input"
                    )
            fig = measure_throughput(kafka, args, quix=quix_ready)
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
    targets = evaluate(fig)
    wall = time.perf_counter() - t_start
    eo = fig.onceflow["exactly-once"].median_eps
    alo = fig.onceflow["at-least-once"].median_eps
    loads = [r.load1 for t in fig.onceflow.values() for r in t.runs]
    loads += [r.load1 for rs in fig.quix.values() for r in rs]
    summary.update(
        {
            "throughput": [x.to_json() for x in fig.onceflow.values()],
            "eo_over_alo": round(eo / alo, 3),
            "quix": {
                "version": fig.quix_version,
                "error": fig.quix_error,
                "results": [
                    {
                        "guarantee": g,
                        "median_eps": round(m, 1),
                        "runs": [asdict(r) for r in fig.quix[g]],
                    }
                    for g in GUARANTEES
                    if (m := fig.quix_median(g)) is not None
                ],
            },
            "vs_quix": {
                g: round(fig.onceflow[g].median_eps / m, 3)
                for g in GUARANTEES
                if (m := fig.quix_median(g)) is not None
            },
            "latency": asdict(lat) if lat is not None else None,
            "targets": [asdict(x) for x in targets],
            "max_load1": max(loads),
            "wall_seconds": round(wall, 1),
        }
    )
    print_report(console, args, fig, lat, targets)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())

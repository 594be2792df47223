"""`onceflow chaos`: fault a user's pipeline again and again, then audit its effects.

The pipeline runs as child processes on a scratch store while a producer feeds it. A
shuffled plan of faults runs against them (`_chaos_faults`: SIGKILLs at random and at
every named step of the commit protocol, pauses at every step while a successor takes
over, twin processes and producers, a starved CPU, broker and PostgreSQL outages). At the
end it drains, and its committed outputs, state and dedup ids are compared with a
reference run of the same App over the same events with no fault: every input id must
have the same effects, once.

A pipeline module may define `chaos_events(n, seed)` returning `onceflow.testing.Event`s
(otherwise events are `{"id", "key", "amount"}` dicts on the App's first source), and
`chaos_audit(store_path)` returning `(check, ok, detail)` tuples for business invariants;
given a `postgres` keyword parameter, it is also passed the URL of the crashing run's
PostgreSQL database.

An App with a PostgresSink needs `postgres=` (`--postgres`), a server on which chaos
creates a scratch database per run and audits what landed there, on the embedded store
and on Kafka (where every worker writes into the crashing run's database); see
`_chaos_postgres`.
"""

from __future__ import annotations

import inspect
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import click
from rich.console import Console
from rich.table import Table

from . import _chaos_faults as faults
from . import _chaos_postgres as chaos_pg
from ._app import App
from ._chaos_faults import (
    BrokerControl,
    PostgresControl,
    ShellBroker,
    ShellPausableBroker,
    ShellPostgres,
)
from ._consumer import Consumer
from ._crash import CRASH_POINTS
from ._effects import EffectSink
from ._errors import ConfigError
from ._kafka import TXN_TIMEOUT_S
from ._kafka_common import KafkaURL, is_kafka
from ._loader import load_app, load_object
from ._records import Record
from ._sinks import FileSink, Sink
from ._supervisor import Child
from .testing import Event, Snapshot, diff, output_topics, reference, snapshot
from .testing import _committed as _committed_records

# How long the final, fault-free child may take to drain everything.
_DRAIN_TIMEOUT_S = 600.0


@dataclass
class ChaosResult:
    events: int
    random_kills: int = 0
    broker_kills: int = 0
    step_kills: list[str] = field(default_factory=list)
    # Protocol steps where a worker was paused while a successor took over.
    pauses: list[str] = field(default_factory=list)
    # How many entries of each fault kind ran (see `_chaos_faults.FAULTS`).
    faults: dict[str, int] = field(default_factory=dict)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    seconds: float = 0.0
    # The scratch PostgreSQL databases (crashing run, reference run), if any.
    postgres_databases: tuple[str, ...] = ()
    # The scratch stores (crashing run, reference run): SQLite paths or Kafka namespaces.
    stores: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)


@dataclass
class ChaosPlan:
    """Which faults a run injects, and how often (see `_chaos_faults`)."""

    kills: int = 5
    broker: BrokerControl | None = None
    broker_kills: int = 1
    # None: every fault kind that applies to the store and the controls given.
    faults: Sequence[str] | None = None
    # How often each fault kind other than kills runs (pauses: at every step, each round).
    rounds: int = 1
    postgres_control: PostgresControl | None = None
    # How long `broker-pause-commit` keeps the broker frozen: past the worker's client
    # timeout for transactional calls, so that the commit's outcome becomes unknown.
    broker_pause_s: float = TXN_TIMEOUT_S + 5.0


def default_events(app: App, n: int, seed: int) -> list[Event]:
    """Generic events for the App's first external source, with ~5% re-sent ids."""
    outputs = {s.options["topic"] for s in app._steps if s.kind == "to"}
    topics = [s.options["topic"] for s in app._sources if s.options["topic"] not in outputs]
    if not topics:
        raise click.UsageError("the App has no external source topic to feed")
    rng = random.Random(seed)
    out: list[Event] = []
    for i in range(n):
        key = f"k{rng.randrange(50)}"
        ev = Event(
            topics[0],
            {"id": f"ev-{i}", "key": key, "amount": rng.randint(1, 100)},
            key=key,
            id=f"ev-{i}",
        )
        out.append(ev)
        if rng.random() < 0.05:
            # A client retry from a new session: same business id, new producer.
            out.append(Event(ev.topic, ev.value, key=ev.key, id=ev.id, producer="retry"))
    return out


def _stores(store: str | None, workdir: str) -> tuple[str, str]:
    """Scratch stores for the crashing run and the reference run, never the user's own."""
    if store is not None and is_kafka(store):
        url = KafkaURL.parse(store)
        tag = uuid.uuid4().hex[:8]
        ns = f"{url.namespace}." if url.namespace else ""
        return (
            f"kafka://{url.bootstrap}/{ns}chaos-{tag}",
            f"kafka://{url.bootstrap}/{ns}reference-{tag}",
        )
    paths = (os.path.join(workdir, "chaos.db"), os.path.join(workdir, "reference.db"))
    for path in paths:
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)
    return paths


class _Monitor(threading.Thread):
    """A read_committed consumer reading the outputs while the chaos runs: what it sees
    must never hold an input id more often than the reference does."""

    def __init__(
        self,
        store: str,
        topics: list[str],
        identify: Callable[[Record], Hashable] = lambda rec: rec.id,
    ) -> None:
        super().__init__(name="chaos-monitor", daemon=True)
        self.store, self.topics, self.identify = store, topics, identify
        # By position: a consumer that reconnects (after a broker restart, a rebalance)
        # may read a record again, which is not a duplicate in the topic.
        self.records: dict[tuple[str, int, int], Hashable] = {}
        self.stop_at: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Consumer(
                self.store, group=f"chaos-monitor-{uuid.uuid4().hex[:8]}", topics=self.topics
            ) as c:
                while self.stop_at is None or time.monotonic() < self.stop_at:
                    for rec in c.poll(max_records=5000, timeout=0.2):
                        self.records[(rec.topic, rec.partition, rec.offset)] = self.identify(rec)
        except BaseException as exc:
            self.error = exc


def run_chaos(
    target: str,
    *,
    events: int,
    kills: int = 5,
    seed: int,
    workdir: str,
    store: str | None = None,
    workers: int = 1,
    broker: BrokerControl | None = None,
    broker_kills: int = 1,
    postgres: str | None = None,
    keep_postgres: bool = False,
    faults: Sequence[str] | None = None,
    rounds: int = 1,
    postgres_control: PostgresControl | None = None,
    broker_pause_s: float = TXN_TIMEOUT_S + 5.0,
    progress: Callable[[str], None] = lambda msg: None,
) -> ChaosResult:
    """Fault `target` again and again on scratch stores, then audit it (see the module doc).

    `postgres` is a server URL on which to create the scratch databases of an App's
    PostgresSinks; they are dropped at the end unless `keep_postgres`. `faults` names the
    fault kinds to inject (default: all that apply), `postgres_control` restarts that
    server for `pg-restart`.
    """
    t0 = time.monotonic()
    app = load_app(target)
    module = target.partition(":")[0]
    chaos_plan = ChaosPlan(
        kills, broker, broker_kills, faults, rounds, postgres_control, broker_pause_s
    )
    dbs = _scratch_postgres(app, module, postgres, progress)
    try:
        result = _run_chaos(
            target,
            app,
            module,
            events=events,
            seed=seed,
            workdir=workdir,
            store=store,
            workers=workers,
            chaos_plan=chaos_plan,
            dbs=dbs,
            progress=progress,
        )
        result.seconds = time.monotonic() - t0
        return result
    finally:
        if dbs is not None and keep_postgres:
            progress(f"PostgreSQL databases kept: {', '.join(dbs.names)}")
        elif dbs is not None:
            dbs.drop()


def _scratch_postgres(
    app: App,
    module: str,
    postgres: str | None,
    progress: Callable[[str], None],
) -> chaos_pg.ScratchDatabases | None:
    sinks = chaos_pg.postgres_sinks(app)
    if postgres is None:
        if sinks:
            # Without scratch databases both runs would write into the pipeline's own
            # database: the user's data would get chaos rows, and the audit see nothing.
            names = ", ".join(repr(s.name) for s in sinks)
            raise ConfigError(
                f"the App writes to PostgreSQL (sinks {names}); operator action: give "
                "--postgres postgresql://USER@HOST:PORT/DB, a server on which chaos may "
                "create and drop scratch databases"
            )
        return None
    dbs = chaos_pg.ScratchDatabases.create(postgres, _optional(module, "chaos_postgres_setup"))
    progress(f"PostgreSQL scratch databases {', '.join(dbs.names)}")
    try:
        for url in (dbs.chaos_url, dbs.reference_url):
            chaos_pg.preflight(app, url)
    except BaseException:
        dbs.drop()
        raise
    return dbs


def _run_chaos(
    target: str,
    app: App,
    module: str,
    *,
    events: int,
    seed: int,
    workdir: str,
    store: str | None,
    workers: int,
    chaos_plan: ChaosPlan,
    dbs: chaos_pg.ScratchDatabases | None,
    progress: Callable[[str], None],
) -> ChaosResult:
    rng = random.Random(seed)
    make_events = _optional(module, "chaos_events")
    evs: list[Event] = (
        list(make_events(events, seed)) if make_events else default_events(app, events, seed)
    )
    result = ChaosResult(events=len(evs), postgres_databases=dbs.names if dbs else ())
    os.makedirs(workdir, exist_ok=True)
    crashed_store, ref_store = _stores(store, workdir)
    result.stores = (crashed_store, ref_store)
    on_kafka = is_kafka(crashed_store)
    if not on_kafka:
        # Two processes of one App on one SQLite store fence each other in turn.
        workers = 1
    try:
        kinds = faults.choose(
            chaos_plan.faults, on_kafka, chaos_plan.broker, chaos_plan.postgres_control
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    log = faults.FaultLog()
    pool = faults.Workers(target, crashed_store, workers, workdir, log)
    if dbs is not None:
        pool.env.update(dbs.child_env())

    points = _crash_points(app)
    entries = faults.plan(
        kinds,
        points,
        kills=chaos_plan.kills,
        broker_kills=chaos_plan.broker_kills,
        rounds=chaos_plan.rounds,
        rng=rng,
    )
    # Both runs get the App's topics before the first send, so that input topics have
    # the App's partition count in both and state is partitioned alike.
    for s in (crashed_store, ref_store):
        _create_topics(target, s)
    # The producer runs beside the faults, as in production: sends land while the
    # pipeline is dying and restarting. It sends one chunk as each entry starts, so that
    # every incarnation has fresh input to die in the middle of.
    # On Kafka a new incarnation takes a second or two to start: a chunk trickled over
    # that long still has input for it, so that it reaches a step's second passage.
    feeder = faults.Feeder(crashed_store, evs, len(entries) + 1, log, 0.3 if on_kafka else 0.03)
    feeder.start()
    monitor: _Monitor | None = None
    if on_kafka:
        monitor = _Monitor(crashed_store, output_topics(app))
    runner = faults.Faults(
        pool,
        app.name,
        [s.options["topic"] for s in app._sources],
        on_kafka,
        rng,
        log,
        progress,
        broker=chaos_plan.broker,
        postgres=chaos_plan.postgres_control,
        broker_pause_s=chaos_plan.broker_pause_s,
    )
    pool.start_all()
    if monitor is not None:
        monitor.start()
    for kind, point in entries:
        pool.revive()
        runner.run(kind, point, feeder)
    while feeder.is_alive():
        feeder.release()
        feeder.join(0.1)
    _record_faults(result, log, entries)
    if feeder.error is not None:
        result.checks.append(("producer sent every event", False, repr(feeder.error)))
        pool.kill_all()
        return result
    progress("draining")
    drained = _drain(pool, on_kafka)
    result.checks.append(("pipeline drained after the last restart", drained[0], drained[1]))
    result.checks.extend(faults.audit(log, kinds, on_kafka))
    if monitor is not None:
        monitor.stop_at = time.monotonic() + 5.0
        monitor.join(30)
    progress("reference run")
    ref_app = load_app(target)
    if dbs is not None:
        chaos_pg.point_sinks(ref_app, dbs.reference_url)
    expected = reference(ref_app, evs, store=ref_store)
    actual = snapshot(app, crashed_store)
    ordered = len(app._sources) == 1
    problems = diff(actual, expected, ordered=ordered)
    _audit(result, actual, expected, problems)
    _locate_lost(result, actual, expected, evs, crashed_store, app.dead_letter_topic)
    if monitor is not None:
        _audit_monitor(result, monitor, expected)
        from ._kafka_status import open_transactions

        hanging = open_transactions(crashed_store)
        result.checks.append(
            (
                "no transaction left open",
                not hanging,
                ", ".join(f"{t.topic}[{t.partition}]" for t in hanging) or "none",
            )
        )
    if dbs is not None:
        result.checks.extend(chaos_pg.audit(app, crashed_store, dbs, ref_store))
    _audit_coverage(result, points)
    audit = _optional(module, "chaos_audit")
    if audit is not None:
        result.checks.extend(_call_audit(audit, crashed_store, dbs))
    return result


def _record_faults(result: ChaosResult, log: faults.FaultLog, entries: list[faults.Entry]) -> None:
    result.faults = dict(log.counts)
    result.step_kills = list(log.step_kills)
    result.pauses = list(log.pauses)
    result.random_kills = sum(1 for k, p in entries if k == "kill") - len(log.step_kills)
    result.broker_kills = log.counts["broker-kill"]


# Points where a sink of another system holds a prepared transaction whose fate only the
# store's record decides: a chaos run that never killed there did not test the 2PC.
_TWO_PHASE_POINTS = ("sink_prepared", "after_commit")


def _crash_points(app: App) -> list[str]:
    """The protocol steps this App passes: a point it never reaches would only stall."""
    sinks = [s.fn for s in app._steps if s.kind == "sink"]
    reachable = {
        "sink_flush": any(isinstance(s, FileSink) for s in sinks),
        "sink_delivered": any(isinstance(s, FileSink) for s in sinks),
        "sink_prepared": any(_two_phase(s) for s in sinks),
        "effect_called": any(isinstance(s, EffectSink) for s in sinks),
    }
    return [p for p in CRASH_POINTS if reachable.get(p, True)]


def _two_phase(sink: Sink) -> bool:
    return type(sink).prepare is not Sink.prepare


def _audit_coverage(result: ChaosResult, points: list[str]) -> None:
    """With a two-phase sink, a kill inside its commit window is part of the proof."""
    if "sink_prepared" not in points:
        return
    missed = [p for p in _TWO_PHASE_POINTS if p not in result.step_kills]
    result.checks.append(
        (
            "killed between PREPARE TRANSACTION and COMMIT PREPARED (sink_prepared, after_commit)",
            not missed,
            f"never reached: {', '.join(missed)}" if missed else "both",
        )
    )


def _call_audit(
    audit: Callable[..., Any], store: str, dbs: chaos_pg.ScratchDatabases | None
) -> list[tuple[str, bool, str]]:
    """The module's own checks; a hook that takes `postgres` also gets the database."""
    if dbs is not None and _takes(audit, "postgres"):
        return list(audit(store, postgres=dbs.chaos_url))
    return list(audit(store))


def _takes(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def _create_topics(target: str, store: str) -> None:
    app = load_app(target)
    app.store = store
    session = app._open_session()
    try:
        session.ensure_topics(app._topics())
    finally:
        session.close()


def _drain(pool: faults.Workers, on_kafka: bool) -> tuple[bool, str]:
    """Stop the chaos and let the App finish: every worker runs until it is idle; on
    Kafka a last single worker then picks up anything a worker that left early wrote."""
    pool.kill_all()
    finals = [pool.start(slot, until_idle=True) for slot in range(pool.count)]
    for child in finals:
        code = _wait(child)
        if code != 0:
            return False, child.stderr()[-500:]
    if on_kafka:
        last = pool.start(0, until_idle=True)
        code = _wait(last)
        if code != 0:
            return False, last.stderr()[-500:]
    return True, f"{pool.restarts} workers restarted after dying on their own"


def _wait(child: Child) -> int:
    try:
        return child.wait(_DRAIN_TIMEOUT_S)
    except Exception:
        child.kill()
        return -1


def _audit(result: ChaosResult, actual: Snapshot, expected: Snapshot, problems: list[str]) -> None:
    n_out = sum(len(v) for v in actual.outputs.values())
    topic_problems = "; ".join(p for p in problems if p.startswith("topic"))
    state_problems = "; ".join(p for p in problems if p.startswith("state"))
    dedup_problems = "; ".join(p for p in problems if p.startswith("dedup"))
    result.checks.append(
        (
            "committed outputs equal the reference fold (none lost, none doubled)",
            not topic_problems,
            topic_problems[:500] or f"{n_out} outputs",
        )
    )
    result.checks.append(
        (
            "state equals the fold of the committed inputs",
            not state_problems,
            state_problems[:500] or f"{len(actual.state)} keys",
        )
    )
    result.checks.append(
        (
            "dedup ids equal the reference",
            not dedup_problems,
            dedup_problems or f"{len(actual.dedup_ids)} ids",
        )
    )
    for topic in sorted({t for t, _ in actual.outputs} | {t for t, _ in expected.outputs}):
        a, e = actual.ids(topic), expected.ids(topic)
        doubled = sum(1 for i, c in a.items() if c > e.get(i, 0))
        lost = sum(1 for i, c in e.items() if c > a.get(i, 0))
        result.checks.append(
            (
                f"every input id once in '{topic}'",
                doubled == 0 and lost == 0,
                f"{len(a)} ids, {doubled} doubled, {lost} lost",
            )
        )


def _locate_lost(
    result: ChaosResult,
    actual: Snapshot,
    expected: Snapshot,
    evs: list[Event],
    store: str,
    dead_letter_topic: str,
) -> None:
    """Where the first lost ids are: in the input (the pipeline skipped them) or not
    (the input lost them), and whether they became dead letters (and why), so that a
    failed run says which side to look at."""
    lost: set[str] = set()
    for topic in {t for t, _ in expected.outputs}:
        a, e = actual.ids(topic), expected.ids(topic)
        lost |= {i for i, c in e.items() if i is not None and c > a.get(i, 0)}
    if not lost:
        return
    inputs = sorted({ev.topic for ev in evs if ev.id in lost})
    found: dict[str, str] = {}
    for topic in inputs:
        for rec in _committed_records(store, topic):
            if rec.id in lost and rec.id not in found:
                found[rec.id] = f"{topic}[{rec.partition}]@{rec.offset}"
    for rec in _committed_records(store, dead_letter_topic):
        if rec.id in lost:
            err = (rec.headers or {}).get("onceflow-error", "")[:120]
            found[rec.id] = f"{found.get(rec.id, 'not in the input')}, dead-lettered ({err})"
    shown = sorted(lost)[:8]
    where = ", ".join(f"{i} {found.get(i, 'not in the input')}" for i in shown)
    result.checks.append(("lost ids located in the input", False, f"{len(lost)} lost: {where}"))


def _audit_monitor(result: ChaosResult, monitor: _Monitor, expected: Snapshot) -> None:
    if monitor.error is not None:
        result.checks.append(("read_committed monitor ran", False, repr(monitor.error)))
        return
    # Chaos identifies records by their input id (the default `identify`).
    seen: dict[str, Counter[str | None]] = {t: Counter() for t in monitor.topics}
    for (topic, _, _), rid in monitor.records.items():
        seen[topic][cast("str | None", rid)] += 1
    doubled = 0
    for topic, counts in seen.items():
        want = expected.ids(topic)
        doubled += sum(1 for i, c in counts.items() if c > want.get(i, 0))
    result.checks.append(
        (
            "a read_committed consumer during the run never saw an id twice",
            doubled == 0,
            f"{len(monitor.records)} records seen live, {doubled} ids more often than "
            "the reference",
        )
    )


def _optional(module: str, name: str) -> Callable[..., Any] | None:
    try:
        obj = load_object(f"{module}:{name}")
    except Exception:
        return None
    return obj if callable(obj) else None


def render(result: ChaosResult, console: Console) -> None:
    table = Table(title="onceflow chaos: audit of committed effects")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for name, ok, detail in result.checks:
        table.add_row(name, "[green]PASS[/]" if ok else "[red]FAIL[/]", detail)
    console.print(
        f"events sent: {result.events}   random kills: {result.random_kills}   "
        f"kills at protocol steps: {len(result.step_kills)} ({', '.join(result.step_kills)})   "
        f"pauses at protocol steps: {len(result.pauses)}   "
        f"broker kills: {result.broker_kills}   time: {result.seconds:.1f}s"
    )
    faults_table = Table(title="faults injected")
    faults_table.add_column("fault")
    faults_table.add_column("count", justify="right")
    for kind in faults.FAULTS:
        if kind in result.faults:
            faults_table.add_row(kind, str(result.faults[kind]))
    console.print(faults_table)
    console.print(table)
    console.print("[green]exactly-once holds[/]" if result.ok else "[red]AUDIT FAILED[/]")


def _fault_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    kinds = [k.strip() for k in value.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in faults.FAULTS]
    if unknown:
        raise click.BadParameter(f"unknown {', '.join(unknown)}; use {', '.join(faults.FAULTS)}")
    return kinds


@click.command("chaos")
@click.argument("target")
@click.option("--events", default=5000, show_default=True, help="Events to send.")
@click.option("--kills", default=5, show_default=True, help="SIGKILLs at random moments.")
@click.option("--seed", default=1, show_default=True, help="Seed of events and kill times.")
@click.option("--dir", "workdir", default=None, help="Keep the stores here (default: temp).")
@click.option(
    "--store",
    "chaos_store",
    default=None,
    help="kafka://HOST:PORT to run on Kafka (scratch namespaces); default: SQLite files.",
)
@click.option("--workers", default=2, show_default=True, help="Worker processes (Kafka).")
@click.option(
    "--faults",
    "fault_kinds",
    default=None,
    callback=_fault_list,
    help=f"Comma-separated fault kinds of {', '.join(faults.FAULTS)} "
    "(default: every one that applies to the store and the controls given).",
)
@click.option(
    "--rounds", default=1, show_default=True, help="Times each fault other than kills runs."
)
@click.option("--broker-kill", default=None, help="Shell command that SIGKILLs the broker.")
@click.option("--broker-start", default=None, help="Shell command that starts it again.")
@click.option("--broker-pause", default=None, help="Shell command that SIGSTOPs the broker.")
@click.option("--broker-resume", default=None, help="Shell command that SIGCONTs it.")
@click.option("--broker-kills", default=1, show_default=True, help="Broker kills (Kafka).")
@click.option(
    "--broker-pause-seconds",
    default=TXN_TIMEOUT_S + 5.0,
    show_default=True,
    help="How long broker-pause-commit keeps the broker paused.",
)
@click.option(
    "--postgres",
    default=None,
    metavar="URL",
    help="postgresql://USER@HOST:PORT/DB: a server on which to create (and, without "
    "--dir, drop) scratch databases for the App's PostgresSinks, and audit them.",
)
@click.option("--postgres-restart", default=None, help="Shell command that restarts that server.")
def chaos_command(
    target: str,
    events: int,
    kills: int,
    seed: int,
    workdir: str | None,
    chaos_store: str | None,
    workers: int,
    fault_kinds: list[str] | None,
    rounds: int,
    broker_kill: str | None,
    broker_start: str | None,
    broker_pause: str | None,
    broker_resume: str | None,
    broker_kills: int,
    broker_pause_seconds: float,
    postgres: str | None,
    postgres_restart: str | None,
) -> None:
    """Fault a pipeline repeatedly and audit its committed effects against a reference.

    TARGET is MODULE:APP. Workers are SIGKILLed, paused while a successor takes over,
    started twice on one slot, starved of CPU; two producers share one id. On Kafka
    (--store kafka://...), several workers run and, given --broker-kill and
    --broker-start, the broker is killed and taken down past the group session (and
    with --broker-pause/--broker-resume, paused inside a commit). An App with a
    PostgresSink needs --postgres; its tables are then audited too, and with
    --postgres-restart the server is restarted during the run. Exits 0 only when every
    check holds.
    """
    broker = _shell_broker(broker_kill, broker_start, broker_pause, broker_resume)
    console = Console()
    tmp = workdir or tempfile.mkdtemp(prefix="onceflow-chaos-")
    try:
        result = run_chaos(
            target,
            events=events,
            kills=kills,
            seed=seed,
            workdir=tmp,
            store=chaos_store,
            workers=workers,
            broker=broker,
            broker_kills=broker_kills,
            postgres=postgres,
            keep_postgres=workdir is not None,
            faults=fault_kinds,
            rounds=rounds,
            postgres_control=ShellPostgres(postgres_restart) if postgres_restart else None,
            broker_pause_s=broker_pause_seconds,
            progress=lambda msg: console.log(msg),
        )
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    render(result, console)
    raise SystemExit(0 if result.ok else 1)


def _shell_broker(
    kill: str | None, start: str | None, pause: str | None, resume: str | None
) -> BrokerControl | None:
    if (kill is None) != (start is None):
        raise click.UsageError("--broker-kill and --broker-start go together")
    if (pause is None) != (resume is None):
        raise click.UsageError("--broker-pause and --broker-resume go together")
    if kill is None or start is None:
        if pause is not None:
            raise click.UsageError("--broker-pause needs --broker-kill and --broker-start")
        return None
    if pause is not None and resume is not None:
        return ShellPausableBroker(kill, start, pause, resume)
    return ShellBroker(kill, start)

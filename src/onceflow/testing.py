"""Crash testing as part of the public API.

A test lists the events to send, with `Crash` markers between them; `run_with_crashes`
sends each segment, runs the App until it dies at the marked protocol step, restarts
it, and finally drains it. `reference` runs the same App on the same events once,
without crashes: the reference fold. `diff` compares their committed effects.

    >>> from onceflow.testing import Crash, Event, assert_exactly_once
    >>> events = [Event("amounts", {"n": i}, key=f"k{i % 3}", id=f"e{i}") for i in range(100)]
    >>> events.insert(50, Crash("in_transaction"))
    >>> assert_exactly_once(make_app, events, workdir=tmp_path)   # doctest: +SKIP

Crashes here are in-process: the injector raises `SimulatedCrash` (a BaseException) at
the step, which ends `App.run()` there with no further commit, as a SIGKILL would. The
same points are reachable by a real SIGKILL with `ONCEFLOW_CRASH_AT` (see `onceflow
chaos`).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._app import App
from ._backend import open_backend
from ._crash import CRASH_POINTS, CrashInjector, SimulatedCrash
from ._dataflow import STATEFUL
from ._errors import ConfigError
from ._producer import Producer
from ._records import Record
from ._serde import load_state

__all__ = [
    "CRASH_POINTS",
    "Crash",
    "Event",
    "Report",
    "SimulatedCrash",
    "Snapshot",
    "assert_exactly_once",
    "diff",
    "reference",
    "run_with_crashes",
    "send",
    "snapshot",
]


@dataclass(frozen=True)
class Event:
    """One record to send. `producer` and `sequence` let a test re-send exactly as a
    retrying producer would (same producer id and sequence: the log keeps one copy)."""

    topic: str
    value: Any
    key: str | None = None
    id: str | None = None
    producer: str = "testing"
    sequence: int | None = None


@dataclass(frozen=True)
class Crash:
    """Marker: the App dies the `nth` time it reaches protocol step `at`."""

    at: str = "before_commit"
    nth: int = 1

    def __post_init__(self) -> None:
        if self.at not in CRASH_POINTS:
            raise ConfigError(f"Crash(at={self.at!r}): use one of {', '.join(CRASH_POINTS)}")


OutputRow = tuple[bytes, str | None, tuple[tuple[str, str], ...]]


@dataclass
class Snapshot:
    """The committed effects of an App: outputs per (topic, key), state, dedup ids."""

    outputs: dict[tuple[str, str | None], list[OutputRow]] = field(default_factory=dict)
    state: dict[tuple[str, int, str], Any] = field(default_factory=dict)
    dedup_ids: set[tuple[str, int, str]] = field(default_factory=set)

    def values(self, topic: str) -> list[bytes]:
        return [
            v
            for (t, _), rows in sorted(self.outputs.items(), key=_k)
            if t == topic
            for v, _, _ in rows
        ]

    def ids(self, topic: str) -> Counter[str | None]:
        return Counter(i for (t, _), rows in self.outputs.items() if t == topic for _, i, _ in rows)


def _k(item: tuple[tuple[str, str | None], Any]) -> tuple[str, str]:
    return (item[0][0], item[0][1] or "")


@dataclass
class Report:
    crashes: int
    snapshot: Snapshot


def send(store: str, events: Iterable[Event], *, batch: int = 1000) -> int:
    """Send events in order, each producer id keeping its sequences. Returns how many.

    Consecutive events of one producer and topic go in one durable batch; order within
    every partition is the order of `events` either way.
    """
    producers: dict[str, Producer] = {}
    n = 0
    run: list[Event] = []

    def flush() -> None:
        if not run:
            return
        first = run[0]
        p = producers.get(first.producer)
        if p is None:
            p = producers[first.producer] = Producer(store, producer_id=first.producer)
        seqs = [e.sequence for e in run]
        p.send_batch(
            first.topic,
            [(e.key, e.value, e.id) for e in run],
            sequences=None if seqs[0] is None else [int(x) for x in seqs if x is not None],
        )
        run.clear()

    try:
        for ev in events:
            if run and (
                len(run) >= batch
                or ev.producer != run[0].producer
                or ev.topic != run[0].topic
                or (ev.sequence is None) != (run[0].sequence is None)
            ):
                flush()
            run.append(ev)
            n += 1
        flush()
    finally:
        for p in producers.values():
            p.close()
    return n


def output_topics(app: App) -> list[str]:
    topics = {app.dead_letter_topic}
    for s in app._steps:
        if s.kind == "to":
            topics.add(s.options["topic"])
        if s.kind == "dedupe" and s.options["replay_to"]:
            topics.add(s.options["replay_to"])
    return sorted(topics)


def snapshot(app: App, store: str | None = None) -> Snapshot:
    """Read the committed outputs, state and dedup ids of `app` from its store."""
    backend = open_backend(store or app.store)
    snap = Snapshot()
    for topic in output_topics(app):
        for rec in backend.committed_records(topic):
            hdrs = tuple(sorted((rec.headers or {}).items()))
            snap.outputs.setdefault((topic, rec.key), []).append((rec.value, rec.id, hdrs))
    stateful = {s.name for s in app._steps if s.kind in STATEFUL}
    state, ids = backend.committed_state(app.name, app._step_topics())
    for (step, part, key), value in state.items():
        if step in stateful:
            snap.state[(step, part, key)] = load_state(value)
    snap.dedup_ids = ids
    return snap


def _committed(store: str, topic: str) -> list[Record]:
    """Every committed record of `topic`, partition by partition, on either backend."""
    return open_backend(store).committed_records(topic)


def run_with_crashes(
    app: App, events: Sequence[Event | Crash], *, store: str | os.PathLike[str]
) -> Report:
    """Send each segment of `events`, run `app` until it crashes at the segment's marker,
    restart, and after the last segment run until every source is drained."""
    app.store = os.fspath(store)
    crashes = 0
    segment: list[Event] = []
    for item in [*events, None]:
        if isinstance(item, Event):
            segment.append(item)
            continue
        send(app.store, segment)
        segment = []
        app._crash = None if item is None else CrashInjector(f"{item.at}:{item.nth}", "raise")
        try:
            app.run(until_idle=True)
        except SimulatedCrash:
            crashes += 1
        finally:
            app._crash = None
    return Report(crashes, snapshot(app))


def reference(
    app: App, events: Sequence[Event | Crash], *, store: str | os.PathLike[str]
) -> Snapshot:
    """The reference fold: the same events through the same App once, with no crash."""
    app.store = os.fspath(store)
    send(app.store, [e for e in events if isinstance(e, Event)])
    app.run(until_idle=True)
    return snapshot(app)


def diff(actual: Snapshot, expected: Snapshot, *, ordered: bool = True) -> list[str]:
    """Differences between two snapshots; empty when the effects are the same.

    With `ordered`, each key's outputs must come in the same order (true for any stage
    whose keys each live on one input partition); otherwise they are compared as
    multisets, for pipelines whose stages interleave partitions differently per run.
    """
    problems: list[str] = []
    for tk in sorted(set(actual.outputs) | set(expected.outputs), key=lambda t: (t[0], t[1] or "")):
        a = actual.outputs.get(tk, [])
        e = expected.outputs.get(tk, [])
        same = a == e if ordered else Counter(a) == Counter(e)
        if not same:
            extra = Counter(a) - Counter(e)
            lost = Counter(e) - Counter(a)
            problems.append(
                f"topic {tk[0]!r} key {tk[1]!r}: {len(a)} outputs, expected {len(e)}"
                + (f"; duplicated/extra {list(extra.elements())[:3]}" if extra else "")
                + (f"; lost {list(lost.elements())[:3]}" if lost else "")
                + ("; same outputs in another order" if not extra and not lost else "")
            )
    for sk in sorted(set(actual.state) | set(expected.state)):
        if actual.state.get(sk) != expected.state.get(sk):
            problems.append(
                f"state {sk}: {actual.state.get(sk)!r}, expected {expected.state.get(sk)!r}"
            )
    if actual.dedup_ids != expected.dedup_ids:
        problems.append(
            f"dedup ids differ: {len(actual.dedup_ids - expected.dedup_ids)} extra, "
            f"{len(expected.dedup_ids - actual.dedup_ids)} missing"
        )
    return problems


def assert_exactly_once(
    make_app: Callable[[], App],
    events: Sequence[Event | Crash],
    *,
    workdir: str | os.PathLike[str],
    ordered: bool = True,
    stores: tuple[str, str] | None = None,
) -> Report:
    """Run with crashes and without, and fail with the differences if effects differ.

    The two runs use SQLite files in `workdir`, or the two `stores` given (two Kafka
    namespaces, say: `("kafka://host:9092/crashed", "kafka://host:9092/reference")`).
    """
    crashed_store, reference_store = stores or (
        os.path.join(workdir, "crashed.db"),
        os.path.join(workdir, "reference.db"),
    )
    crashed = run_with_crashes(make_app(), events, store=crashed_store)
    expected = reference(make_app(), events, store=reference_store)
    problems = diff(crashed.snapshot, expected, ordered=ordered)
    if problems:
        raise AssertionError(
            f"effects differ from the reference fold after {crashed.crashes} crashes:\n  "
            + "\n  ".join(problems[:20])
        )
    return crashed

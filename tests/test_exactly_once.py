"""Exactly-once, proven by effects: crash at every protocol step, in-process and by a real
SIGKILL, then compare committed outputs and state with the reference fold."""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from onceflow import App, FencedError, Hooks, Producer
from onceflow._supervisor import Child
from onceflow.testing import (
    CRASH_POINTS,
    Crash,
    Event,
    assert_exactly_once,
    diff,
    reference,
    send,
    snapshot,
)

from . import pipelines
from .helpers import read_all, run_until_idle, zombie_beside

ROOT = Path(__file__).resolve().parent.parent


def amount_events(n: int, seed: int = 0, crash: str | None = None) -> list[Event | Crash]:
    rng = random.Random(seed)
    out: list[Event | Crash] = []
    for i in range(n):
        key = f"k{rng.randrange(6)}"
        out.append(Event("amounts", {"n": rng.randint(1, 9)}, key=key, id=f"e{i}"))
        if crash and i % 17 == 8:
            out.append(Crash(crash, nth=rng.randint(1, 2)))
    return out


def payment_events(n: int, seed: int = 0, crash: str | None = None) -> list[Event | Crash]:
    rng = random.Random(seed)
    out: list[Event | Crash] = []
    for i in range(n):
        v = {"id": f"p{i}", "n": rng.randint(1, 40), "to": f"acct{rng.randrange(4)}"}
        payer = f"acct{rng.randrange(4)}"
        out.append(Event("payments", v, key=payer, id=v["id"]))
        if rng.random() < 0.15:  # retried from a new session: same business id
            out.append(Event("payments", v, key=payer, id=v["id"], producer="retry"))
        if crash and i % 13 == 6:
            out.append(Crash(crash, nth=rng.randint(1, 2)))
    return out


@pytest.mark.parametrize("point", CRASH_POINTS[:5])
def test_single_stage_survives_crashes_at_every_step(
    point: str, tmp_path: Path, store_pair: tuple[str, str]
) -> None:
    report = assert_exactly_once(
        pipelines.running_sum,
        amount_events(120, crash=point),
        workdir=tmp_path,
        stores=store_pair,
    )
    assert report.crashes >= 3


@pytest.mark.parametrize("point", CRASH_POINTS[:5])
def test_dedupe_process_and_two_stages_survive_crashes(
    point: str, tmp_path: Path, store_pair: tuple[str, str]
) -> None:
    report = assert_exactly_once(
        pipelines.payments,
        payment_events(90, crash=point),
        workdir=tmp_path,
        ordered=False,
        stores=store_pair,
    )
    assert report.crashes >= 3


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_sinks_survive_crashes(point: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = amount_events(80, crash=point)
    monkeypatch.setenv("ONCEFLOW_TEST_FILE", str(tmp_path / "crashed.jsonl"))
    crashed_app = pipelines.with_sinks()
    from onceflow.testing import run_with_crashes

    crashed = run_with_crashes(crashed_app, events, store=tmp_path / "c.db")
    monkeypatch.setenv("ONCEFLOW_TEST_FILE", str(tmp_path / "reference.jsonl"))
    expected = reference(pipelines.with_sinks(), events, store=tmp_path / "r.db")
    assert diff(crashed.snapshot, expected) == []
    got = (tmp_path / "crashed.jsonl").read_bytes()
    want = (tmp_path / "reference.jsonl").read_bytes()
    assert got.endswith(b"\n")
    assert sorted(got.splitlines()) == sorted(want.splitlines())
    tables = []
    for db in ("c.db", "r.db"):
        conn = sqlite3.connect(tmp_path / db)
        tables.append(sorted(conn.execute("SELECT k, v FROM seen_totals").fetchall()))
        conn.close()
    assert tables[0] == tables[1] and tables[0]


def _run_child_until_killed(target: str, store: str, point: str, nth: int) -> bool:
    child = Child(target, store=store, crash_at=f"{point}:{nth}", until_idle=True, cwd=str(ROOT))
    code = child.wait(60)
    assert code in (0, -9), child.stderr()
    return child.killed


@pytest.mark.parametrize("point", CRASH_POINTS[:5])
def test_real_sigkill_at_every_step(point: str, tmp_path: Path) -> None:
    """The same, with a real kill -9 of a child process, while a producer keeps sending."""
    store = str(tmp_path / "kill.db")
    events = [e for e in payment_events(150, seed=3) if isinstance(e, Event)]
    kills = 0
    for i, chunk in enumerate(range(0, len(events), 40)):
        send(store, events[chunk : chunk + 40])
        kills += _run_child_until_killed("tests.pipelines:payments_app", store, point, 1 + i % 2)
    final = Child("tests.pipelines:payments_app", store=store, until_idle=True, cwd=str(ROOT))
    assert final.wait(60) == 0, final.stderr()
    assert kills >= 2
    expected = reference(pipelines.payments(), events, store=tmp_path / "ref.db")
    assert diff(snapshot(pipelines.payments(), store), expected, ordered=False) == []


def test_file_sink_never_shows_a_partial_or_doubled_line(tmp_path: Path) -> None:
    store = str(tmp_path / "f.db")
    out = tmp_path / "out.jsonl"
    events = [e for e in amount_events(100, seed=5) if isinstance(e, Event)]
    env = {"ONCEFLOW_TEST_FILE": str(out)}
    killed = 0
    for i, chunk in enumerate(range(0, len(events), 25)):
        send(store, events[chunk : chunk + 25])
        target = "tests.pipelines:with_sinks_app"
        killed += run_until_idle(target, store, crash_at=f"sink_flush:{1 + i % 2}", env=env)
    run_until_idle("tests.pipelines:with_sinks_app", store, env=env)
    assert killed >= 2
    lines = out.read_bytes().split(b"\n")
    assert lines[-1] == b""
    totals = [json.loads(x) for x in lines[:-1]]
    assert sorted(totals) == sorted(json.loads(r.value) for r in read_all(store, "totals"))


@pytest.mark.parametrize("point", ["sink_flush", "sink_delivered"])
def test_a_paused_file_deliverer_neither_records_nor_cuts_committed_lines(
    point: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FileSink deliverer paused half-way through its write (`sink_flush`) or after
    its fsync (`sink_delivered`) resumes after a successor delivered past it. It must
    notice it was fenced, record no position, and leave every committed line in place,
    also for the incarnation after the successor."""
    store = str(tmp_path / "f.db")
    out = tmp_path / "out.jsonl"
    monkeypatch.setenv("ONCEFLOW_TEST_FILE", str(out))
    events = [e for e in amount_events(90, seed=11) if isinstance(e, Event)]
    send(store, events[:60])
    zombie = pipelines.with_sinks()
    zombie.store = store

    def successor() -> None:
        app = pipelines.with_sinks()
        app.store = store
        app.run(until_idle=True)

    # Fenced at the delivery it was paused in: its first commit never returned.
    assert isinstance(zombie_beside(zombie, point, successor), FencedError)
    assert zombie.stats.commits == 0
    # The next incarnation appends at the recorded position: nothing cut, nothing doubled.
    send(store, events[60:])
    after = pipelines.with_sinks()
    after.store = store
    after.run(until_idle=True)
    data = out.read_bytes()
    assert data.endswith(b"\n")
    lines = [json.loads(x) for x in data.split(b"\n")[:-1]]
    committed = [json.loads(r.value) for r in read_all(store, "totals")]
    assert sorted(lines) == sorted(committed)
    assert len(committed) == len(events)


class _Pause(Hooks):
    """Holds the first commit until released: a paused zombie."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.release = threading.Event()

    def commit_started(self, epoch: int, records_in: int) -> None:
        self.reached.set()
        self.release.wait(30)


def test_zombie_cannot_commit_after_takeover(store: str) -> None:
    with Producer(store) as p:
        p.send_batch("amounts", [("k", {"n": 1}, f"e{i}") for i in range(10)])
    pause = _Pause()
    zombie = App("sums", store=store, hooks=[pause])
    zombie.source("amounts").reduce(name="total", fn=lambda a, v: a + v["n"], initial=0).to(
        "totals"
    )
    errors: list[BaseException] = []

    def run_zombie() -> None:
        try:
            zombie.run(until_idle=True)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run_zombie)
    t.start()
    assert pause.reached.wait(10)
    # A new incarnation takes over and commits everything while the old one is paused,
    # and still runs when the old one resumes: the old one must stop.
    fresh = App("sums", store=store)
    fresh.source("amounts").reduce(name="total", fn=lambda a, v: a + v["n"], initial=0).to("totals")
    fresh_errors: list[BaseException] = []

    def run_fresh() -> None:
        try:
            fresh.run()
        except BaseException as exc:
            fresh_errors.append(exc)

    f = threading.Thread(target=run_fresh)
    f.start()
    try:
        deadline = time.monotonic() + 60
        while len(read_all(store, "totals")) < 10 and f.is_alive():
            assert time.monotonic() < deadline, "the new incarnation did not commit"
            time.sleep(0.1)
        pause.release.set()
        t.join(60)
    finally:
        fresh.stop()
        f.join(60)
    assert not t.is_alive() and not f.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], FencedError)
    assert "took over" in str(errors[0])
    assert fresh_errors == []
    assert [json.loads(r.value) for r in read_all(store, "totals")] == list(range(1, 11))


def _session_class(backend: str) -> Any:
    if backend == "kafka":
        from onceflow._kafka import KafkaSession

        return KafkaSession
    from onceflow._embedded import EmbeddedSession

    return EmbeddedSession


def test_commit_that_raises_but_landed_is_not_replayed(
    store: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 4: an unknown outcome is looked up in the store, never blindly retried (on
    Kafka: after recreating the producer, which fences the old one)."""
    session = _session_class(backend)
    real_commit = session.commit
    calls = {"n": 0}

    def commit_then_fail(self: Any, conn: Any) -> None:
        real_commit(self, conn)
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("the commit's answer was lost")

    monkeypatch.setattr(session, "commit", commit_then_fail)
    with Producer(store) as p:
        p.send_batch("amounts", [("k", {"n": 1}, None) for _ in range(5)])
    app = pipelines.running_sum()
    app.store = store
    app.run(until_idle=True)
    assert calls["n"] >= 1
    assert [json.loads(r.value) for r in read_all(store, "totals")] == [1, 2, 3, 4, 5]


def test_commit_that_fails_rewinds_and_retries(
    store: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = _session_class(backend)
    real = session.write_positions
    calls = {"n": 0}

    def flaky(self: Any, conn: Any, positions: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        real(self, conn, positions)

    monkeypatch.setattr(session, "write_positions", flaky)
    with Producer(store) as p:
        p.send_batch("amounts", [("k", {"n": 1}, None) for _ in range(30)])
    app = pipelines.running_sum()
    app.store = store
    app.run(until_idle=True)
    assert calls["n"] >= 2
    assert [json.loads(r.value) for r in read_all(store, "totals")] == list(range(1, 31))

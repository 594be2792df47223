"""PostgresSink and the effect journal on the Kafka backend: a real broker, a real
PostgreSQL, worker processes SIGKILLed at the steps of the two-phase commit, two workers
sharing one table, and a zombie refused inside PostgreSQL."""

from __future__ import annotations

import json
import random
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from onceflow import App, ConfigError, FencedError, PostgresSink, Producer, SQLiteTableSink
from onceflow._kafka import _NO_LISTENER, KafkaSession
from onceflow._kafka_common import KafkaURL
from onceflow._sinks import SinkContext
from onceflow._supervisor import Child, wait_until

from .helpers import read_all, run_until_idle
from .payment_server import PaymentServer
from .test_effects import payments

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]
ROOT = Path(__file__).resolve().parent.parent
CHARGES = "tests.pipelines:charges_app"


@pytest.fixture
def kstore(kafka_broker: Any) -> str:
    return f"kafka://{kafka_broker.bootstrap}/t{uuid.uuid4().hex[:10]}"


def amounts(start: int, n: int) -> list[tuple[str, dict[str, Any], str]]:
    rng = random.Random(start)
    out = []
    for i in range(start, start + n):
        k = f"k{rng.randrange(7)}"
        out.append((k, {"id": f"e{i}", "k": k, "n": rng.randint(1, 9)}, f"e{i}"))
    return out


def send(store: str, topic: str, rows: list[tuple[str, Any, str]], partitions: int) -> None:
    with Producer(store, partitions=partitions) as p:
        p.send_batch(topic, rows)


def pg_inputs(url: str) -> tuple[list[str], list[str]]:
    """The ids in the `inputs` table (duplicates kept) and the prepared transactions."""
    with psycopg.connect(url, autocommit=True) as c:
        ids = [r[0] for r in c.execute("SELECT id FROM inputs ORDER BY id")]
        prepared = [r[0] for r in c.execute("SELECT gid FROM pg_prepared_xacts")]
    return ids, prepared


def create_inputs(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("CREATE TABLE inputs(id text, k text, n int)")  # no key: doubles would show


def worker(
    store: str, slot: int, tmp_path: Path, crash_at: str | None = None, until_idle: bool = True
) -> Child:
    return Child(
        "tests.pipelines:ids_to_postgres_app",
        store=store,
        until_idle=until_idle,
        crash_at=crash_at,
        env={"ONCEFLOW_WORKER": str(slot), "ONCEFLOW_STATE_DIR": str(tmp_path / "state")},
        cwd=str(ROOT),
    )


@pytest.mark.parametrize("point", ["sink_prepared", "in_transaction", "after_commit"])
def test_rows_land_once_in_postgres_through_kills_on_kafka(
    point: str, kstore: str, postgres_url: str, tmp_path: Path
) -> None:
    create_inputs(postgres_url)
    killed = 0
    for i in range(4):
        send(kstore, "amounts", amounts(i * 30, 30), partitions=4)
        child = worker(kstore, 0, tmp_path, crash_at=f"{point}:{1 + i % 2}")
        assert child.wait(120) in (0, -9), child.stderr()
        killed += child.killed
        # Right after a kill, before recovery: at most that epoch's prepared transaction.
        assert len(pg_inputs(postgres_url)[1]) <= 1
    final = worker(kstore, 0, tmp_path)
    assert final.wait(120) == 0, final.stderr()
    assert killed >= 3
    ids, prepared = pg_inputs(postgres_url)
    assert sorted(ids) == sorted(f"e{i}" for i in range(120))
    assert prepared == []


def test_two_workers_share_one_table_through_kills(
    kstore: str, postgres_url: str, tmp_path: Path
) -> None:
    create_inputs(postgres_url)
    n = 400
    crashes = ["sink_prepared:2", "after_commit:3", None, "in_transaction:2", None]
    workers = {slot: worker(kstore, slot, tmp_path, until_idle=False) for slot in (0, 1)}
    rng = random.Random(3)
    try:
        for i, start in enumerate(range(0, n, n // len(crashes))):
            send(kstore, "amounts", amounts(start, n // len(crashes)), partitions=4)
            time.sleep(rng.uniform(0.5, 2.0))
            slot = i % 2
            workers[slot].kill()
            workers[slot] = worker(kstore, slot, tmp_path, crashes[i], until_idle=False)
            # A worker that crashed at its point is started again, plainly.
            for s, child in list(workers.items()):
                if not child.alive():
                    assert child.killed, child.stderr()
                    workers[s] = worker(kstore, s, tmp_path, until_idle=False)
        assert wait_until(lambda: len(set(pg_inputs(postgres_url)[0])) >= n, 120), (
            len(set(pg_inputs(postgres_url)[0])),
            [c.stderr()[-2000:] for c in workers.values()],
        )
    finally:
        for child in workers.values():
            child.stop()
    ids, prepared = pg_inputs(postgres_url)
    assert sorted(ids) == sorted(f"e{i}" for i in range(n))  # each once, none lost
    assert prepared == []


def _session(store: str, tmp_path: Path, worker: int) -> KafkaSession:
    s = KafkaSession(
        KafkaURL.parse(store),
        "fz",
        worker=worker,
        state_dir=str(tmp_path / f"w{worker}"),
        commit_interval=0.1,
        step_topics={},
        topic_partitions=1,
    )
    s.ensure_topics({"in": 1})
    # No App: the test plays the rebalances itself, by calling the sinks.
    s.acquire(["in"], _NO_LISTENER)
    return s


def test_a_zombie_that_lost_its_partition_is_fenced_in_postgres(
    kstore: str, postgres_url: str, tmp_path: Path
) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as c:
        c.execute("CREATE TABLE seen(k text PRIMARY KEY, n int)")
    sessions = [_session(kstore, tmp_path, w) for w in (0, 1)]
    # Both join the group: a member still joining gets no committed offsets until then.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for s in sessions:
            s.poll({}, 10)
    try:
        old, new = (PostgresSink(table="seen", key=["k"], columns=["k", "n"]) for _ in (0, 1))
        for sink, session in ((old, sessions[0]), (new, sessions[1])):
            sink.open(SinkContext("fz", "kafka", session, lambda point: None, None, "fz.dlq"))
        tp = ("in", 0)
        old.partitions_assigned([tp])
        rows = [("k", {"k": "k", "n": 1}, ("in", 0, 0, 0))]
        old.prepare(rows, {tp: 1}, 0)
        old.after_commit(rows)
        # The old owner prepares its next epoch, then pauses; the partition moves on.
        old.prepare([("k", {"k": "k", "n": 2}, ("in", 0, 1, 0))], {tp: 2}, 0)
        new.partitions_assigned([tp])
        # The in-doubt transaction was resolved first: the group never committed offset 2.
        assert pg_rows(postgres_url) == ([("k", 1)], [])
        with pytest.raises(FencedError, match="belongs to another worker"):
            old.prepare([("k", {"k": "k", "n": 99}, ("in", 0, 1, 0))], {tp: 2}, 0)
        new.prepare([("k", {"k": "k", "n": 3}, ("in", 0, 1, 0))], {tp: 2}, 0)
        new.after_commit(rows)
        assert pg_rows(postgres_url) == ([("k", 3)], [])
    finally:
        for s in sessions:
            s.close()


def pg_rows(url: str) -> tuple[list[Any], list[Any]]:
    with psycopg.connect(url, autocommit=True) as c:
        rows = c.execute("SELECT k, n FROM seen ORDER BY k").fetchall()
        prepared = c.execute("SELECT gid FROM pg_prepared_xacts").fetchall()
    return rows, prepared


@pytest.mark.parametrize("point", ["in_transaction", "after_commit", "effect_called"])
def test_each_effect_applied_once_through_kills_on_kafka(
    point: str, kstore: str, server: PaymentServer, tmp_path: Path
) -> None:
    evs = payments(60)
    env = {"ONCEFLOW_TEST_HTTP": server.url, "ONCEFLOW_STATE_DIR": str(tmp_path / "state")}
    killed = 0
    for i, start in enumerate(range(0, len(evs), 15)):
        send(kstore, "payments", [(e.key, e.value, e.id) for e in evs[start : start + 15]], 2)
        crash = f"{point}:{1 + i % 3}"
        slot0 = {**env, "ONCEFLOW_WORKER": "0"}
        killed += run_until_idle(CHARGES, kstore, crash_at=crash, env=slot0, timeout=120)
    # Past the session timeout, the last killed slot's static membership has expired:
    # another slot, with no local copy, takes every partition and its pending intents.
    time.sleep(11)
    run_until_idle(CHARGES, kstore, env={**env, "ONCEFLOW_WORKER": "1"}, timeout=120)
    assert killed >= 2
    good = [e for e in evs if e.value["amount"] >= 0]
    assert sorted(v["id"] for v in server.applied.values()) == sorted(e.value["id"] for e in good)
    assert server.calls > len(good)  # flaky ones were retried, with the same key
    dead = read_all(kstore, "charges.dead-letters")
    assert sorted(json.loads(d.value)["id"] for d in dead) == ["p24", "p49"]
    assert all("HTTP 422" in (d.headers or {})["onceflow-error"] for d in dead)


def test_a_paused_recorder_is_fenced_on_kafka(
    kstore: str, server: PaymentServer, tmp_path: Path
) -> None:
    """A worker stopped (SIGSTOP) between an effect's call and its journal entry, whose
    partitions moved to another worker that settled every intent, resumes: its settle
    transaction must be refused by the group generation (it says so), and the worker
    rejoins and goes on, as after any session that ran out: each effect once, one dead
    letter, whoever settles."""
    evs = payments(30)
    send(kstore, "payments", [(e.key, e.value, e.id) for e in evs], 2)
    env = {"ONCEFLOW_TEST_HTTP": server.url, "ONCEFLOW_STATE_DIR": str(tmp_path / "state")}
    zombie = Child(
        CHARGES,
        store=kstore,
        until_idle=True,
        pause_at="effect_called:1",
        env={**env, "ONCEFLOW_WORKER": "0"},
        cwd=str(ROOT),
    )
    try:
        assert wait_until(zombie.stopped, 120), zombie.stderr()
        # The stopped worker's session expires; the successor takes both partitions and
        # settles every pending intent, the one the zombie holds in hand included.
        run_until_idle(CHARGES, kstore, env={**env, "ONCEFLOW_WORKER": "1"}, timeout=120)
        zombie.resume()
        code = zombie.wait(120)
    finally:
        zombie.kill()
    log = zombie.stderr()
    assert code == 0, (code, log)
    assert "their outcomes could not be journalled" in log, log
    assert "UNKNOWN_MEMBER_ID" in log or "ILLEGAL_GENERATION" in log, log
    good = sorted(e.value["id"] for e in evs if e.value["amount"] >= 0)
    assert sorted(v["id"] for v in server.applied.values()) == good
    dead = read_all(kstore, "charges.dead-letters")
    assert [json.loads(d.value)["id"] for d in dead] == ["p24"]


def test_an_embedded_and_a_kafka_app_of_the_same_names_cannot_share_a_database(
    kstore: str, postgres_server: Any, tmp_path: Path
) -> None:
    """They would resume from each other's offsets in `onceflow_sink_offsets`, and the
    embedded one's recovery would roll back the Kafka one's prepared transactions: the
    second to start is refused, whichever backend it is on."""
    import uuid as _uuid

    from . import pipelines

    names = [f"m{_uuid.uuid4().hex[:8]}" for _ in range(2)]
    urls = [postgres_server.create_database(n) for n in names]
    try:
        for i, url in enumerate(urls):
            create_inputs(url)
            embedded = pipelines.ids_to_postgres()
            embedded.store = str(tmp_path / f"e{i}.db")
            send(embedded.store, "amounts", amounts(0, 20), 4)
            on_kafka = pipelines.ids_to_postgres()
            on_kafka.store = f"{kstore}-{i}"
            on_kafka.state_dir = str(tmp_path / f"state{i}")
            send(on_kafka.store, "amounts", amounts(0, 20), 4)
            first, second = (embedded, on_kafka) if i == 0 else (on_kafka, embedded)
            for sink in first._sinks().values():
                sink.url = url  # type: ignore[attr-defined]
            for sink in second._sinks().values():
                sink.url = url  # type: ignore[attr-defined]
            first.run(until_idle=True)
            with pytest.raises(ConfigError, match="resume from each other's offsets"):
                second.run(until_idle=True)
            assert sorted(pg_inputs(url)[0]) == sorted(f"e{i}" for i in range(20))
    finally:
        for n in names:
            postgres_server.drop_database(n)


def test_status_shows_pending_intents_on_kafka(
    kstore: str, server: PaymentServer, tmp_path: Path
) -> None:
    """The journal's state per effect sink, read from the changelog: all pending while
    the API is down, then applied once it is back."""
    from onceflow._kafka_status import status as kafka_status

    from .test_effects import one_epoch_charges

    evs = payments(30)
    send(kstore, "payments", [(e.key, e.value, e.id) for e in evs], 2)

    def run() -> Any:
        app = one_epoch_charges(kstore, server.url)
        app.state_dir = str(tmp_path / "state")
        app.run(until_idle=True)
        (shown,) = kafka_status(kstore, "charges").apps
        return [(e.name, e.pending, e.done, e.dead, e.complete) for e in shown.effects]

    server.down = True
    assert run() == [("charges", 30, 0, 0, True)]
    server.down = False
    assert run() == [("charges", 0, 29, 1, True)]
    assert len(server.applied) == 29


def test_a_worker_rides_out_a_postgresql_crash_and_restart_on_kafka(
    kstore: str,
    postgres_server: Any,
    postgres_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """PostgreSQL SIGKILLed under a Kafka worker while inputs keep coming, then started
    again: the worker waits and goes on by itself, each input once in PostgreSQL."""
    import logging
    import threading

    caplog.set_level(logging.WARNING, logger="onceflow")
    from . import pipelines

    create_inputs(postgres_url)
    app = pipelines.ids_to_postgres()
    app.store = kstore
    app.state_dir = str(tmp_path / "state")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            app.run()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    try:
        send(kstore, "amounts", amounts(0, 40), 4)
        assert wait_until(lambda: len(pg_inputs(postgres_url)[0]) == 40, 120), errors
        postgres_server.kill()
        send(kstore, "amounts", amounts(40, 40), 4)
        # The worker has read the new inputs and cannot prepare them.
        assert wait_until(lambda: "is unreachable" in caplog.text, 120), errors
    finally:
        postgres_server.start()
    try:
        done = wait_until(
            lambda: len(pg_inputs(postgres_url)[0]) == 80 and not pg_inputs(postgres_url)[1],
            120,
        )
        assert done and not errors, errors
    finally:
        app.stop()
        t.join(60)
    assert not errors and not t.is_alive(), errors
    ids, prepared = pg_inputs(postgres_url)
    assert sorted(ids) == sorted(f"e{i}" for i in range(80)) and prepared == []


def test_sinks_of_the_embedded_store_are_still_refused_on_kafka(kstore: str) -> None:
    app = App("refuse", store=kstore)
    app.source("in").sink(SQLiteTableSink("t", key=["k"], columns=["k"]))
    with pytest.raises(ConfigError, match="use PostgresSink for a table"):
        app.build()


def test_an_effect_sink_fed_by_two_sources_is_refused_on_kafka(kstore: str) -> None:
    from onceflow import EffectSink

    app = App("two-feeds", store=kstore)
    effect = EffectSink(lambda value, key: None, name="notify")
    app.source("a").sink(effect)
    app.source("b").sink(effect)
    with pytest.raises(ConfigError, match=r"fed by sources \['a', 'b'\]"):
        app.build()

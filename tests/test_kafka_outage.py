"""Kafka workers keep the guarantee and keep running by themselves: through broker
outages longer than the group session, a broker paused in the middle of a commit, and a
starved CPU. Every worker is alive at the end and the committed effects equal the
reference fold."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from onceflow._crash import CrashInjector
from onceflow._kafka import SESSION_TIMEOUT_S
from onceflow._kafka_status import Cluster, app_lag
from onceflow._supervisor import Child
from onceflow.testing import Event, Snapshot, diff, reference, send, snapshot

from . import pipelines

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.kafka

TARGET = "tests.pipelines:payments3_app"
# Long enough that every group member's session expires and every open transaction
# times out on the broker (transaction_timeout_ms: 10 s for this pipeline).
OUTAGE_S = SESSION_TIMEOUT_S + 5.0
# A failure bound, not a speed figure: a run that did not drain by then is stuck.
DRAIN_S = 300.0


def payment_events(n: int, seed: int) -> list[Event]:
    rng = random.Random(seed)
    out: list[Event] = []
    for i in range(n):
        v = {"id": f"p{i}", "n": rng.randint(1, 40), "to": f"acct{rng.randrange(6)}"}
        payer = f"acct{rng.randrange(6)}"
        out.append(Event("payments", v, key=payer, id=v["id"]))
        if rng.random() < 0.1:  # retried from a new session: same business id
            out.append(Event("payments", v, key=payer, id=v["id"], producer="retry"))
    return out


def by_id(snap: Snapshot, topic: str) -> Snapshot:
    """`topic`'s outputs by id only. The second stage's running totals interleave its
    input partitions in an order that differs from run to run (the totals on the way do;
    each payment's one credit and the final state do not)."""
    outputs = {
        tk: sorted(((b"", i, h) for _, i, h in rows), key=repr) if tk[0] == topic else rows
        for tk, rows in snap.outputs.items()
    }
    return Snapshot(outputs, snap.state, snap.dedup_ids)


class Workers:
    """Worker slots as child processes, each with its own state directory."""

    def __init__(
        self, store: str, count: int, state_dir: Path, pause_at: dict[int, str] | None = None
    ) -> None:
        self.children = [
            Child(
                TARGET,
                store=store,
                pause_at=(pause_at or {}).get(slot),
                env={"ONCEFLOW_WORKER": str(slot), "ONCEFLOW_STATE_DIR": str(state_dir)},
                cwd=str(ROOT),
            )
            for slot in range(count)
        ]

    def dead(self) -> list[str]:
        return [
            f"worker {slot} exited {c.proc.returncode}:\n{c.stderr()[-3000:]}"
            for slot, c in enumerate(self.children)
            if not c.alive()
        ]

    def logs(self) -> str:
        return "\n".join(
            f"--- worker {slot}:\n{c.stderr()[-3000:]}" for slot, c in enumerate(self.children)
        )

    def kill(self) -> None:
        for c in self.children:
            c.kill()


@pytest.fixture
def workers_of(tmp_path: Path) -> Iterator[Any]:
    made: list[Workers] = []

    def make(store: str, count: int, pause_at: dict[int, str] | None = None) -> Workers:
        w = Workers(store, count, tmp_path / f"state-{len(made)}", pause_at)
        made.append(w)
        return w

    yield make
    for w in made:
        w.kill()


def create_topics(store: str) -> None:
    app = pipelines.payments(3)
    app.store = store
    session = app._open_session()
    try:
        session.ensure_topics(app._topics())
    finally:
        session.close()


def committed_total(store: str) -> int:
    lags = app_lag(store, "payments", ["payments"])
    return sum(p.committed_offset or 0 for p in lags)


def settled(store: str) -> bool:
    """The group is not rebalancing: an outage then meets workers at work, not in the
    middle of taking partitions over (a restore during an outage is another test's)."""
    return Cluster(store).groups().get("payments") == "STABLE"


def drained(store: str) -> bool:
    lags = app_lag(store, "payments", ["payments", "credits"])
    return bool(lags) and all(p.lag == 0 for p in lags)


def wait_for(pred: Any, timeout: float, workers: Workers, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert not workers.dead(), "\n".join(workers.dead())
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f}s\n{workers.logs()}"
        time.sleep(0.2)


def test_client_log_lines_of_one_kind_pass_once_a_minute() -> None:
    """librdkafka logs each failed reconnect of each client while a broker is down: the
    first line of a kind passes, the repeats are held back (and counted later)."""
    from onceflow._kafka_common import CLIENT_LOG

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    kinds = [f"FAIL-{uuid.uuid4().hex[:6]}", f"TXNERR-{uuid.uuid4().hex[:6]}"]
    keep = Keep()
    CLIENT_LOG.addHandler(keep)
    try:
        for i in range(50):
            CLIENT_LOG.error("%s [%s] %s", kinds[0], "rdkafka#consumer-1", f"connect {i} failed")
        CLIENT_LOG.error("%s [%s] %s", kinds[1], "rdkafka#producer-2", "transaction failed")
        CLIENT_LOG.warning("%s [%s] %s", kinds[0], "rdkafka#consumer-1", "a warning of that kind")
    finally:
        CLIENT_LOG.removeHandler(keep)
    got = [(r.levelname, r.args[0] if isinstance(r.args, tuple) else None) for r in keep.records]
    assert got == [("ERROR", kinds[0]), ("ERROR", kinds[1]), ("WARNING", kinds[0])]


@pytest.mark.timeout(600)
def test_workers_ride_out_two_outages_longer_than_the_session_timeout(
    own_broker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers_of: Any
) -> None:
    ns = uuid.uuid4().hex[:8]
    store = f"kafka://{own_broker.bootstrap}/outage-{ns}"
    ref_store = f"kafka://{own_broker.bootstrap}/reference-{ns}"
    # The topics first, with three partitions each, before a producer could create one.
    for s in (store, ref_store):
        create_topics(s)
    events = payment_events(1500, seed=8)
    monkeypatch.setenv("ONCEFLOW_STATE_DIR", str(tmp_path / "reference-state"))
    expected = reference(pipelines.payments(3), events, store=ref_store)

    workers = workers_of(store, 3)
    chunks = [events[:300], events[300:900], events[900:]]
    send(store, chunks[0])
    wait_for(lambda: committed_total(store) > 0, 120, workers, "no commit")

    for outage, chunk in enumerate(chunks[1:]):
        # Input keeps coming while the broker goes down: transactions are open then.
        before = committed_total(store)
        sender = threading.Thread(
            target=send, args=(store, chunk), kwargs={"batch": 10}, daemon=True
        )
        sender.start()
        wait_for(
            lambda b=before: committed_total(store) > b and settled(store),
            120,
            workers,
            "no progress in a settled group",
        )
        own_broker.kill()
        down = time.monotonic()
        while time.monotonic() - down < OUTAGE_S:
            assert not workers.dead(), f"outage {outage + 1}: " + "\n".join(workers.dead())
            time.sleep(0.2)
        own_broker.restart()
        sender.join(180)
        assert not sender.is_alive()

    wait_for(lambda: drained(store), DRAIN_S, workers, "the workers did not drain")
    assert not workers.dead(), "\n".join(workers.dead())
    for slot, child in enumerate(workers.children):
        log = child.stderr()
        # Said once per outage (a worker may sleep through an outage it never noticed),
        # not a flood of client errors.
        said = f"Kafka at {own_broker.bootstrap} is unreachable"
        assert log.count(said) <= 2, f"worker {slot}:\n{log[-3000:]}"
        assert log.count(" is reachable again after ") <= 2, f"worker {slot}:\n{log[-3000:]}"
        assert child.stop() == 0, f"worker {slot}:\n{child.stderr()[-3000:]}"

    got = by_id(snapshot(pipelines.payments(3), store), "credit-totals")
    problems = diff(got, by_id(expected, "credit-totals"), ordered=False)
    assert problems == [], "\n".join(problems) + "\n" + workers.logs()


def commits(producer: Any, topic: str) -> bool:
    """Whether a transactional producer can still commit a record to `topic`.

    Never through abort_transaction: an abort that needs an epoch bump asks for one with
    the producer's own id and epoch (KIP-360), which the coordinator grants to the epoch
    just before the current one; the worker never calls a replaced producer again."""
    import confluent_kafka

    # A commit that timed out goes on in the background; this waits for its end.
    with contextlib.suppress(confluent_kafka.KafkaException):
        producer.commit_transaction(10)
    try:
        producer.begin_transaction()
        producer.produce(topic, b"9999", key=b"zombie")
        producer.commit_transaction(10)
    except confluent_kafka.KafkaException:
        return False
    return True


def test_a_broker_paused_in_a_commit_past_the_client_timeout_fences_the_old_producer(
    own_broker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """librdkafka has no KIP-890 client (librdkafka#5423): a commit that timed out may
    still land, on this transaction or on a later one of the same producer. The worker
    must make a new producer (which fences the old one and settles its transaction)
    before it sends anything else, find out whether the epoch committed, and go on."""
    from onceflow import _kafka

    ns = uuid.uuid4().hex[:8]
    store = f"kafka://{own_broker.bootstrap}/paused-{ns}"
    rng = random.Random(3)
    events = [
        Event("amounts", {"n": rng.randint(1, 9)}, key=f"k{rng.randrange(6)}", id=f"e{i}")
        for i in range(200)
    ]
    monkeypatch.setenv("ONCEFLOW_STATE_DIR", str(tmp_path / "state"))
    expected = reference(
        pipelines.running_sum(), events, store=f"kafka://{own_broker.bootstrap}/ref-{ns}"
    )
    # Short client timeouts, so that the pause outlasts a commit and then the first
    # attempt to replace the producer, in seconds.
    monkeypatch.setattr(_kafka, "TXN_TIMEOUT_S", 4.0)
    pause_s = 2 * _kafka.TXN_TIMEOUT_S + 2.0
    send(store, events)

    app = pipelines.running_sum()
    app.store = store
    sessions: list[Any] = []
    open_session = app._open_session

    def capture() -> Any:
        sessions.append(open_session())
        return sessions[-1]

    app._open_session = capture  # type: ignore[method-assign]
    paused: list[Any] = []

    def stop_broker(point: str) -> None:
        # Everything of the epoch is in the open transaction; the commit comes next.
        paused.append(sessions[-1].producer)
        os.kill(own_broker.pid, signal.SIGSTOP)

    app._crash = CrashInjector(None, "raise", pause="in_transaction:3", on_pause=stop_broker)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            app.run(until_idle=True)
        except BaseException as exc:
            errors.append(exc)

    runner = threading.Thread(target=run)
    runner.start()
    try:
        while not paused and runner.is_alive():
            time.sleep(0.05)
        assert paused, errors
        stopped = time.monotonic()
        while runner.is_alive() and time.monotonic() - stopped < pause_s:
            time.sleep(0.05)
    finally:
        os.kill(own_broker.pid, signal.SIGCONT)
    runner.join(300)
    assert not runner.is_alive()
    assert errors == []
    # The paused commit's producer was replaced, and cannot commit any more: its late
    # requests land on nothing (the zombie record is not in the outputs either).
    assert sessions[-1].producer is not paused[0]
    assert not commits(paused[0], sessions[-1].url.topic("totals"))
    assert diff(snapshot(pipelines.running_sum(), store), expected) == []


def test_workers_starved_of_cpu_keep_the_guarantee(
    kafka_broker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers_of: Any
) -> None:
    """Two workers pinned to one core beside a CPU-bound competitor pinned there too,
    one of them starved inside a commit (its thread stalls at in_transaction) until the
    broker aborted the open transaction as timed out, which fences its producer epoch.
    The stalled worker drops the epoch, makes a new producer and goes on: only another
    process on its slot may stop it."""
    from onceflow._kafka import transaction_timeout_ms

    ns = uuid.uuid4().hex[:8]
    store = f"kafka://{kafka_broker.bootstrap}/starved-{ns}"
    ref_store = f"kafka://{kafka_broker.bootstrap}/reference-{ns}"
    for s in (store, ref_store):
        create_topics(s)
    events = payment_events(600, seed=5)
    monkeypatch.setenv("ONCEFLOW_STATE_DIR", str(tmp_path / "reference-state"))
    expected = reference(pipelines.payments(3), events, store=ref_store)

    # The broker aborts a transaction open longer than its timeout at its next check of
    # timed-out transactions (every 10 s by default): the stall outlasts both.
    timeout_s = transaction_timeout_ms(pipelines.SMALL["commit_interval"]) / 1000
    stall = f"in_transaction:3@{timeout_s + 10 + 10:.0f}"
    core = {min(os.sched_getaffinity(0))}
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(hog.pid, core)
        workers = workers_of(store, 2, pause_at={0: stall})
        for child in workers.children:
            # Before the child starts any thread: librdkafka's inherit it.
            os.sched_setaffinity(child.proc.pid, core)
        send(store, events)
        wait_for(lambda: drained(store), DRAIN_S, workers, "the starved workers did not drain")
    finally:
        hog.kill()
        hog.wait()
    assert not workers.dead(), "\n".join(workers.dead())
    assert "fenced" in workers.children[0].stderr(), workers.logs()
    for slot, child in enumerate(workers.children):
        assert child.stop() == 0, f"worker {slot}:\n{child.stderr()[-3000:]}"
    got = by_id(snapshot(pipelines.payments(3), store), "credit-totals")
    problems = diff(got, by_id(expected, "credit-totals"), ordered=False)
    assert problems == [], "\n".join(problems) + "\n" + workers.logs()

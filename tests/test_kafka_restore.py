"""The Kafka backend's restore and read paths: a partition's new owner starts from state
that matches the offsets it reads from, whatever a paused previous owner does meanwhile;
keys and ids are the bytes Kafka has, not a lossy decoding of them."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from onceflow import App, Producer
from onceflow._supervisor import Child, wait_until
from onceflow.testing import Event, diff, reference, send, snapshot

from . import pipelines

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.kafka


def _drained(bootstrap: str, group: str, topic: str) -> bool:
    """Whether the group committed offsets at the end of every partition of `topic`."""
    import confluent_kafka as ck

    c = ck.Consumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "isolation.level": "read_committed"}
    )
    try:
        md = c.list_topics(topic, timeout=10).topics[topic]
        tps = [ck.TopicPartition(topic, p) for p in md.partitions]
        try:
            committed = c.committed(tps, timeout=2)
        except ck.KafkaException:
            return False  # a transaction with offsets is open: not settled yet
        for tp in committed:
            _, high = c.get_watermark_offsets(tp, timeout=10, cached=False)
            if tp.error is not None or tp.offset != high:
                return False
        return True
    finally:
        c.close()


def _create(store: str, topic: str, partitions: int) -> None:
    with Producer(store, partitions=partitions) as p:
        p.send_batch(topic, [])


def _worker(store: str, slot: int, state_dir: Path, **kwargs: Any) -> Child:
    return Child(
        "tests.verbose_pipelines:counts_app",
        store=store,
        env={"ONCEFLOW_WORKER": str(slot), "ONCEFLOW_STATE_DIR": str(state_dir)},
        cwd=str(ROOT),
        **kwargs,
    )


def test_a_paused_owners_late_commit_reaches_its_successors_state(
    kafka_broker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker 0 stops itself inside its transaction, after its offsets went in and before
    the commit returned; worker 1 gets its partitions when the group session expires; then
    worker 0 resumes and its transaction commits. Worker 1 must go on from exactly the
    state those offsets belong to: each count once, and the final counts whole."""
    ns = f"t{uuid.uuid4().hex[:10]}"
    store = f"kafka://{kafka_broker.bootstrap}/{ns}"
    state_dir = tmp_path / "state"
    events = [Event("events", {"i": i}, key=f"k{i % 24}", id=f"e{i}") for i in range(600)]
    for s in (store, f"{store}-reference"):
        _create(s, "events", 4)
    send(store, events)
    zombie = _worker(store, 0, state_dir, pause_at="in_transaction:3")
    successor = None
    try:
        assert wait_until(zombie.stopped, 60), zombie.stderr()
        successor = _worker(store, 1, state_dir)
        # Once it holds the partitions, the successor either waits for the open
        # transaction to end or (as it used to) has restored and started.
        assert wait_until(
            lambda: (
                "not stable yet" in successor.stderr() or "worker 1 assigned" in successor.stderr()
            ),
            120,
        ), successor.stderr()
        zombie.resume()
        assert wait_until(
            lambda: _drained(kafka_broker.bootstrap, f"{ns}.counts", f"{ns}.events"), 120
        ), successor.stderr()
    finally:
        zombie.stop()
        if successor is not None:
            successor.stop()
    # A fenced zombie that exited may leave its transaction open until it times out; the
    # next incarnation of its slot aborts it, so that committed data can be read back.
    last = _worker(store, 0, state_dir, until_idle=True)
    assert last.wait(120) == 0, last.stderr()
    monkeypatch.setenv("ONCEFLOW_STATE_DIR", str(tmp_path / "reference-state"))
    expected = reference(pipelines.counts(), events, store=f"{store}-reference")
    problems = diff(snapshot(pipelines.counts(), store), expected)
    assert problems == [], problems[:10]


def test_a_restore_waits_for_a_transaction_left_open_in_the_changelog(
    kafka_broker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A previous owner wrote to a changelog in a transaction it never finished (it
    stopped before sending offsets); the next owner committed after it. Readers see the
    changelog only up to the open transaction, so a restore that stops where reading
    stops misses the later commits while the group's offsets include them. The restore
    must wait for the transaction to end (here it is aborted) and read to the end."""
    import confluent_kafka as ck

    ns = f"t{uuid.uuid4().hex[:10]}"
    store = f"kafka://{kafka_broker.bootstrap}/{ns}"
    state_dir = tmp_path / "state"
    events = [Event("events", {"i": i}, key=f"k{i % 24}", id=f"e{i}") for i in range(600)]
    for s in (store, f"{store}-reference"):
        _create(s, "events", 4)

    def drained() -> bool:
        return _drained(kafka_broker.bootstrap, f"{ns}.counts", f"{ns}.events")

    send(store, events[:200])
    owner = _worker(store, 0, state_dir)
    zombie = ck.Producer(
        {"bootstrap.servers": kafka_broker.bootstrap, "transactional.id": f"{ns}.zombie"}
    )
    try:
        assert wait_until(drained, 120), owner.stderr()
        zombie.init_transactions(30)
        zombie.begin_transaction()
        # A record of no kind the store knows, in changelog partition 0, left open.
        zombie.produce(f"{ns}.counts.events.changelog", b"-", key=b"z\x00zombie\x00-", partition=0)
        zombie.flush(30)
        send(store, events[200:400])
        assert wait_until(drained, 120), owner.stderr()
    finally:
        owner.stop()
    # The partitions go to a worker without local copies.
    shutil.rmtree(state_dir)
    send(store, events[400:])
    worker = _worker(store, 0, state_dir, until_idle=True)
    try:
        assert wait_until(
            lambda: "still open" in worker.stderr() or "worker 0 assigned" in worker.stderr(),
            120,
        ), worker.stderr()
        zombie.abort_transaction(30)
        assert worker.wait(120) == 0, worker.stderr()
    finally:
        worker.kill()
    monkeypatch.setenv("ONCEFLOW_STATE_DIR", str(tmp_path / "reference-state"))
    expected = reference(pipelines.counts(), events, store=f"{store}-reference")
    problems = diff(snapshot(pipelines.counts(), store), expected)
    assert problems == [], problems[:10]


def _raw_outputs(bootstrap: str, topic: str) -> dict[bytes | None, list[bytes]]:
    """A topic's committed records as Kafka has them: raw key -> values, in order."""
    import confluent_kafka as ck

    c = ck.Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"raw-{uuid.uuid4().hex[:8]}",
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        c.assign([ck.TopicPartition(topic, p, ck.OFFSET_BEGINNING) for p in parts])
        out: dict[bytes | None, list[bytes]] = {}
        done: set[int] = set()
        while len(done) < len(parts):
            for m in c.consume(1000, 0.2):
                if m.error():
                    done.add(m.partition())
                    continue
                out.setdefault(m.key(), []).append(m.value())
        return out
    finally:
        c.close()


def test_keys_and_ids_that_are_not_utf8_keep_their_own_state_and_bytes(
    kafka_broker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two keys, and two ids, that differ only in bytes that are not UTF-8 are two keys
    and two ids, in the running App and after a restore from the changelog; outputs
    carry the original key bytes."""
    import confluent_kafka as ck

    ns = f"t{uuid.uuid4().hex[:10]}"
    store = f"kafka://{kafka_broker.bootstrap}/{ns}"
    state_dir = tmp_path / "state"
    monkeypatch.setenv("ONCEFLOW_STATE_DIR", str(state_dir))
    _create(store, "in", 2)

    def app() -> App:
        a = App("bytes", store=store, partitions=2, commit_interval=0.05)
        (
            a.source("in")
            .dedupe(name="ids", ttl=3600)
            .reduce(name="count", fn=lambda n, v: n + 1, initial=0)
            .to("counts")
        )
        return a

    k1, k2 = b"acct-\xff", b"acct-\xfe"
    p = ck.Producer({"bootstrap.servers": kafka_broker.bootstrap, "partitioner": "murmur2"})

    def send_raw(records: list[tuple[bytes, bytes]]) -> None:
        for key, eid in records:
            p.produce(f"{ns}.in", b"{}", key=key, headers=[("onceflow-id", eid)])
        p.flush(30)

    # The last one re-sends the first: a duplicate.
    send_raw([(k1, b"p-\xff"), (k2, b"p-\xfe"), (k1, b"p-\xfe\xff"), (k1, b"p-\xff")])
    app().run(until_idle=True)
    assert _raw_outputs(kafka_broker.bootstrap, f"{ns}.counts") == {k1: [b"1", b"2"], k2: [b"1"]}
    # The partitions move to a worker with no local copy: keys and ids come back from
    # the changelog, still apart.
    shutil.rmtree(state_dir)
    send_raw([(k2, b"p-5"), (k1, b"p-\xff"), (k1, b"p-\xfe\xff")])
    app().run(until_idle=True)
    assert _raw_outputs(kafka_broker.bootstrap, f"{ns}.counts") == {
        k1: [b"1", b"2"],
        k2: [b"1", b"2"],
    }


def test_a_restore_rides_out_a_broker_outage(own_broker: Any, tmp_path: Path) -> None:
    """The broker dies while a worker restores state from the changelogs: the worker says
    so once, waits, and finishes the restore when the broker is back, with nothing
    missing (the effects are exactly once)."""
    ns = f"t{uuid.uuid4().hex[:10]}"
    store = f"kafka://{own_broker.bootstrap}/{ns}"
    state_dir = tmp_path / "state"
    events = [Event("events", {"i": i}, key=f"k{i % 50}", id=f"e{i}") for i in range(400)]
    for s in (store, f"{store}-reference"):
        _create(s, "events", 4)
    send(store, events[:300])
    first = _worker(store, 0, state_dir, until_idle=True)
    assert first.wait(120) == 0, first.stderr()
    send(store, events[300:])
    # A worker with no local copy: everything comes from the changelogs. It stops itself
    # once it knows where they end, before reading them.
    shutil.rmtree(state_dir)
    worker = _worker(store, 0, state_dir, pause_at="restoring")
    try:
        assert wait_until(worker.stopped, 120), worker.stderr()
        own_broker.kill()
        worker.resume()
        assert wait_until(lambda: "restoring state: " in worker.stderr(), 60), worker.stderr()
        own_broker.restart()
        assert wait_until(lambda: "worker 0 assigned" in worker.stderr(), 180), worker.stderr()
        assert worker.alive(), worker.stderr()
    finally:
        worker.stop()
    log = worker.stderr()
    waits = [line for line in log.splitlines() if "restoring state: " in line]
    # Said once (and once that it goes on), not at every retry.
    assert len([w for w in waits if "resumes by itself" in w]) == 1, log
    assert len(waits) == 2, log
    # An outage longer than the group session also ends the worker's membership, which
    # is not the restore's business: a fresh worker drains what is left.
    last = _worker(store, 0, state_dir, until_idle=True)
    assert last.wait(120) == 0, last.stderr()
    expected = reference(pipelines.counts(), events, store=f"{store}-reference")
    problems = diff(snapshot(pipelines.counts(), store), expected)
    assert problems == [], problems[:10]


def _changelog_keys(bootstrap: str, topic: str) -> list[bytes]:
    """Every record key the changelog holds now, aborted and compacted ones aside."""
    import confluent_kafka as ck

    c = ck.Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"raw-{uuid.uuid4().hex[:8]}",
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    try:
        c.assign([ck.TopicPartition(topic, 0, ck.OFFSET_BEGINNING)])
        keys: list[bytes] = []
        while True:
            for m in c.consume(1000, 0.2):
                if m.error():
                    return keys
                keys.append(m.key())
    finally:
        c.close()


def _keep(value: dict[str, Any], st: Any) -> list[dict[str, Any]]:
    if value["op"] == "set":
        st.value = value["v"]
    elif value["op"] == "del":
        st.delete()
    return [{"k": st.key, "v": st.value}] if value["op"] == "get" else []


def test_a_key_deleted_while_a_local_copy_was_away_stays_deleted(
    kafka_broker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local store comes back to a worker (the partition moved away and back) after
    compaction removed both a key's value and its tombstone from the changelog: replaying
    the changelog from where the copy stopped cannot see the delete, so a copy older than
    the changelog keeps tombstones (delete.retention.ms) is rebuilt from the start."""
    import threading

    from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

    from .helpers import values

    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})

    def configure(kind: str, name: str, configs: dict[str, str | None]) -> None:
        entries = [
            ConfigEntry(
                k,
                v,
                incremental_operation=AlterConfigOpType.DELETE
                if v is None
                else AlterConfigOpType.SET,
            )
            for k, v in configs.items()
        ]
        resource = ConfigResource(kind, name, incremental_configs=entries)
        for fut in admin.incremental_alter_configs([resource]).values():
            fut.result()

    store = f"kafka://{kafka_broker.bootstrap}/t{uuid.uuid4().hex[:8]}"
    state_dir = tmp_path / "state"
    monkeypatch.setenv("ONCEFLOW_STATE_DIR", str(state_dir))

    def app() -> App:
        a = App("keep", store=store, commit_interval=0.05)
        a.source("ops").process(name="kept", fn=_keep).to("got")
        return a

    def ops(*items: tuple[str, dict[str, Any]]) -> None:
        with Producer(store) as p:
            p.send_batch("ops", [(k, v, None) for k, v in items])

    ops(("a", {"op": "set", "v": 1}), ("b", {"op": "set", "v": 2}))
    app().run(until_idle=True)
    away = tmp_path / "away"
    shutil.copytree(state_dir, away)
    # Compact the changelog at once, and keep its tombstones only 100 ms. The log
    # cleaner of the (shared) broker looks for work every 50 ms instead of 15 s meanwhile.
    changelog = store.rsplit("/", 1)[1] + ".keep.ops.changelog"
    configure(
        "topic",
        changelog,
        {"segment.ms": "100", "min.cleanable.dirty.ratio": "0.01", "delete.retention.ms": "100"},
    )
    broker_id = str(next(iter(admin.list_topics(timeout=10).brokers)))
    configure("broker", broker_id, {"log.cleaner.backoff.ms": "50"})
    try:
        ops(("a", {"op": "del"}))
        # More writes roll segments and dirty the log, until the cleaner has removed
        # every record of `a`, its tombstone included.
        running = app()
        t = threading.Thread(target=running.run)
        t.start()
        try:
            n = 0

            def a_is_gone() -> bool:
                nonlocal n
                n += 1
                ops(("c", {"op": "set", "v": n}))
                keys = _changelog_keys(kafka_broker.bootstrap, changelog)
                return not any(k.endswith(b"\x00a") for k in keys)

            assert wait_until(a_is_gone, 120, interval=0.2)
        finally:
            running.stop()
            t.join(60)
    finally:
        configure("broker", broker_id, {"log.cleaner.backoff.ms": None})
    # The copy from before the delete comes back to this worker.
    shutil.rmtree(state_dir)
    shutil.move(away, state_dir)
    ops(("a", {"op": "get"}), ("b", {"op": "get"}))
    app().run(until_idle=True)
    assert values(store, "got") == [{"k": "a", "v": None}, {"k": "b", "v": 2}]

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

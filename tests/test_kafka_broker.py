"""The Kafka test brokers themselves: a real KRaft broker whose transactions work, whose
committed data survives a SIGKILL and which serves again after a pause; and a real
three-node cluster whose transactions go on through a leader SIGKILL and a paused
leader. Everything the Kafka backend's tests and chaos runs build on.

confluent_kafka is imported inside the tests, after the broker started: when it is
missing, start() raises KafkaUnavailable and the test skips (fails under CI) with the
hint, instead of the whole module failing to import.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from infra.kafka_broker import KafkaBroker, KafkaUnavailable, resolve
from infra.kafka_cluster import KafkaCluster

# A single broker or a cluster: what the helpers below need is `bootstrap`.
Server = KafkaBroker | KafkaCluster

# Route librdkafka's logs (connection refused while the broker is down, ...) through
# logging, where pytest captures them, instead of raw writes to fd 2.
CLIENT_LOG = logging.getLogger("tests.kafka.client")


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka"))
    started = time.monotonic()
    try:
        broker.start()
    except KafkaUnavailable as exc:
        pytest.skip(str(exc))
    print(f"\nKafka start: {time.monotonic() - started:.1f}s {_rounded(broker.timings)}")
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def broker(module_broker: KafkaBroker) -> KafkaBroker:
    """The module's broker, running: these tests kill, stop and pause it, and each
    leaves it serving; one that failed half-way must not fail the next."""
    if module_broker.is_paused():
        module_broker.resume()
    if not module_broker.is_running():
        module_broker.start()
    return module_broker


@pytest.fixture
def topic() -> str:
    """A topic (and transactional id prefix) of the test's own on the shared broker."""
    return f"events-{uuid.uuid4().hex[:8]}"


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {phase: round(seconds, 2) for phase, seconds in timings.items()}


def _client_config(broker: Server, **extra: Any) -> dict[str, Any]:
    return {"bootstrap.servers": broker.bootstrap, "logger": CLIENT_LOG, **extra}


def _create_topic(
    broker: Server, name: str, partitions: int, *, replicas: list[int] | None = None
) -> None:
    """A topic with the server's default replication factor (1 on a single broker, 3 on
    the cluster), or on the ``replicas`` given, the first of which is its leader."""
    # The documented import; the 2.x stubs re-export NewTopic without marking it public.
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    admin = AdminClient(_client_config(broker))
    topic = (
        NewTopic(name, partitions)
        if replicas is None
        else NewTopic(name, partitions, -1, replica_assignment=[replicas] * partitions)
    )
    for future in admin.create_topics([topic]).values():
        future.result(timeout=30)


def _produce_transaction(
    broker: Server,
    values: list[bytes],
    *,
    commit: bool,
    producer: Any = None,
    topic: str,
    txn_id: str | None = None,
) -> Any:
    """Produce ``values`` in one transaction, flushed to the broker, then commit or abort.

    The flush before an abort matters: abort_transaction purges records still queued in
    the client, so without it the "aborted" records might never reach the log and the
    read_committed check would prove nothing.
    """
    from confluent_kafka import Producer

    if producer is None:
        transactional_id = txn_id or f"{topic}-txn"
        producer = Producer(_client_config(broker, **{"transactional.id": transactional_id}))
        producer.init_transactions(30)
    producer.begin_transaction()
    for i, value in enumerate(values):
        producer.produce(topic, value, key=str(i).encode())
    assert producer.flush(30) == 0
    if commit:
        producer.commit_transaction(30)
    else:
        producer.abort_transaction(30)
    return producer


def _read_all(broker: Server, isolation: str, topic: str) -> list[bytes]:
    """Every record of ``topic`` visible at ``isolation``, read to the end of each
    partition, in log order.

    Ends on the partition-EOF events, which librdkafka raises at the high watermark
    (read_uncommitted) or the last stable offset (read_committed), so the result is
    complete, not "whatever arrived within a timeout".
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    consumer = Consumer(
        _client_config(
            broker,
            **{
                "group.id": f"reader-{uuid.uuid4()}",
                "isolation.level": isolation,
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            },
        )
    )
    try:
        partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        at_end: set[int] = set()
        values: list[bytes] = []
        deadline = time.monotonic() + 60
        while len(at_end) < len(partitions):
            assert time.monotonic() < deadline, f"read stuck; at end: {sorted(at_end)}"
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            error = msg.error()
            if error is not None:
                assert error.code() == KafkaError._PARTITION_EOF, error
                partition = msg.partition()
                assert partition is not None
                at_end.add(partition)
                continue
            value = msg.value()
            assert value is not None
            values.append(value)
        return values
    finally:
        consumer.close()


@pytest.mark.kafka
def test_transactions_survive_a_broker_crash(broker: KafkaBroker, topic: str) -> None:
    _create_topic(broker, topic, partitions=2)
    committed = [f"committed-{i}".encode() for i in range(10)]
    aborted = [f"aborted-{i}".encode() for i in range(5)]
    producer = _produce_transaction(broker, committed, commit=True, topic=topic)
    _produce_transaction(broker, aborted, commit=False, producer=producer, topic=topic)

    # The aborted records are really in the log; read_committed hides exactly them.
    assert sorted(_read_all(broker, "read_uncommitted", topic)) == sorted(committed + aborted)
    assert sorted(_read_all(broker, "read_committed", topic)) == sorted(committed)

    # A transaction still open when the broker dies: written, flushed, never finished.
    in_flight = [f"in-flight-{i}".encode() for i in range(4)]
    producer.begin_transaction()
    for value in in_flight:
        producer.produce(topic, value)
    assert producer.flush(30) == 0

    bootstrap = broker.bootstrap
    started = time.monotonic()
    broker.kill()
    assert not broker.is_running()
    broker.restart()
    print(f"\nKafka kill+restart: {time.monotonic() - started:.1f}s {_rounded(broker.timings)}")
    assert broker.bootstrap == bootstrap

    # Committed data survived the crash; the aborted and the unfinished transactions
    # stay invisible.
    assert sorted(_read_all(broker, "read_committed", topic)) == sorted(committed)
    assert set(in_flight) <= set(_read_all(broker, "read_uncommitted", topic))

    # A new producer with the same transactional.id fences the pre-crash one, which
    # aborts its open transaction, and commits normally.
    after = [f"after-restart-{i}".encode() for i in range(3)]
    _produce_transaction(broker, after, commit=True, topic=topic)
    assert sorted(_read_all(broker, "read_committed", topic)) == sorted(committed + after)


@pytest.mark.kafka
def test_graceful_stop_and_restart_keep_data(broker: KafkaBroker, topic: str) -> None:
    _create_topic(broker, topic, partitions=1)
    records = [f"r{i}".encode() for i in range(3)]
    _produce_transaction(broker, records, commit=True, topic=topic)
    assert broker.stop() is not None  # the JVM's exit status after SIGTERM
    assert not broker.is_running()
    assert "Kafka Server started" in broker.log_tail(100_000)
    broker.restart()
    assert sorted(_read_all(broker, "read_committed", topic)) == sorted(records)


@pytest.mark.kafka
def test_a_broker_paused_in_the_middle_of_a_commit_finishes_it_once_resumed(
    broker: KafkaBroker, topic: str
) -> None:
    from confluent_kafka import Producer

    _create_topic(broker, topic, partitions=1)
    values = [f"paused-{i}".encode() for i in range(5)]
    producer = Producer(_client_config(broker, **{"transactional.id": f"{topic}-txn"}))
    producer.init_transactions(30)
    producer.begin_transaction()
    for value in values:
        producer.produce(topic, value)
    assert producer.flush(30) == 0

    errors: list[BaseException] = []

    def commit() -> None:
        try:
            producer.commit_transaction(60)
        except BaseException as exc:
            errors.append(exc)

    committing = threading.Thread(target=commit)
    with broker.paused():
        assert broker.is_paused()
        committing.start()
        # The commit request reached the frozen broker and waits, unread, in its socket.
        _wait_until(lambda: broker.unread_bytes() > 0, "no request reached the paused broker")
        assert committing.is_alive()  # nothing could have answered it
    assert not broker.is_paused()
    committing.join(60)
    assert not committing.is_alive() and errors == []
    assert _read_all(broker, "read_committed", topic) == values


def _wait_until(condition: Any, why: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, why
        time.sleep(0.01)


# ------------------------------------------------------------------- the cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    """One three-node cluster for the module: each test leaves it healthy."""
    cluster = KafkaCluster(tmp_path_factory.mktemp("cluster"))
    started = time.monotonic()
    try:
        cluster.start()
    except KafkaUnavailable as exc:
        pytest.skip(str(exc))
    print(f"\nKafka cluster start: {time.monotonic() - started:.1f}s {_rounded(cluster.timings)}")
    try:
        yield cluster
    finally:
        # Its data goes with the temp dir; a controlled shutdown would only cost seconds.
        cluster.kill()


def _on(cluster: KafkaCluster, leader: int) -> list[int]:
    """All nodes, ``leader`` first: the replica assignment that makes it the leader."""
    return [leader] + [node.node_id for node in cluster.nodes if node.node_id != leader]


@pytest.mark.kafka
def test_cluster_commits_through_a_sigkill_of_the_leader_and_coordinator(
    cluster: KafkaCluster,
) -> None:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, ConfigResource

    topic, txn_id = "cl-kill", "cl-kill-txn"
    victim = cluster.transaction_coordinator(txn_id)
    assert victim is not None
    _create_topic(cluster, topic, 1, replicas=_on(cluster, victim))
    assert cluster.wait_for_leader(topic) == victim

    before = [f"before-{i}".encode() for i in range(20)]
    during = [f"during-{i}".encode() for i in range(20)]
    after = [f"after-{i}".encode() for i in range(20)]
    producer = Producer(_client_config(cluster, **{"transactional.id": txn_id}))
    producer.init_transactions(30)
    producer.begin_transaction()
    for value in before:
        producer.produce(topic, value)
    assert producer.flush(30) == 0
    with cluster.node(victim).down():  # SIGKILL now, started again after the block
        # The open transaction goes on: more records, then the commit, while the
        # cluster fences the dead node, elects a new leader and a new coordinator.
        for value in during:
            producer.produce(topic, value)
        producer.commit_transaction(120)
        assert cluster.wait_for_leader(topic, not_on={victim}) != victim
        _produce_transaction(cluster, after, commit=True, producer=producer, topic=topic)
    assert cluster.node(victim).is_running()
    cluster.wait_healthy()  # the restarted node caught up and is back in every ISR

    # Read from the node that was killed, leading again: each record once, in order.
    assert cluster.elect_preferred(topic) == victim
    assert _read_all(cluster, "read_committed", topic) == before + during + after

    # Every partition on three nodes, the internal ones included, and a write needs two.
    admin = AdminClient(_client_config(cluster))
    metadata = admin.list_topics(timeout=30)
    for name in (topic, "__transaction_state", "__consumer_offsets"):
        partitions = metadata.topics[name].partitions.values()
        assert {len(p.replicas) for p in partitions} == {3}, name
    for name in (topic, "__transaction_state"):
        (config,) = admin.describe_configs([ConfigResource("topic", name)]).values()
        assert config.result()["min.insync.replicas"].value == "2", name


@pytest.mark.kafka
def test_cluster_fences_a_paused_leader_which_serves_again_once_resumed(
    cluster: KafkaCluster,
) -> None:
    from confluent_kafka import Producer

    topic, txn_id = "cl-pause", "cl-pause-txn"
    coordinator = cluster.transaction_coordinator(txn_id)
    victim = next(node.node_id for node in cluster.nodes if node.node_id != coordinator)
    _create_topic(cluster, topic, 1, replicas=_on(cluster, victim))
    assert cluster.wait_for_leader(topic) == victim

    opened = [f"opened-{i}".encode() for i in range(20)]
    later = [f"later-{i}".encode() for i in range(20)]
    producer = Producer(_client_config(cluster, **{"transactional.id": txn_id}))
    producer.init_transactions(30)
    producer.begin_transaction()
    for value in opened:
        producer.produce(topic, value)
    assert producer.flush(30) == 0
    with cluster.node(victim).paused():
        # Frozen mid-transaction: its broker session lapses, the controller fences it
        # and a replica from the ISR leads; the transaction commits there.
        assert cluster.wait_for_leader(topic, not_on={victim}) != victim
        producer.commit_transaction(120)
    cluster.wait_healthy()  # resumed, it rejoined every ISR

    # It leads again and serves the producer that last knew it as leader.
    assert cluster.elect_preferred(topic) == victim
    _produce_transaction(cluster, later, commit=True, producer=producer, topic=topic)
    assert _read_all(cluster, "read_committed", topic) == opened + later


def test_missing_java_or_maven_is_reported_as_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not marked kafka: it needs neither Java nor Maven, and checks the message the
    # suite turns into a skip (or, under CI, a failure).
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("ONCEFLOW_KAFKA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(KafkaUnavailable, match="openjdk-17-jre-headless maven"):
        KafkaBroker(tmp_path / "kafka").start()
    with pytest.raises(KafkaUnavailable, match="`mvn` not found"):
        resolve()

"""Producer and Consumer on Kafka: what `Producer("kafka://...")` and
`Consumer("kafka://...")` use underneath."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from ._errors import ConfigError, StoreError
from ._kafka_common import (
    CLIENT_LOG,
    KafkaURL,
    encode_headers,
    encode_key,
    kafka_module,
    kafka_partition,
    message_record,
    transient,
)
from ._records import Record, SendResult
from ._serde import encode_value

_TIMEOUT_S = 30.0
# How long a send may wait for its acknowledgement. The client retries through a broker
# restart by itself (idempotently, so never twice); this bounds how long it tries.
SEND_TIMEOUT_S = 120.0


class KafkaProducerImpl:
    """An idempotent producer (acks=all): a send returns once every replica has it.

    Kafka's idempotence covers retries within one producer session; re-sends from a new
    session are recognised by their business id in a `dedupe` step. The broker gives
    each session its own producer id and sequences, so two sessions of one onceflow
    `producer_id` cannot take each other's records for duplicates: both are stored, and
    neither is fenced. Not transactional on purpose: a transaction per send costs about
    3 ms instead of 0.3 ms on a local broker, gives the input topics commit markers and
    aborted records (offsets no longer follow the records, which offset-keyed row ids
    compared across runs rely on), and a producer killed mid-send would hold back every
    read_committed reader of its partitions until its transaction timed out. Safe to
    share between threads: librdkafka is, and each call waits for its own records.
    """

    def __init__(self, store: str, producer_id: str, partitions: int) -> None:
        self.ck = kafka_module()
        self.url = KafkaURL.parse(store)
        self.partitions = partitions
        self.producer = self.ck.Producer(
            {
                "bootstrap.servers": self.url.bootstrap,
                "logger": CLIENT_LOG,
                "enable.idempotence": True,
                "acks": "all",
                "client.id": producer_id,
                "linger.ms": 2,
                "message.timeout.ms": int(SEND_TIMEOUT_S * 1000),
            }
        )
        self.admin = self.ck.admin.AdminClient(
            {"bootstrap.servers": self.url.bootstrap, "logger": CLIENT_LOG}
        )
        self._topics: dict[str, int] = {}

    def ensure_topic(self, topic: str) -> int:
        n = self._topics.get(topic)
        if n is not None:
            return n
        # Through a broker restart: the admin calls fail at once while it is down.
        deadline = time.monotonic() + SEND_TIMEOUT_S
        while True:
            try:
                n = self._ensure_topic(topic)
                self._topics[topic] = n
                return n
            except self.ck.KafkaException as exc:
                if time.monotonic() > deadline or not transient(self.ck, exc.args[0]):
                    raise StoreError(f"cannot create topic '{topic}': {exc}") from exc
                time.sleep(0.5)

    def _ensure_topic(self, topic: str) -> int:
        name = self.url.topic(topic)
        md = self.admin.list_topics(timeout=_TIMEOUT_S)
        if name not in md.topics:
            fut = self.admin.create_topics(
                [self.ck.admin.NewTopic(name, num_partitions=self.partitions)],
                request_timeout=_TIMEOUT_S,
            )[name]
            try:
                fut.result()
            except self.ck.KafkaException as exc:
                if exc.args[0].code() != self.ck.KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
        deadline = time.monotonic() + _TIMEOUT_S
        while True:
            t = self.admin.list_topics(timeout=_TIMEOUT_S).topics.get(name)
            if t is not None and t.partitions and t.error is None:
                return len(t.partitions)
            if time.monotonic() > deadline:
                raise StoreError(f"topic '{topic}' did not appear on {self.url.bootstrap}")
            time.sleep(0.1)

    def send_batch(
        self,
        topic: str,
        items: list[tuple[str | None, Any, str | None]],
        headers: dict[str, str] | None,
        partition: int | None,
        sequences: list[int] | None,
        timestamp: float | None,
    ) -> list[SendResult]:
        if sequences is not None:
            raise ConfigError(
                "sequences= is not supported on Kafka: a new producer session cannot resume "
                "Kafka's sequence numbers. Send an id= and dedupe on it instead"
            )
        nparts = self.ensure_topic(topic)
        results: list[SendResult | None] = [None] * len(items)
        errors: list[Any] = []

        def delivered(i: int) -> Any:
            def cb(err: Any, msg: Any) -> None:
                if err is not None:
                    errors.append(err)
                else:
                    results[i] = SendResult(topic, msg.partition(), msg.offset(), False)

            return cb

        ts = int((timestamp or time.time()) * 1000)
        for i, (key, value, eid) in enumerate(items):
            part = partition if partition is not None else kafka_partition(key, nparts, i)
            while True:
                try:
                    self.producer.produce(
                        self.url.topic(topic),
                        value=encode_value(value),
                        key=None if key is None else encode_key(key),
                        partition=part,
                        headers=encode_headers(headers, eid),
                        timestamp=ts,
                        on_delivery=delivered(i),
                    )
                    break
                except BufferError:
                    self.producer.poll(0.05)
        remaining = self.producer.flush(SEND_TIMEOUT_S + 5.0)
        if remaining or errors:
            raise StoreError(
                f"send to '{topic}' not acknowledged: {errors[0] if errors else 'timeout'}"
            )
        return [r for r in results if r is not None]

    def last_sequence(self, topic: str, partition: int) -> int:
        raise ConfigError("last_sequence() is not available on Kafka")

    def close(self) -> None:
        self.producer.flush(_TIMEOUT_S)


class KafkaConsumerImpl:
    """A read_committed group consumer with explicit commits."""

    def __init__(self, store: str, group: str, topics: Sequence[str], start: str) -> None:
        self.ck = kafka_module()
        self.url = KafkaURL.parse(store)
        self.topics = list(topics)
        self.consumer = self.ck.Consumer(
            {
                "bootstrap.servers": self.url.bootstrap,
                "logger": CLIENT_LOG,
                "group.id": self.url.topic(group),
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest" if start == "earliest" else "latest",
                "session.timeout.ms": 10_000,
                "fetch.wait.max.ms": 20,
                "enable.partition.eof": True,
            }
        )
        self.assigned = False
        self._eof: set[tuple[str, int]] = set()

        def on_assign(c: Any, parts: list[Any]) -> None:
            self.assigned = True

        self.consumer.subscribe([self.url.topic(t) for t in self.topics], on_assign=on_assign)
        self._positions: dict[tuple[str, int], int] = {}

    def poll(self, max_records: int, timeout: float) -> list[Record]:
        msgs = self.consumer.consume(max_records, max(timeout, 0.0))
        out = []
        for m in msgs:
            if m.error():
                if m.error().code() == self.ck.KafkaError._PARTITION_EOF:
                    self._eof.add((m.topic(), m.partition()))
                continue
            self._eof.discard((m.topic(), m.partition()))
            topic = self.url.strip(m.topic())
            out.append(message_record(m, topic))
            self._positions[(topic, m.partition())] = m.offset() + 1
        return out

    def caught_up(self) -> bool:
        """Assigned, and at the end of every assigned partition."""
        if not self.assigned:
            return False
        # The fetcher's end-of-partition event steps over transaction markers, which
        # the consumer's position never passes.
        return all((tp.topic, tp.partition) in self._eof for tp in self.consumer.assignment())

    def drained(self) -> Iterator[Record]:
        """Records until caught up. A group consumer has no partitions until the group
        assigns them, so "drained" means assigned and at the end of each, not one empty
        poll."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            batch = self.poll(1000, 0.2)
            yield from batch
            if not batch and self.caught_up():
                return

    def position(self, topic: str, partition: int) -> int:
        return self._positions.get((topic, partition), 0)

    def seek(self, topic: str, partition: int, offset: int) -> None:
        self.consumer.seek(self.ck.TopicPartition(self.url.topic(topic), partition, offset))
        self._positions[(topic, partition)] = offset

    def commit(self) -> None:
        if self._positions:
            self.consumer.commit(
                offsets=[
                    self.ck.TopicPartition(self.url.topic(t), p, off)
                    for (t, p), off in self._positions.items()
                ],
                asynchronous=False,
            )

    def close(self) -> None:
        self.consumer.close()


def read_committed(store: str, topic: str, timeout: float = 60.0) -> list[Record]:
    """Every committed record of a topic, without joining a group: assigned partitions,
    read to the end (the fetcher's end-of-partition event steps over markers)."""
    ck = kafka_module()
    url = KafkaURL.parse(store)
    c = ck.Consumer(
        {
            "bootstrap.servers": url.bootstrap,
            "logger": CLIENT_LOG,
            "group.id": "onceflow-reader",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 10,
        }
    )
    try:
        md = c.list_topics(url.topic(topic), timeout=_TIMEOUT_S).topics.get(url.topic(topic))
        if md is None or md.error is not None or not md.partitions:
            return []
        parts = list(md.partitions)
        c.assign([ck.TopicPartition(url.topic(topic), p, ck.OFFSET_BEGINNING) for p in parts])
        done: set[int] = set()
        out: list[Record] = []
        deadline = time.monotonic() + timeout
        while len(done) < len(parts) and time.monotonic() < deadline:
            for m in c.consume(10_000, 0.2):
                if m.error():
                    if m.error().code() == ck.KafkaError._PARTITION_EOF:
                        done.add(m.partition())
                    continue
                done.discard(m.partition())
                out.append(message_record(m, topic))
        if len(done) < len(parts):
            raise StoreError(f"reading '{topic}' did not reach its end in {timeout:.0f}s")
        return sorted(out, key=lambda r: (r.partition, r.offset))
    finally:
        c.close()

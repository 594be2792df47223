"""Producer and Consumer on Kafka: what `Producer("kafka://...")` and
`Consumer("kafka://...")` use underneath."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ._errors import ConfigError, ProducerFencedError, StoreError, UnavailableError
from ._kafka_common import (
    CLIENT_LOG,
    KafkaURL,
    encode_headers,
    kafka_module,
    kafka_partition,
    message_record,
)
from ._records import Record, SendResult
from ._serde import encode_value

_TIMEOUT_S = 30.0
# How long a send may wait for its acknowledgement. The client retries through a broker
# restart by itself (idempotently, so never twice); this bounds how long it tries.
SEND_TIMEOUT_S = 120.0
# The broker aborts a producer transaction open longer than this. A send holds one only
# while it is sent; this bounds how long read_committed readers of a partition wait behind
# a producer killed mid-send that does not come back (one that restarts with its
# producer_id aborts it at once). librdkafka's default.
PRODUCER_TXN_TIMEOUT_S = 60.0
# A send attempt must end well inside the transaction timeout: past it the broker aborts
# the transaction and bumps the epoch, which the client reports exactly as a fence.
_ATTEMPT_S = PRODUCER_TXN_TIMEOUT_S * 0.8


class KafkaProducerImpl:
    """A transactional producer (acks=all) per producer session: a send returns once
    every in-sync replica has it, and a `send_batch` is one transaction.

    The transactional id is derived from the producer id, so opening a Producer
    (init_transactions) fences the older session of the same id and aborts its open
    transaction: the old one's sends fail with ProducerFencedError instead of landing
    beside the new one's. Kafka's idempotence covers retries within one session;
    re-sends from a new session are recognised by their business id in a `dedupe` step.
    Not thread-safe: `Producer` lets one send in at a time.
    """

    def __init__(self, store: str, producer_id: str, partitions: int) -> None:
        self.ck = kafka_module()
        self.url = KafkaURL.parse(store)
        self.producer_id = producer_id
        self.partitions = partitions
        self.admin = self.ck.admin.AdminClient(
            {"bootstrap.servers": self.url.bootstrap, "logger": CLIENT_LOG}
        )
        self._topics: dict[str, int] = {}
        self.fenced: str | None = None
        self.producer: Any = None
        self._new_producer(time.monotonic() + SEND_TIMEOUT_S)

    def _new_producer(self, deadline: float) -> None:
        """(Re)open the session: init_transactions fences every older producer of this
        transactional id and settles its open transaction. Waits out a broker outage
        until `deadline`."""
        self.producer = self.ck.Producer(
            {
                "bootstrap.servers": self.url.bootstrap,
                "logger": CLIENT_LOG,
                "transactional.id": self.url.topic(f"onceflow.producer.{self.producer_id}"),
                "enable.idempotence": True,
                "acks": "all",
                "client.id": self.producer_id,
                "linger.ms": 2,
                "transaction.timeout.ms": int(PRODUCER_TXN_TIMEOUT_S * 1000),
                # Undelivered records fail the attempt before its transaction times out;
                # the send then aborts and sends them again in a new transaction.
                "message.timeout.ms": int(PRODUCER_TXN_TIMEOUT_S * 500),
                # The coordinator answers CONCURRENT_TRANSACTIONS right after a commit;
                # the default 100 ms backoff would then delay the next send.
                "retry.backoff.ms": 10,
            }
        )
        while True:
            try:
                # Connected first: a coordinator lookup made before any broker connection
                # is up fails, and librdkafka only tries again 500 ms later.
                self.producer.list_topics(timeout=_TIMEOUT_S)
                self.producer.init_transactions(_TIMEOUT_S)
                return
            except self.ck.KafkaException as exc:
                err = exc.args[0]
                if err.code() in self._fence_codes():
                    self.fenced = f"a newer Producer with this producer_id was opened ({err.str()})"
                    raise ProducerFencedError(self.producer_id, self.fenced) from exc
                if err.retriable() or _transient(self.ck, err):
                    if time.monotonic() < deadline:
                        continue
                    raise UnavailableError(
                        f"Kafka at {self.url.bootstrap} did not open a producer session for "
                        f"'{self.producer_id}' ({err.str()}); operator action: bring the "
                        "broker back, then open the Producer again"
                    ) from exc
                raise ConfigError(
                    f"Kafka at {self.url.bootstrap} did not open a producer session for "
                    f"'{self.producer_id}' ({err.str()}). Operator action: check that the "
                    "broker is up, and that its transaction.state.log.replication.factor and "
                    "transaction.state.log.min.isr are no larger than the number of brokers"
                ) from exc

    def _gone_codes(self) -> set[int]:
        """Delivery errors of an outage, or of the abort that follows one."""
        return {
            self.ck.KafkaError._MSG_TIMED_OUT,
            self.ck.KafkaError._TIMED_OUT,
            self.ck.KafkaError._TRANSPORT,
            self.ck.KafkaError._ALL_BROKERS_DOWN,
            self.ck.KafkaError._PURGE_QUEUE,
            self.ck.KafkaError._PURGE_INFLIGHT,
        }

    def _fence_codes(self) -> set[int]:
        return {
            self.ck.KafkaError._FENCED,
            self.ck.KafkaError.PRODUCER_FENCED,
            self.ck.KafkaError.INVALID_PRODUCER_EPOCH,
        }

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
                if time.monotonic() > deadline or not _transient(self.ck, exc.args[0]):
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
        if self.fenced is not None:
            raise ProducerFencedError(self.producer_id, self.fenced)
        nparts = self.ensure_topic(topic)
        ts = int((timestamp or time.time()) * 1000)
        planned = [
            (
                partition if partition is not None else kafka_partition(key, nparts, i),
                None if key is None else key.encode(),
                encode_value(value),
                encode_headers(headers, eid),
            )
            for i, (key, value, eid) in enumerate(items)
        ]
        deadline = time.monotonic() + SEND_TIMEOUT_S
        while True:
            if self.producer is None:
                # After an attempt whose outcome was unknown, or whose abort failed: a new
                # epoch makes sure no late request of that transaction lands on the next.
                self._new_producer(deadline)
            results = self._attempt(topic, planned, ts, deadline)
            if results is not None:
                return results
            if time.monotonic() > deadline:
                raise UnavailableError(
                    f"send to '{topic}' was not acknowledged within {SEND_TIMEOUT_S:.0f}s "
                    f"(Kafka at {self.url.bootstrap} unreachable); it was aborted, nothing of "
                    "it is stored. Operator action: send it again once the broker is back"
                )

    def _attempt(
        self,
        topic: str,
        planned: list[tuple[int, bytes | None, bytes, list[tuple[str, bytes]] | None]],
        ts: int,
        deadline: float,
    ) -> list[SendResult] | None:
        """One transaction: the results, or None when it was aborted (nothing stored)."""
        p = self.producer
        results: list[SendResult | None] = [None] * len(planned)
        refused: list[Any] = []

        def delivered(i: int) -> Any:
            def cb(err: Any, msg: Any) -> None:
                if err is None:
                    results[i] = SendResult(topic, msg.partition(), msg.offset(), False)
                elif not (err.retriable() or err.code() in self._gone_codes()):
                    refused.append(err)

            return cb

        began = time.monotonic()
        name = self.url.topic(topic)
        committing = False
        try:
            p.begin_transaction()
            for i, (part, key, raw, hdrs) in enumerate(planned):
                while True:
                    try:
                        p.produce(
                            name,
                            value=raw,
                            key=key,
                            partition=part,
                            headers=hdrs,
                            timestamp=ts,
                            on_delivery=delivered(i),
                        )
                        break
                    except BufferError:
                        p.poll(0.05)
            committing = True
            p.commit_transaction(max(1.0, min(deadline, began + _ATTEMPT_S) - time.monotonic()))
        except self.ck.KafkaException as exc:
            self._failed(topic, exc, time.monotonic() - began, committing, refused)
            return None
        if any(r is None for r in results):
            p.poll(0)
        if any(r is None for r in results):
            raise StoreError(f"send to '{topic}' committed without a delivery report")
        return [r for r in results if r is not None]

    def _failed(
        self, topic: str, exc: Any, elapsed: float, committing: bool, refused: list[Any]
    ) -> None:
        """After a failed transaction: returns if it was aborted and may go again, else
        raises the error that says what happened."""
        err = exc.args[0]
        if err.code() in self._fence_codes():
            late = (
                f"; this send took {elapsed:.0f}s, longer than the transaction timeout, "
                "so the broker may have aborted it for that"
                if elapsed >= PRODUCER_TXN_TIMEOUT_S
                else ""
            )
            self.fenced = (
                f"a newer Producer with this producer_id was opened ({err.str()}){late}; "
                "this send was not acknowledged"
            )
            raise ProducerFencedError(self.producer_id, self.fenced) from exc
        if err.txn_requires_abort() or not committing:
            try:
                self.producer.abort_transaction(_TIMEOUT_S)
            except self.ck.KafkaException:
                # The next attempt's new producer aborts it, whatever state it is in.
                self.producer = None
            # Not committed: an outage is waited out by sending again; a record the
            # broker or the client refuses would be refused again.
            if refused or not committing:
                raise StoreError(
                    f"send to '{topic}' was refused ({(refused or [err])[0]}); nothing of it "
                    "is stored. Operator action: fix the records (size, topic) and send again"
                ) from exc
            return None
        # A commit that timed out or failed otherwise may still land: a request of it
        # can be delayed past a later transaction's start (librdkafka has no KIP-890), so
        # this producer is never used again.
        self.producer = None
        raise UnavailableError(
            f"send to '{topic}' has an unknown outcome: its commit failed ({err.str()}). It "
            "may or may not be stored. Operator action: send it again with the same id= "
            "(a dedupe step drops it if it was stored)"
        ) from exc

    def last_sequence(self, topic: str, partition: int) -> int:
        raise ConfigError("last_sequence() is not available on Kafka")

    def close(self) -> None:
        # Nothing is in flight between sends (a commit flushes), and a fenced producer's
        # flush would only raise its fence again.
        self.producer = None


def _transient(ck: Any, err: Any) -> bool:
    """An error that a broker coming back would clear."""
    return bool(err.retriable()) or err.code() in (
        ck.KafkaError._TRANSPORT,
        ck.KafkaError._ALL_BROKERS_DOWN,
        ck.KafkaError._TIMED_OUT,
        ck.KafkaError.REQUEST_TIMED_OUT,
        ck.KafkaError.NOT_CONTROLLER,
        ck.KafkaError.LEADER_NOT_AVAILABLE,
    )


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

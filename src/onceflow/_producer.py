"""Producer: idempotent, durable sends into the log."""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from collections.abc import Iterable
from typing import Any

from ._errors import ConfigError, StoreError
from ._kafka_clients import KafkaProducerImpl
from ._kafka_common import is_kafka
from ._records import Columns, SendResult
from ._serde import encode_value
from ._sqlite import SQLiteStore, partition_for, store_path

# A send whose COMMIT failed has an unknown outcome; it is retried with the same
# sequence numbers, which makes the retry a no-op if the first attempt did land.
_SEND_ATTEMPTS = 5


class Producer:
    """Sends records durably and idempotently.

    Each record gets a per-partition sequence number under a stable `producer_id`; the
    store keeps the last sequence per producer and partition and drops a record whose
    sequence it has already stored. A producer that restarts with the same id resumes
    its sequences, and a re-send with an explicit `sequence=` is stored once.

    `send` returns only once the record is durable (committed with synchronous=FULL).

        >>> p = Producer("demo.db", producer_id="orders-api")
        >>> p.send("orders", {"id": "o-1", "total": 12}, key="cust-7", id="o-1")  # doctest: +SKIP
    """

    def __init__(
        self,
        store: str | os.PathLike[str],
        *,
        producer_id: str | None = None,
        partitions: int = 1,
    ) -> None:
        self.producer_id = producer_id or f"p-{uuid.uuid4().hex[:12]}"
        self._kafka: KafkaProducerImpl | None = None
        if is_kafka(os.fspath(store)):
            self._kafka = KafkaProducerImpl(os.fspath(store), self.producer_id, partitions)
            return
        self._store = SQLiteStore(store_path(store))
        self._default_partitions = partitions
        self._last: dict[tuple[int, int], int] = {}

    def close(self) -> None:
        if self._kafka is not None:
            self._kafka.close()
            return
        self._store.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def last_sequence(self, topic: str, partition: int) -> int:
        """The last sequence this producer id stored in a partition, -1 if none."""
        if self._kafka is not None:
            return self._kafka.last_sequence(topic, partition)
        found = self._store.topic(topic)
        if found is None:
            return -1
        return self._load_last(found[0], partition)

    def _load_last(self, tid: int, part: int) -> int:
        hit = self._last.get((tid, part))
        if hit is not None:
            return hit
        with self._store.lock:
            row = self._store.conn.execute(
                "SELECT last_seq FROM producer_seqs WHERE producer_id=? AND topic_id=? AND part=?",
                (self.producer_id, tid, part),
            ).fetchone()
        last = -1 if row is None else int(row[0])
        self._last[(tid, part)] = last
        return last

    def send(
        self,
        topic: str,
        value: Any,
        *,
        key: str | None = None,
        id: str | None = None,
        headers: dict[str, str] | None = None,
        partition: int | None = None,
        sequence: int | None = None,
        timestamp: float | None = None,
    ) -> SendResult:
        """Send one record and wait until it is durable. Values: bytes, str or JSON-able."""
        return self.send_batch(
            topic,
            [(key, value, id)],
            headers=headers,
            partition=partition,
            sequences=None if sequence is None else [sequence],
            timestamp=timestamp,
        )[0]

    def send_batch(
        self,
        topic: str,
        items: Iterable[tuple[str | None, Any, str | None]],
        *,
        headers: dict[str, str] | None = None,
        partition: int | None = None,
        sequences: list[int] | None = None,
        timestamp: float | None = None,
    ) -> list[SendResult]:
        """Send (key, value, id) items in one durable transaction, all or nothing.

        On Kafka the items are acknowledged together but are not one transaction.
        """
        if self._kafka is not None:
            return self._kafka.send_batch(
                topic, list(items), headers, partition, sequences, timestamp
            )
        tid, nparts = self._store.ensure_topic(topic, self._default_partitions)
        if partition is not None and not 0 <= partition < nparts:
            raise ConfigError(f"topic '{topic}' has {nparts} partitions; partition={partition}")
        ts = time.time() if timestamp is None else timestamp
        hdr = headers or None
        planned: list[tuple[int, int, str | None, bytes, str | None]] = []
        next_seq: dict[int, int] = {}
        items = list(items)
        if sequences is not None and len(sequences) != len(items):
            raise ConfigError("sequences= must give one sequence per item")
        for i, (key, value, eid) in enumerate(items):
            part = partition if partition is not None else partition_for(key, nparts, i)
            if sequences is not None:
                seq = sequences[i]
            else:
                seq = next_seq.get(part, self._load_last(tid, part) + 1)
                next_seq[part] = seq + 1
            planned.append((part, seq, key, encode_value(value), eid))
        for attempt in range(_SEND_ATTEMPTS):
            try:
                return self._write(topic, tid, planned, hdr, ts)
            except (sqlite3.OperationalError, sqlite3.DatabaseError) as exc:
                if attempt == _SEND_ATTEMPTS - 1:
                    raise StoreError(f"send to '{topic}' failed: {exc}") from exc
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    def _write(
        self,
        topic: str,
        tid: int,
        planned: list[tuple[int, int, str | None, bytes, str | None]],
        hdr: dict[str, str] | None,
        ts: float,
    ) -> list[SendResult]:
        results: list[SendResult] = []
        cols: dict[int, Columns] = {}
        last_seen: dict[int, int] = {}
        with self._store.transaction() as conn:
            for part, seq, key, raw, eid in planned:
                last = last_seen.get(part)
                if last is None:
                    row = conn.execute(
                        "SELECT last_seq FROM producer_seqs "
                        "WHERE producer_id=? AND topic_id=? AND part=?",
                        (self.producer_id, tid, part),
                    ).fetchone()
                    last = -1 if row is None else int(row[0])
                if seq <= last:
                    results.append(SendResult(topic, part, None, True))
                    continue
                last_seen[part] = seq
                results.append(SendResult(topic, part, -1, False))
                c = cols.get(part)
                if c is None:
                    c = cols[part] = Columns()
                c.add(key, raw, hdr, ts, eid)
            firsts = {p: self._store.append(conn, tid, p, c) for p, c in cols.items()}
            now = time.time()
            conn.executemany(
                "INSERT INTO producer_seqs(producer_id, topic_id, part, last_seq, updated) "
                "VALUES(?,?,?,?,?) ON CONFLICT(producer_id, topic_id, part) "
                "DO UPDATE SET last_seq=excluded.last_seq, updated=excluded.updated",
                [(self.producer_id, tid, p, s, now) for p, s in last_seen.items()],
            )
        for part, seq in last_seen.items():
            self._last[(tid, part)] = max(seq, self._last.get((tid, part), -1))
        # Fill in offsets now that the transaction is durable.
        counters = dict(firsts)
        out = []
        for r in results:
            if r.duplicate:
                out.append(r)
            else:
                off = counters[r.partition]
                counters[r.partition] = off + 1
                out.append(SendResult(r.topic, r.partition, off, False))
        return out

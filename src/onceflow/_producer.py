"""Producer: idempotent, durable sends into the log, in fenced producer sessions."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

from ._backend import ProducerClient, open_backend
from ._errors import ConfigError, OutOfOrderSequenceError, ProducerFencedError, StoreError
from ._records import Columns, SendResult
from ._serde import encode_value
from ._sqlite import SQLiteStore, ensure_producer_tables, partition_for

# A send whose transaction failed may or may not have committed; it is retried with the
# sequence numbers the failed attempt took, which makes the retry find the first attempt's
# records (and store nothing twice) if it did commit.
_SEND_ATTEMPTS = 5

# How many of a producer id's latest sequence numbers per partition the embedded log
# can check a re-send against. Kafka keeps its last 5 batches; a retry after an unknown
# outcome, or a restarted producer re-sending what it had in flight, is within this.
SEQUENCE_WINDOW = 10_000

# (partition, key, encoded value, id) of one record to write.
_Planned = tuple[int, str | None, bytes, str | None]


class Producer:
    """Sends records durably and idempotently, in a producer session.

    `send` returns only once the record is durable: committed with synchronous=FULL on
    the embedded log, on every in-sync replica on Kafka. A `Producer` may be shared by
    threads; every acknowledged record is stored once.

    Embedded log: sessions. Opening a `Producer` opens a new session of its
    `producer_id` and fences the previous one: every later send of an older `Producer`
    with that id (another replica, or the process a restart replaced while it still
    drains) raises `ProducerFencedError` and stores nothing. A `send_batch` is one
    transaction: all of its records are stored, or none.

    Embedded log: sequences. Each record gets the next sequence number of its producer
    id and partition, assigned in the send's own transaction (`SendResult.sequence`). A
    restarted producer continues from the stored numbers. A re-send that must be stored
    once (a retry after an unknown outcome, a restarted producer re-sending what it had
    in flight) passes `sequence=`/`sequences=`; per partition, in order:

    - a sequence at or below the last stored one is a duplicate if the record stored
      under it has the same key, value, id and headers: nothing is written,
      `duplicate=True`, `offset` is the stored copy's (the store can check at least the
      last `SEQUENCE_WINDOW` sequences of a producer id and partition);
    - the next sequences after the last stored one are written;
    - anything else is refused with `OutOfOrderSequenceError` and nothing of the send is
      written: a gap, sequences not increasing within the send, a sequence stored for a
      different record, or one too old to check.

    Kafka: the broker gives each `Producer` a session (producer id and sequences) of its
    own, so two `Producer`s with one `producer_id` both store what they send and neither
    is fenced. A `send_batch` is acknowledged together but is not one transaction (a
    failed one may have stored some of its records); `sequences=` is refused. A record
    re-sent from a new session, or after a failed send, is dropped by a `dedupe` step
    on its `id=`.

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
        self._closed = False
        self._close_lock = threading.Lock()
        self._client: ProducerClient = open_backend(store).producer(self.producer_id, partitions)

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._client.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def last_sequence(self, topic: str, partition: int) -> int:
        """The last sequence this producer id stored in a partition, -1 if none."""
        return self._client.last_sequence(topic, partition)

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
        """Send (key, value, id) items in one durable transaction, all or nothing."""
        items = list(items)
        if sequences is not None and len(sequences) != len(items):
            raise ConfigError("sequences= must give one sequence per item")
        if self._closed:
            raise ConfigError(f"producer '{self.producer_id}' is closed; open a new one")
        return self._client.send_batch(topic, items, headers, partition, sequences, timestamp)


class EmbeddedProducer:
    """The embedded log's side of `Producer`: fenced sessions and sequences in the store."""

    def __init__(self, store: SQLiteStore, producer_id: str, partitions: int) -> None:
        self.producer_id = producer_id
        # One embedded send at a time per Producer: a send's retries reuse the sequence
        # numbers its failed attempt took, which another thread's send must not take.
        self._lock = threading.Lock()
        self._closed = False
        self._fenced: str | None = None
        self._store = store
        self._default_partitions = partitions
        try:
            self._epoch = self._open_session()
        except BaseException:
            self._store.close()
            raise

    def _open_session(self) -> int:
        """Raise the producer id's epoch: from now on only this session may send."""
        with self._store.transaction() as conn:
            ensure_producer_tables(conn)
            row = conn.execute(
                "SELECT epoch FROM producer_sessions WHERE producer_id=?", (self.producer_id,)
            ).fetchone()
            epoch = 1 if row is None else int(row[0]) + 1
            conn.execute(
                "INSERT INTO producer_sessions(producer_id, epoch, opened) VALUES(?,?,?) "
                "ON CONFLICT(producer_id) DO UPDATE SET epoch=excluded.epoch, "
                "opened=excluded.opened",
                (self.producer_id, epoch, time.time()),
            )
        return epoch

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._store.close()

    def last_sequence(self, topic: str, partition: int) -> int:
        found = self._store.topic(topic)
        if found is None:
            return -1
        with self._store.lock:
            return _stored_last(self._store.conn, self.producer_id, found[0], partition)

    def send_batch(
        self,
        topic: str,
        items: list[tuple[str | None, Any, str | None]],
        headers: dict[str, str] | None,
        partition: int | None,
        sequences: list[int] | None,
        timestamp: float | None,
    ) -> list[SendResult]:
        with self._lock:
            if self._closed:
                raise ConfigError(f"producer '{self.producer_id}' is closed; open a new one")
            if self._fenced is not None:
                raise ProducerFencedError(self.producer_id, f"{self._fenced}; not stored")
            return self._send_embedded(topic, items, headers, partition, sequences, timestamp)

    def _send_embedded(
        self,
        topic: str,
        items: list[tuple[str | None, Any, str | None]],
        headers: dict[str, str] | None,
        partition: int | None,
        sequences: list[int] | None,
        timestamp: float | None,
    ) -> list[SendResult]:
        tid, nparts = self._store.ensure_topic(topic, self._default_partitions)
        if partition is not None and not 0 <= partition < nparts:
            raise ConfigError(f"topic '{topic}' has {nparts} partitions; partition={partition}")
        ts = time.time() if timestamp is None else timestamp
        hdr = headers or None
        # Encoding is done once, outside the transaction that holds the write lock.
        planned: list[_Planned] = [
            (
                partition if partition is not None else partition_for(key, nparts, i),
                key,
                encode_value(value),
                eid,
            )
            for i, (key, value, eid) in enumerate(items)
        ]
        seqs = sequences
        taken: list[int] = []
        failed: BaseException | None = None
        for attempt in range(_SEND_ATTEMPTS):
            try:
                results = self._write(topic, tid, planned, seqs, hdr, ts, taken)
            except ProducerFencedError as exc:
                if failed is None:
                    raise
                raise ProducerFencedError(
                    self.producer_id,
                    f"{self._fenced}; an earlier attempt of this send failed ({failed}) and "
                    "may have been stored",
                ) from exc
            except (sqlite3.OperationalError, sqlite3.DatabaseError) as exc:
                if attempt == _SEND_ATTEMPTS - 1:
                    raise StoreError(f"send to '{topic}' failed: {exc}") from exc
                failed = exc
                if seqs is None and taken:
                    # The attempt may have committed before it failed: its numbers make
                    # the retry recognise its records instead of storing them again.
                    seqs = list(taken)
                time.sleep(0.01 * (attempt + 1))
                continue
            if sequences is None and attempt > 0:
                # Found by the retry, stored by this very call's earlier attempt.
                return [r._replace(duplicate=False) for r in results]
            return results
        raise AssertionError("unreachable")

    def _write(
        self,
        topic: str,
        tid: int,
        planned: list[_Planned],
        seqs: list[int] | None,
        hdr: dict[str, str] | None,
        ts: float,
        taken: list[int],
    ) -> list[SendResult]:
        """One send transaction: check the session, number (or check) the records,
        append the new ones. `taken` receives the numbers given to unnumbered records."""
        pid = self.producer_id
        with self._store.transaction() as conn:
            row = conn.execute(
                "SELECT epoch FROM producer_sessions WHERE producer_id=?", (pid,)
            ).fetchone()
            if row is None or int(row[0]) != self._epoch:
                self._fenced = (
                    f"a newer Producer with this producer_id was opened (session "
                    f"{'?' if row is None else row[0]}, this one is {self._epoch})"
                )
                raise ProducerFencedError(pid, f"{self._fenced}; this send was not stored")
            last = {p: _stored_last(conn, pid, tid, p) for p in {p for p, *_ in planned}}
            new: Iterable[int]
            dups: dict[int, int] = {}
            if seqs is None:
                nxt = dict(last)
                for p, *_ in planned:
                    nxt[p] += 1
                    taken.append(nxt[p])
                seqs = taken
                new = range(len(planned))
            else:
                new, dups = self._check_sequences(conn, topic, tid, planned, seqs, last, hdr)
            cols: dict[int, Columns] = {}
            for i in new:
                p, key, raw, eid = planned[i]
                c = cols.get(p)
                if c is None:
                    c = cols[p] = Columns()
                c.add(key, raw, hdr, ts, eid)
            firsts = {p: self._store.append(conn, tid, p, c) for p, c in cols.items()}
            _record_batches(conn, pid, tid, {p: last[p] for p in cols}, cols, firsts)
        out: list[SendResult] = []
        counters = dict(firsts)
        for i, (p, *_) in enumerate(planned):
            if i in dups:
                out.append(SendResult(topic, p, dups[i], True, seqs[i]))
            else:
                out.append(SendResult(topic, p, counters[p], False, seqs[i]))
                counters[p] += 1
        return out

    def _check_sequences(
        self,
        conn: sqlite3.Connection,
        topic: str,
        tid: int,
        planned: list[_Planned],
        seqs: list[int],
        last: dict[int, int],
        hdr: dict[str, str] | None,
    ) -> tuple[list[int], dict[int, int]]:
        """Split a send into records to write and duplicates (index -> stored offset),
        or refuse it whole. See the class docstring for the rules."""
        new: list[int] = []
        older: dict[int, list[int]] = {}
        expected = {p: n + 1 for p, n in last.items()}
        prev: dict[int, int] = {}
        for i, ((p, *_), seq) in enumerate(zip(planned, seqs, strict=True)):
            if seq < 0 or (p in prev and seq <= prev[p]):
                raise OutOfOrderSequenceError(
                    f"sequence {seq} of producer '{self.producer_id}' on {topic}[{p}] "
                    + ("is negative" if seq < 0 else f"follows {prev[p]} in the same send")
                    + ": sequences start at 0 and increase within a partition. Nothing of "
                    "this send was written"
                )
            prev[p] = seq
            if seq <= last[p]:
                older.setdefault(p, []).append(i)
            elif seq == expected[p]:
                new.append(i)
                expected[p] += 1
            else:
                raise OutOfOrderSequenceError(
                    f"sequence {seq} of producer '{self.producer_id}' on {topic}[{p}] leaves "
                    f"a gap: the next one is {expected[p]}. "
                    "Nothing of this send was written. Operator action: send sequences in "
                    "order, or send without sequence= and let the store number the records"
                )
        dups: dict[int, int] = {}
        for p, idx in older.items():
            spans = conn.execute(
                "SELECT first_seq, last_seq, first_off FROM producer_batches "
                "WHERE producer_id=? AND topic_id=? AND part=? AND last_seq>=? "
                "ORDER BY last_seq",
                (self.producer_id, tid, p, seqs[idx[0]]),
            ).fetchall()
            for i in idx:
                dups[i] = self._stored_copy(topic, tid, planned[i], seqs[i], last[p], spans, hdr)
        return new, dups

    def _stored_copy(
        self,
        topic: str,
        tid: int,
        record: _Planned,
        seq: int,
        last: int,
        spans: list[tuple[int, int, int]],
        hdr: dict[str, str] | None,
    ) -> int:
        """The offset of the record stored under `seq`, which must equal `record`."""
        p, key, raw, eid = record
        where = f"sequence {seq} of producer '{self.producer_id}' on {topic}[{p}]"
        off = next((o + seq - f for f, lst, o in spans if f <= seq <= lst), None)
        if off is None:
            raise OutOfOrderSequenceError(
                f"{where} was used, and is older than the last {SEQUENCE_WINDOW} sequences "
                f"the store checks re-sends against (the last stored is {last}), so it "
                "cannot tell whether this is the same record. Nothing of this send was "
                "written. Operator action: send it without sequence= and with its id=, so "
                "that a dedupe step drops it if it was stored"
            )
        stored = None
        for base, cols in self._store.read_batches(tid, p, off, 1)[:1]:
            j = off - base
            stored = (cols.keys[j], cols.values[j], cols.ids[j], cols.header(j))
        if stored != (key, raw, eid, hdr):
            raise OutOfOrderSequenceError(
                f"{where} is already stored for a different record (offset {off}): a "
                "re-send must repeat the key, value, id and headers. Nothing of this send "
                "was written. Operator action: use the next sequence for a new record, or "
                "send without sequence="
            )
        return off


def _stored_last(conn: sqlite3.Connection, pid: str, tid: int, part: int) -> int:
    row = conn.execute(
        "SELECT last_seq FROM producer_seqs WHERE producer_id=? AND topic_id=? AND part=?",
        (pid, tid, part),
    ).fetchone()
    return -1 if row is None else int(row[0])


def _record_batches(
    conn: sqlite3.Connection,
    pid: str,
    tid: int,
    last: dict[int, int],
    cols: dict[int, Columns],
    firsts: dict[int, int],
) -> None:
    """Store each partition's new last sequence and where the new records landed, and
    forget spans that fell out of the window. The new records of a partition carry the
    numbers after `last`, in order, at consecutive offsets: one span per partition."""
    now = time.time()
    for p, c in cols.items():
        first_seq, new_last = last[p] + 1, last[p] + len(c)
        conn.execute(
            "INSERT INTO producer_seqs(producer_id, topic_id, part, last_seq, updated) "
            "VALUES(?,?,?,?,?) ON CONFLICT(producer_id, topic_id, part) "
            "DO UPDATE SET last_seq=excluded.last_seq, updated=excluded.updated",
            (pid, tid, p, new_last, now),
        )
        conn.execute(
            "INSERT INTO producer_batches(producer_id, topic_id, part, last_seq, first_seq, "
            "first_off) VALUES(?,?,?,?,?,?)",
            (pid, tid, p, new_last, first_seq, firsts[p]),
        )
        conn.execute(
            "DELETE FROM producer_batches WHERE producer_id=? AND topic_id=? AND part=? "
            "AND last_seq<=?",
            (pid, tid, p, new_last - SEQUENCE_WINDOW),
        )

"""The embedded backend: what one App process does against the SQLite store.

The commit protocol itself lives in `_checkpoint.py`; this module supplies the store
operations it is made of, behind the seam of `_backend.py` that Kafka implements too.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import msgspec

from ._backend import (
    TP,
    DedupRow,
    PartKey,
    RebalanceListener,
    SessionOptions,
    StateRow,
)
from ._dataflow import topology_problems
from ._errors import FencedError, StoreError, TopologyError
from ._records import Columns, Record
from ._runtime import Batch
from ._sqlite import SQLiteStore, partition_for, store_path

if TYPE_CHECKING:
    from ._backend import Backend, ConsumerClient, ProducerClient, Session, Transaction
    from ._effect_journal import Journal


class EmbeddedBackend:
    """A SQLite file: one process holds every partition, under leases."""

    name = "embedded"
    has_sql_store = True
    several_workers = False

    def __init__(self, url: str) -> None:
        self.url = url
        self.path = store_path(url)

    def session(self, options: SessionOptions) -> EmbeddedSession:
        return EmbeddedSession(SQLiteStore(self.path), options.app, options.owner)

    def producer(self, producer_id: str, partitions: int) -> ProducerClient:
        from ._producer import EmbeddedProducer

        return EmbeddedProducer(SQLiteStore(self.path), producer_id, partitions)

    def consumer(self, group: str, topics: Sequence[str], start: str) -> ConsumerClient:
        from ._consumer import EmbeddedConsumer

        return EmbeddedConsumer(SQLiteStore(self.path), group, topics, start)

    def committed_records(self, topic: str) -> list[Record]:
        st = SQLiteStore(self.path)
        try:
            return [
                rec
                for part in st.end_offsets(topic)
                for rec in st.read_records(topic, part, 0, 1 << 62)
            ]
        finally:
            st.close()

    def committed_state(
        self, app: str, step_topics: dict[str, str]
    ) -> tuple[dict[tuple[str, int, str], bytes], set[tuple[str, int, str]]]:
        """The committed state rows and dedup ids of `app`'s steps."""
        st = SQLiteStore(self.path)
        state: dict[tuple[str, int, str], bytes] = {}
        ids: set[tuple[str, int, str]] = set()
        try:
            with st.lock:
                for step, part, key, value in st.conn.execute(
                    "SELECT step, part, key, value FROM state WHERE app=?", (app,)
                ):
                    state[(step, part, key)] = value
                for step, part, bid in st.conn.execute(
                    "SELECT step, part, id FROM dedup WHERE app=?", (app,)
                ):
                    ids.add((step, part, bid))
        finally:
            st.close()
        return state, ids


class EmbeddedTransaction:
    """The store's write transaction (BEGIN IMMEDIATE), fenced by the leases in 3b."""

    def __init__(self, session: EmbeddedSession, conn: sqlite3.Connection) -> None:
        self.session = session
        self.sql: sqlite3.Connection | None = conn
        self._conn = conn

    def check_fence(self) -> None:
        self.session.check_fence(self._conn)

    def write_outputs(self, outputs: dict[TP, Columns]) -> None:
        self.session.write_outputs(self._conn, outputs)

    def write_state(self, step: str, rows: list[StateRow]) -> None:
        self.session.write_state(self._conn, step, rows)

    def write_dedup(self, step: str, rows: list[DedupRow]) -> None:
        self.session.write_dedup(self._conn, step, rows)

    def purge_dedup(self, step: str, ttl: float | None, max_keys: int | None) -> int:
        return self.session.purge_dedup(self._conn, step, ttl, max_keys)

    def write_positions(self, positions: dict[TP, int]) -> None:
        self.session.write_positions(self._conn, positions)

    def commit(self) -> None:
        self.session.commit(self._conn)

    def rollback(self) -> None:
        self.session.rollback(self._conn)


class EmbeddedSession:
    """One App process's hold on the store: its leases, positions, state and commits."""

    def __init__(self, store: SQLiteStore, app: str, owner: str) -> None:
        self.store = store
        self.conn = store.conn
        self.app = app
        self.owner = owner
        self.leases: dict[tuple[int, int], int] = {}
        self.assigned: list[tuple[str, int, int]] = []  # (topic, topic id, partition)
        self._leftover: dict[tuple[int, int], tuple[int, Columns]] = {}
        # Per partition, the offset a sink recorded as done (the store was restored from
        # a backup older than the sink's database, say): never read below it.
        self.floors: dict[TP, int] = {}

    @property
    def sql_store(self) -> SQLiteStore | None:
        return self.store

    # -- start ----------------------------------------------------------------------

    def ensure_topics(self, topics: dict[str, int]) -> None:
        for name, partitions in topics.items():
            self.store.ensure_topic(name, partitions)

    def check_topology(self, sig: list[list[str]], reset_hint: str, config: dict[str, Any]) -> None:
        """Refuse to run a changed set of stateful steps over state written by another.

        `config` (dead-letter topic, dedup retention) is recorded for `onceflow status`;
        unlike the steps, it may change between runs.
        """
        text = json.dumps(sig)
        cfg = json.dumps(config, sort_keys=True)
        with self.store.transaction() as conn:
            row = conn.execute("SELECT topology FROM apps WHERE app=?", (self.app,)).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO apps(app, topology, config, commits) VALUES(?,?,?,0)",
                    (self.app, text, cfg),
                )
                return
            if row[0] == text:
                conn.execute("UPDATE apps SET config=? WHERE app=?", (cfg, self.app))
                return
            problems = topology_problems(json.loads(row[0]), sig)
            raise TopologyError(
                f"app '{self.app}' changed its stateful steps over existing state: "
                + "; ".join(problems)
                + f". Operator action: restore the previous pipeline, or drop the app's "
                f"state and offsets with `{reset_hint}` to reprocess from the start"
            )

    def acquire(self, sources: Iterable[str], listener: RebalanceListener) -> None:
        """Take every partition of the sources, raising its lease epoch, then tell the
        listener, once: this process holds them all until it stops.

        A process that held them before (a paused zombie, the previous incarnation)
        still has the old epoch and fails the check inside its next commit.
        """
        now = time.time()
        assigned = []
        with self.store.transaction() as conn:
            for topic in sources:
                found = self.store.topic(topic)
                assert found is not None
                tid, nparts = found
                for part in range(nparts):
                    row = conn.execute(
                        "SELECT epoch FROM leases WHERE app=? AND topic_id=? AND part=?",
                        (self.app, tid, part),
                    ).fetchone()
                    epoch = 1 if row is None else row[0] + 1
                    conn.execute(
                        "INSERT INTO leases(app, topic_id, part, epoch, owner, acquired) "
                        "VALUES(?,?,?,?,?,?) ON CONFLICT(app, topic_id, part) DO UPDATE SET "
                        "epoch=excluded.epoch, owner=excluded.owner, acquired=excluded.acquired",
                        (self.app, tid, part, epoch, self.owner, now),
                    )
                    self.leases[(tid, part)] = epoch
                    assigned.append((topic, tid, part))
        self.assigned = assigned
        # Under the store's lock, as the sinks' recovery was before the seam: no other
        # thread of this process writes to the store while they recover.
        with self.store.lock:
            self.floors = listener.assigned([(t, p) for t, _, p in assigned])

    def committed_positions(self) -> dict[tuple[str, int], int]:
        committed = self.committed_of((t, p) for t, _, p in self.assigned)
        return {tp: max(off, self.floors.get(tp, 0)) for tp, off in committed.items()}

    def committed_of(self, parts: Iterable[TP]) -> dict[TP, int]:
        """The committed offsets of any partitions of the app, -1 where none."""
        out = {}
        with self.store.lock:
            for topic, part in parts:
                found = self.store.topic(topic)
                row = (
                    None
                    if found is None
                    else self.conn.execute(
                        "SELECT next_offset FROM group_offsets "
                        "WHERE grp=? AND topic_id=? AND part=?",
                        (self.app, found[0], part),
                    ).fetchone()
                )
                out[(topic, part)] = -1 if row is None else row[0]
        return out

    # -- reading --------------------------------------------------------------------

    def poll(self, positions: dict[tuple[str, int], int], max_records: int) -> list[Batch]:
        """Committed input records from the positions, grouped per source topic.

        At most `max_records`: a stored batch cut short is kept decoded for the next poll
        rather than read and decoded again.
        """
        by_topic: dict[str, Batch] = {}
        per_part = max(1, max_records // max(1, len(self.assigned)))
        total = 0
        for topic, tid, part in self.assigned:
            if total >= max_records:
                break
            pos = positions[(topic, part)]
            want = min(per_part, max_records - total)
            runs: list[tuple[int, Columns]] = []
            left = self._leftover.pop((tid, part), None)
            if left is not None and left[0] == pos:
                runs.append(left)
                if len(left[1]) < want:
                    runs.extend(
                        self.store.read_batches(tid, part, pos + len(left[1]), want - len(left[1]))
                    )
            else:
                runs.extend(self.store.read_batches(tid, part, pos, want))
            got = 0
            for base, cols in runs:
                if got >= want:
                    break
                n = len(cols)
                if got + n > want:
                    cut = want - got
                    self._leftover[(tid, part)] = (base + cut, cols.slice(cut, n))
                    cols, n = cols.slice(0, cut), cut
                got += n
                b = by_topic.get(topic)
                if b is None:
                    b = by_topic[topic] = Batch(topic, [], [], [], [], [], [])
                b.parts.extend([part] * n)
                b.offs.extend(range(base, base + n))
                b.keys.extend(cols.keys)
                b.raws.extend(cols.values)
                b.tss.extend(cols.tss)
                b.ids.extend(cols.ids)
            total += got
        return list(by_topic.values())

    def wait_for_data(self, timeout: float, stop: threading.Event) -> None:
        """Sleep until another connection commits (new input, probably) or `timeout`.

        `PRAGMA data_version` changes when any other connection commits, and costs far
        less than a poll, so an idle App notices new records within a millisecond.
        """
        deadline = time.monotonic() + timeout
        with self.store.lock:
            (start,) = self.conn.execute("PRAGMA data_version").fetchone()
        while time.monotonic() < deadline and not stop.is_set():
            time.sleep(0.001)
            with self.store.lock:
                (now,) = self.conn.execute("PRAGMA data_version").fetchone()
            if now != start:
                return

    def partitions_of(self, topic: str) -> int:
        found = self.store.topic(topic)
        if found is None:
            raise StoreError(f"topic '{topic}' is not in the store")
        return found[1]

    def load_state(self, step: str, pks: list[PartKey]) -> dict[PartKey, Any]:
        out: dict[PartKey, Any] = {}
        with self.store.lock:
            for part, keys in _group(pks).items():
                for chunk in _chunks(keys, 500):
                    marks = ",".join("?" * len(chunk))
                    for key, value in self.conn.execute(
                        f"SELECT key, value FROM state WHERE app=? AND step=? AND part=? "
                        f"AND key IN ({marks})",
                        (self.app, step, part, *chunk),
                    ):
                        out[(part, key)] = msgspec.msgpack.decode(value)
        return out

    def load_dedup(self, step: str, pks: list[PartKey]) -> dict[PartKey, Any]:
        out: dict[PartKey, Any] = {}
        with self.store.lock:
            for part, ids in _group(pks).items():
                for chunk in _chunks(ids, 500):
                    marks = ",".join("?" * len(chunk))
                    for bid, seen, outcome in self.conn.execute(
                        f"SELECT id, seen, outcome FROM dedup WHERE app=? AND step=? AND part=? "
                        f"AND id IN ({marks})",
                        (self.app, step, part, *chunk),
                    ):
                        out[(part, bid)] = (seen, outcome)
        return out

    # -- the commit's operations (called by Checkpoint, in its order) ---------------

    def transaction(self) -> EmbeddedTransaction:
        return EmbeddedTransaction(self, self.begin())

    def begin(self) -> sqlite3.Connection:
        self.store.lock.acquire()
        try:
            from ._sqlite import _retry_locked

            _retry_locked(lambda: self.conn.execute("BEGIN IMMEDIATE"))
        except BaseException:
            self.store.lock.release()
            raise
        return self.conn

    def check_fence(self, conn: sqlite3.Connection) -> None:
        rows = conn.execute(
            "SELECT topic_id, part, epoch, owner FROM leases WHERE app=?", (self.app,)
        ).fetchall()
        current = {(r[0], r[1]): (r[2], r[3]) for r in rows}
        for tp, epoch in self.leases.items():
            now_epoch, owner = current.get(tp, (None, None))
            if now_epoch != epoch:
                if now_epoch is None:
                    raise FencedError(
                        f"app '{self.app}': the lease of partition {tp[1]} of topic id {tp[0]} "
                        "is gone (was the app reset?); this process stops without committing"
                    )
                raise FencedError(
                    f"app '{self.app}': partition {tp[1]} of topic id {tp[0]} now has lease "
                    f"epoch {now_epoch} (owner {owner}), this process holds epoch {epoch}. "
                    "Another process took over; this one stops without committing"
                )

    def write_outputs(
        self, conn: sqlite3.Connection, outputs: dict[tuple[str, int], Columns]
    ) -> None:
        for (topic, part), cols in outputs.items():
            found = self.store.topic(topic)
            if found is None:
                raise StoreError(f"output topic '{topic}' vanished from the store")
            self.store.append(conn, found[0], part, cols)

    def write_state(self, conn: sqlite3.Connection, step: str, rows: list[StateRow]) -> None:
        puts = [(self.app, step, p, k, v) for p, k, v in rows if v is not None]
        dels = [(self.app, step, p, k) for p, k, v in rows if v is None]
        if puts:
            conn.executemany(
                "INSERT INTO state(app, step, part, key, value) VALUES(?,?,?,?,?) "
                "ON CONFLICT(app, step, part, key) DO UPDATE SET value=excluded.value",
                puts,
            )
        if dels:
            conn.executemany("DELETE FROM state WHERE app=? AND step=? AND part=? AND key=?", dels)

    def write_dedup(
        self,
        conn: sqlite3.Connection,
        step: str,
        rows: list[DedupRow],
    ) -> None:
        conn.executemany(
            "INSERT INTO dedup(app, step, part, id, seen, outcome) VALUES(?,?,?,?,?,?) "
            "ON CONFLICT(app, step, part, id) DO UPDATE SET seen=excluded.seen, "
            "outcome=excluded.outcome",
            [(self.app, step, p, i, s, o) for p, i, s, o in rows],
        )

    def purge_dedup(
        self, conn: sqlite3.Connection, step: str, ttl: float | None, max_keys: int | None
    ) -> int:
        """Apply a dedupe step's retention; returns how many ids were forgotten."""
        n = 0
        if ttl is not None:
            n += conn.execute(
                "DELETE FROM dedup WHERE app=? AND step=? AND seen<?",
                (self.app, step, time.time() - ttl),
            ).rowcount
        if max_keys is not None:
            # Ids of one batch share a timestamp; cutting strictly below the newest
            # max_keys-th keeps ties, so retention never drops below max_keys.
            row = conn.execute(
                "SELECT seen FROM dedup WHERE app=? AND step=? ORDER BY seen DESC LIMIT 1 OFFSET ?",
                (self.app, step, max_keys - 1),
            ).fetchone()
            if row is not None:
                n += conn.execute(
                    "DELETE FROM dedup WHERE app=? AND step=? AND seen<?",
                    (self.app, step, row[0]),
                ).rowcount
        return n

    def write_positions(
        self, conn: sqlite3.Connection, positions: dict[tuple[str, int], int]
    ) -> None:
        rows = []
        for (topic, part), off in positions.items():
            found = self.store.topic(topic)
            assert found is not None
            rows.append((found[0], part, off))
        self.store.write_offsets(conn, self.app, rows)
        conn.execute(
            "UPDATE apps SET commits=commits+1, last_commit=? WHERE app=?",
            (time.time(), self.app),
        )

    def commit(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("COMMIT")
        finally:
            self.store.lock.release()

    def rollback(self, conn: sqlite3.Connection) -> None:
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        finally:
            self.store.lock.release()

    def fence_token(self) -> int:
        """This process's epoch for external sinks: every start raises every lease epoch."""
        return max(self.leases.values(), default=0)

    def commit_offsets(self, positions: dict[TP, int]) -> None:
        """At-least-once: the offsets in a transaction of their own, after the epoch's."""
        txn = self.transaction()
        try:
            txn.write_positions(positions)
            txn.commit()
        except BaseException:
            txn.rollback()
            raise

    def after_commit(self) -> None:
        """Nothing to catch up: the store itself is the state."""

    def is_transient(self, exc: BaseException) -> bool:
        """SQLite's passing states are OperationalErrors, which `is_outage` knows."""
        return False

    def effect_journal(
        self,
        app: str,
        sink: str,
        dead_letter_topic: str,
        fenced: Callable[[str], AbstractContextManager[sqlite3.Connection]],
    ) -> Journal:
        from ._effect_journal import SQLiteJournal

        return SQLiteJournal(fenced, app, sink, self.store, dead_letter_topic)

    def rewind(self) -> dict[tuple[str, int], int]:
        self._leftover.clear()
        return self.committed_positions()

    def idle(self) -> bool:
        """An empty poll of the log means every source is drained."""
        return True

    def close(self) -> None:
        self.store.close()

    def partition_for(self, key: str | None, partitions: int, fallback: int) -> int:
        return partition_for(key, partitions, fallback)

    def outcome_of(self, positions: dict[tuple[str, int], int]) -> bool:
        """After a COMMIT that raised: did it land? The committed offsets tell."""
        committed = self.committed_of(positions)
        return all(committed.get(tp) == off for tp, off in positions.items())


def _group(pks: list[PartKey]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for part, key in pks:
        out.setdefault(part, []).append(key)
    return out


def _chunks(items: list[str], n: int) -> Iterable[list[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


if TYPE_CHECKING:
    # The seam, checked by mypy: each class is what the App and the sinks ask for.
    _b: Backend = EmbeddedBackend("")
    _s: Session = EmbeddedSession.__new__(EmbeddedSession)
    _t: Transaction = EmbeddedTransaction.__new__(EmbeddedTransaction)

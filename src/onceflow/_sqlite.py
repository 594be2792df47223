"""The embedded log: one SQLite file holds topics, records, offsets, state and leases.

Every write runs in `BEGIN IMMEDIATE`, so two writers never both hold a read snapshot and
then deadlock upgrading it; readers never block writers under WAL. `synchronous=FULL`
makes a commit durable when COMMIT returns, which is what "acknowledged" means here.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import msgspec

from ._errors import ConfigError, StoreError
from ._records import Columns, Record

SCHEMA_VERSION = "3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS topics(
    id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL,
    partitions INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS partitions(
    topic_id INTEGER NOT NULL, part INTEGER NOT NULL, next_offset INTEGER NOT NULL,
    PRIMARY KEY(topic_id, part)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS records(
    topic_id INTEGER NOT NULL, part INTEGER NOT NULL, base_off INTEGER NOT NULL,
    last_off INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY(topic_id, part, last_off));
CREATE TABLE IF NOT EXISTS producer_seqs(
    producer_id TEXT NOT NULL, topic_id INTEGER NOT NULL, part INTEGER NOT NULL,
    last_seq INTEGER NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY(producer_id, topic_id, part)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_offsets(
    grp TEXT NOT NULL, topic_id INTEGER NOT NULL, part INTEGER NOT NULL,
    next_offset INTEGER NOT NULL, committed REAL NOT NULL,
    PRIMARY KEY(grp, topic_id, part)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state(
    app TEXT NOT NULL, step TEXT NOT NULL, part INTEGER NOT NULL, key TEXT NOT NULL,
    value BLOB NOT NULL, PRIMARY KEY(app, step, part, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dedup(
    app TEXT NOT NULL, step TEXT NOT NULL, part INTEGER NOT NULL, id TEXT NOT NULL,
    seen REAL NOT NULL, outcome BLOB, PRIMARY KEY(app, step, part, id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedup_by_age ON dedup(app, step, seen);
CREATE TABLE IF NOT EXISTS leases(
    app TEXT NOT NULL, topic_id INTEGER NOT NULL, part INTEGER NOT NULL,
    epoch INTEGER NOT NULL, owner TEXT NOT NULL, acquired REAL NOT NULL,
    PRIMARY KEY(app, topic_id, part)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS apps(
    app TEXT PRIMARY KEY, topology TEXT NOT NULL, config TEXT NOT NULL DEFAULT '{}',
    commits INTEGER NOT NULL, last_commit REAL);
CREATE TABLE IF NOT EXISTS outbox(
    app TEXT NOT NULL, sink TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY(app, sink, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sink_progress(
    app TEXT NOT NULL, sink TEXT NOT NULL, next_seq INTEGER NOT NULL,
    flushed_seq INTEGER NOT NULL, position INTEGER NOT NULL,
    PRIMARY KEY(app, sink)) WITHOUT ROWID;
"""

# Producer sessions (one epoch per producer id; opening a Producer raises it, and every
# send checks it in its own transaction) and where each producer's recent sequence
# numbers landed, so that a re-sent sequence is checked against the record stored under
# it. Kept apart from _SCHEMA because a store made before they existed gets them when a
# Producer first opens it (see ensure_producer_tables).
PRODUCER_TABLES = """
CREATE TABLE IF NOT EXISTS producer_sessions(
    producer_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL, opened REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS producer_batches(
    producer_id TEXT NOT NULL, topic_id INTEGER NOT NULL, part INTEGER NOT NULL,
    last_seq INTEGER NOT NULL, first_seq INTEGER NOT NULL, first_off INTEGER NOT NULL,
    PRIMARY KEY(producer_id, topic_id, part, last_seq)) WITHOUT ROWID;
"""

_batch_enc = msgspec.msgpack.Encoder()
_batch_dec = msgspec.msgpack.Decoder(
    tuple[
        list[str | None],
        list[bytes],
        list[dict[str, str] | None] | None,
        list[float],
        list[str | None],
    ]
)

# Records per stored batch row. Bigger rows mean fewer rows to write and read; smaller
# ones mean less decoding wasted when a reader starts in the middle of one.
BATCH_RECORDS = 2048

T = TypeVar("T")

# A writer waits this long for another process's transaction before giving up. Epochs
# are short (the commit interval), so a wait this long means a stuck process, not load.
BUSY_TIMEOUT_S = 60.0


def store_path(store: str | os.PathLike[str]) -> str:
    """Turn an `App(store=...)` value for the embedded backend into a file path."""
    s = os.fspath(store)
    if s.startswith("sqlite:///"):
        s = s[len("sqlite:///") :]
    elif s.startswith("sqlite://"):
        s = s[len("sqlite://") :]
    elif "://" in s:
        raise ConfigError(f"store '{s}' is not an embedded store path (expected a file path)")
    if not s:
        raise ConfigError("store path is empty; give a file path such as 'onceflow.db'")
    return s


def partition_for(key: str | None, partitions: int, fallback: int) -> int:
    """Stable key partitioning: the same key always lands on the same partition."""
    if key is None:
        return fallback % partitions
    return zlib.crc32(key.encode()) % partitions


def encode_batch(cols: Columns) -> bytes:
    return _batch_enc.encode((cols.keys, cols.values, cols.headers, cols.tss, cols.ids))


def decode_batch(raw: bytes) -> Columns:
    keys, values, headers, tss, ids = _batch_dec.decode(raw)
    return Columns(keys, values, headers, tss, ids)


def connect(path: str) -> sqlite3.Connection:
    """Open the store with the settings every process must share."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConfigError(f"store directory '{directory}' does not exist; create it first")
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )
    _retry_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA cache_size=-65536")
    conn.execute("PRAGMA temp_store=MEMORY")
    # Opening a store must not wait for a writer, so the schema is only created (in one
    # transaction, never half-built) when it is not there yet.
    has_meta = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
    ).fetchone()
    if not has_meta:
        with _txn(conn):
            for stmt in (_SCHEMA + PRODUCER_TABLES).split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES('schema_version', ?)",
                (SCHEMA_VERSION,),
            )
    row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    if row[0] != SCHEMA_VERSION:
        raise StoreError(
            f"store '{path}' has schema version {row[0]}, this onceflow writes {SCHEMA_VERSION}; "
            "operator action: use the onceflow version that created it"
        )
    return conn


def ensure_producer_tables(conn: sqlite3.Connection) -> None:
    """Inside a write transaction: add the producer session tables to a store created
    by an onceflow that did not have them (its data and schema version stay valid)."""
    have = {
        r[0]
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' "
            "AND name IN ('producer_sessions', 'producer_batches')"
        )
    }
    if len(have) < 2:
        for stmt in PRODUCER_TABLES.split(";"):
            if stmt.strip():
                conn.execute(stmt)


def _retry_locked(fn: Callable[[], T]) -> T:
    """Retry an operation that SQLite refused with SQLITE_BUSY despite the busy timeout.

    WAL mode changes and checkpoints can report busy without calling the busy handler;
    those are transient under normal concurrency and must not reach a user.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    delay = 0.005
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            msg = str(exc)
            if "locked" not in msg and "busy" not in msg:
                raise
            if time.monotonic() > deadline:
                raise StoreError(
                    f"the store stayed locked for {BUSY_TIMEOUT_S:.0f}s ({msg}); "
                    "operator action: look for a stuck process holding a write transaction"
                ) from exc
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 0.2)


@contextmanager
def _txn(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction. BEGIN IMMEDIATE takes the write lock up front."""
    _retry_locked(lambda: conn.execute("BEGIN IMMEDIATE"))
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class SQLiteStore:
    """Low-level access to one store file, shared by producers, consumers, apps and the CLI.

    A store object belongs to one process and may be used from several threads; a lock
    serializes them because a sqlite3 connection is not safe for concurrent use.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = store_path(path)
        self.conn = connect(self.path)
        self.lock = threading.RLock()
        self._topics: dict[str, tuple[int, int]] = {}

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self.lock, _txn(self.conn) as conn:
            yield conn

    # -- topics ---------------------------------------------------------------------

    def topic(self, name: str) -> tuple[int, int] | None:
        """(topic id, partition count), or None when the topic does not exist."""
        hit = self._topics.get(name)
        if hit is not None:
            return hit
        with self.lock:
            row = self.conn.execute(
                "SELECT id, partitions FROM topics WHERE name=?", (name,)
            ).fetchone()
        if row is None:
            return None
        self._topics[name] = (row[0], row[1])
        return self._topics[name]

    def ensure_topic(self, name: str, partitions: int) -> tuple[int, int]:
        """Create the topic if missing; an existing topic keeps its partition count."""
        validate_topic_name(name)
        if partitions < 1:
            raise ConfigError(f"topic '{name}': partitions must be at least 1, got {partitions}")
        found = self.topic(name)
        if found is not None:
            return found
        with self.transaction() as conn:
            row = conn.execute("SELECT id, partitions FROM topics WHERE name=?", (name,)).fetchone()
            if row is None:
                cur = conn.execute(
                    "INSERT INTO topics(name, partitions, created) VALUES(?,?,?)",
                    (name, partitions, time.time()),
                )
                tid = cur.lastrowid
                assert tid is not None
                conn.executemany(
                    "INSERT INTO partitions(topic_id, part, next_offset) VALUES(?,?,0)",
                    [(tid, p) for p in range(partitions)],
                )
                row = (tid, partitions)
        self._topics[name] = (row[0], row[1])
        return self._topics[name]

    def topics(self) -> list[tuple[str, int, int]]:
        """(name, partitions, records held) for every topic."""
        with self.lock:
            return [
                (r[0], r[1], r[2])
                for r in self.conn.execute(
                    "SELECT t.name, t.partitions, COALESCE(SUM(p.next_offset), 0) "
                    "FROM topics t LEFT JOIN partitions p ON p.topic_id=t.id "
                    "GROUP BY t.id ORDER BY t.name"
                )
            ]

    def end_offsets(self, topic: str) -> dict[int, int]:
        found = self.topic(topic)
        if found is None:
            return {}
        with self.lock:
            return dict(
                self.conn.execute(
                    "SELECT part, next_offset FROM partitions WHERE topic_id=?", (found[0],)
                ).fetchall()
            )

    # -- records --------------------------------------------------------------------

    def read_batches(
        self, topic_id: int, partition: int, offset: int, max_records: int
    ) -> list[tuple[int, Columns]]:
        """Committed records of one partition from `offset` on, as (first offset, columns).

        Whole stored batches are returned (the first one cut at `offset`), stopping once
        `max_records` are reached, so no batch is decoded twice by a reader that keeps up.
        """
        out: list[tuple[int, Columns]] = []
        n = 0
        with self.lock:
            cur = self.conn.execute(
                "SELECT base_off, data FROM records WHERE topic_id=? AND part=? AND last_off>=? "
                "ORDER BY last_off",
                (topic_id, partition, offset),
            )
            for base, data in cur:
                cols = decode_batch(data)
                if base < offset:
                    cols = cols.slice(offset - base, len(cols))
                    base = offset
                out.append((base, cols))
                n += len(cols)
                if n >= max_records:
                    break
            cur.close()
        return out

    def read_records(self, topic: str, partition: int, offset: int, limit: int) -> list[Record]:
        found = self.topic(topic)
        if found is None:
            return []
        out: list[Record] = []
        for base, cols in self.read_batches(found[0], partition, offset, limit):
            for i in range(len(cols)):
                out.append(
                    Record(
                        topic,
                        partition,
                        base + i,
                        cols.keys[i],
                        cols.values[i],
                        cols.header(i),
                        cols.tss[i],
                        cols.ids[i],
                    )
                )
        return out[:limit]

    def append(self, conn: sqlite3.Connection, topic_id: int, partition: int, cols: Columns) -> int:
        """Append records to a partition inside an open write transaction.

        Offsets stay dense because the next offset is read and written in the same write
        transaction. Returns the offset of the first record.
        """
        (nxt,) = conn.execute(
            "SELECT next_offset FROM partitions WHERE topic_id=? AND part=?", (topic_id, partition)
        ).fetchone()
        n = len(cols)
        if n == 0:
            return int(nxt)
        rows = []
        for start in range(0, n, BATCH_RECORDS):
            stop = min(n, start + BATCH_RECORDS)
            chunk = cols if (start, stop) == (0, n) else cols.slice(start, stop)
            rows.append((topic_id, partition, nxt + start, nxt + stop - 1, encode_batch(chunk)))
        conn.executemany(
            "INSERT INTO records(topic_id, part, base_off, last_off, data) VALUES(?,?,?,?,?)",
            rows,
        )
        conn.execute(
            "UPDATE partitions SET next_offset=? WHERE topic_id=? AND part=?",
            (nxt + n, topic_id, partition),
        )
        return int(nxt)

    # -- consumer groups ------------------------------------------------------------

    def committed(self, group: str, topic: str) -> dict[int, int]:
        found = self.topic(topic)
        if found is None:
            return {}
        with self.lock:
            return dict(
                self.conn.execute(
                    "SELECT part, next_offset FROM group_offsets WHERE grp=? AND topic_id=?",
                    (group, found[0]),
                ).fetchall()
            )

    def groups(self) -> list[str]:
        with self.lock:
            return [
                r[0] for r in self.conn.execute("SELECT DISTINCT grp FROM group_offsets ORDER BY 1")
            ]

    def write_offsets(
        self, conn: sqlite3.Connection, group: str, offsets: Iterable[tuple[int, int, int]]
    ) -> None:
        """Store (topic id, partition, next offset) for a group; offsets only move forward."""
        now = time.time()
        for tid, part, nxt in offsets:
            row = conn.execute(
                "SELECT next_offset FROM group_offsets WHERE grp=? AND topic_id=? AND part=?",
                (group, tid, part),
            ).fetchone()
            if row is not None and row[0] > nxt:
                raise StoreError(
                    f"group '{group}' would move partition {part} of topic id {tid} back "
                    f"from {row[0]} to {nxt}; refusing (another process committed ahead)"
                )
            conn.execute(
                "INSERT INTO group_offsets(grp, topic_id, part, next_offset, committed) "
                "VALUES(?,?,?,?,?) ON CONFLICT(grp, topic_id, part) "
                "DO UPDATE SET next_offset=excluded.next_offset, committed=excluded.committed",
                (group, tid, part, nxt, now),
            )


_TOPIC_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def validate_topic_name(name: str) -> None:
    """Topic names follow Kafka's rule, so a pipeline moves between backends unchanged."""
    if not name or len(name) > 249 or not set(name) <= _TOPIC_OK or name in (".", ".."):
        raise ConfigError(f"invalid topic name {name!r}: use 1-249 characters from [a-zA-Z0-9._-]")


def loads_any(raw: bytes | None) -> Any:
    return None if raw is None else msgspec.msgpack.decode(raw)

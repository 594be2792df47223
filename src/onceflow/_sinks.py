"""Sinks and their declared guarantees.

- transactional: written inside the epoch's own transaction (topics, `SQLiteTableSink`).
- idempotent: the epoch's rows are committed to an outbox with the epoch, delivered
  after the commit at a recorded position, and re-delivered at that same position after
  a crash, so a delivery is never partial or doubled (`FileSink`).
- at-least-once: called before the commit and again if the epoch replays
  (`CallbackSink`); an App with guarantee="exactly-once" refuses it when it is built.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ._errors import ConfigError, FencedError
from ._serde import encode_value

if TYPE_CHECKING:
    from ._backend import Session, Transaction
    from ._sqlite import SQLiteStore

Guarantee = Literal["transactional", "idempotent", "at-least-once"]
Row = tuple[Any, Any, tuple[str, int, int, int]]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def check_identifier(name: str, what: str) -> str:
    """Identifiers cannot be bound as parameters, so they are checked before quoting."""
    if not _IDENT.match(name):
        raise ConfigError(f"{what} {name!r} is not a plain identifier ([A-Za-z_][A-Za-z0-9_]*)")
    return f'"{name}"'


@dataclass(frozen=True)
class SinkContext:
    """What a sink is opened with, on any backend."""

    app: str
    # The backend's name (`_backend.BACKENDS`), for sinks that record which backend
    # owns their bookkeeping in another system.
    backend: str
    # The session this process holds its partitions through: every write of the sink
    # goes through its fenced transactions.
    session: Session
    # The fault injector of the protocol steps.
    crash: Callable[[str], None]
    # Whether the App is stopping: a sink waiting out an outage gives up then. None
    # when no App runs the sink, which then raises an outage at once.
    stopping: Callable[[], bool] | None
    dead_letter_topic: str


class Sink:
    """Base class. A sink receives `(key, value, row_id)` rows of one epoch.

    `row_id` is (source topic, partition, offset, output index): deterministic, so an
    idempotent sink can upsert by it.

    Its lifecycle, on every backend: `open(context)` once at start; then
    `partitions_assigned` before the App reads partitions this process just got (once,
    with every partition, on the embedded store) and `partitions_revoked` after it lost
    some; per epoch `prepare` (before the store's transaction), `write` (inside it) and
    `after_commit` or `abort`; `close` when the App stops.
    """

    guarantee: ClassVar[Guarantee] = "at-least-once"
    # Whether the sink writes into the embedded store's own tables (or outbox); such
    # sinks cannot run on a backend without them (Kafka), which `App.build` refuses.
    needs_store: ClassVar[bool] = True
    name: str = "sink"
    _context: SinkContext | None = None
    _crash: Callable[[str], None] = staticmethod(lambda point: None)
    _stopping: Callable[[], bool] | None = None

    def open(self, context: SinkContext) -> None:
        """Called once at start, before any partition is assigned. A subclass calls
        `super().open(context)` first."""
        self._context = context
        self._crash = context.crash
        self._stopping = context.stopping

    def _sql_store(self) -> SQLiteStore:
        """The embedded store, for a sink that keeps its rows in its tables."""
        ctx = self._context
        store = None if ctx is None else ctx.session.sql_store
        if store is None:
            raise AssertionError(f"sink '{self.name}' needs the embedded store, opened")
        return store

    @contextlib.contextmanager
    def fenced(self, what: str) -> Iterator[sqlite3.Connection]:
        """Embedded store: the one way a sink writes its own bookkeeping outside the
        epoch's transaction (a delivered position, an effect's outcome). A transaction
        of its own that first checks, inside itself, that this process still holds its
        leases: a paused process that resumes after a successor took over is refused
        here (`FencedError`) and writes nothing."""
        self._sql_store()
        assert self._context is not None
        txn = self._context.session.transaction()
        try:
            try:
                txn.check_fence()
            except FencedError as exc:
                raise FencedError(f"sink '{self.name}' cannot record {what}: {exc}") from exc
            yield sql_of(txn, self.name)
        except BaseException:
            txn.rollback()
            raise
        txn.commit()

    def retry_pending(self) -> None:
        """Called by the App loop while it has no input: work the sink left pending
        because a system was unreachable (effects not yet called, a prepared transaction
        not yet committed) is retried here, on the sink's own backoff schedule."""

    def partitions_assigned(self, parts: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """This process just got `parts`, before reading them: recover what is pending
        on them here. Returns the offsets the sink recorded as done where the App must
        not read below them (a store restored from an older backup, say)."""
        return {}

    def partitions_revoked(self, parts: list[tuple[str, int]]) -> None:
        """`parts` went to another process (their epoch was committed or dropped)."""

    def prepare(
        self, rows: Sequence[Row], positions: dict[tuple[str, int], int], fence: int
    ) -> None:
        """Called before the epoch's transaction opens: an external system's first phase."""

    def abort(self) -> None:
        """Called when the epoch did not commit, after `prepare`."""

    def write(self, txn: Transaction, rows: Sequence[Row]) -> None:
        """Called inside the epoch's transaction; `txn.sql` is the embedded store's
        connection in it (None on Kafka)."""

    def after_commit(self, rows: Sequence[Row]) -> None:
        """Called once the epoch is durable."""

    def close(self) -> None:
        """Called when the App stops."""


def sql_of(txn: Transaction, sink: str) -> sqlite3.Connection:
    """The store's connection in `txn`, for a sink that writes into the store's tables."""
    if txn.sql is None:
        raise AssertionError(f"sink '{sink}' writes SQL, and the backend has no SQL store")
    return txn.sql


class SQLiteTableSink(Sink):
    """Upserts dict values into a table of the store, in the epoch's own transaction.

    >>> sink = SQLiteTableSink("balances", key=["account"], columns=["account", "balance"])
    >>> stream.sink(sink)  # doctest: +SKIP
    """

    guarantee = "transactional"

    def __init__(
        self,
        table: str,
        *,
        key: Sequence[str],
        columns: Sequence[str],
        name: str | None = None,
    ) -> None:
        self.table = table
        self._qt = check_identifier(table, "table")
        if not key:
            raise ConfigError(f"SQLiteTableSink('{table}') needs key=[...] columns")
        self.columns = list(columns)
        self.key = list(key)
        for c in self.columns:
            check_identifier(c, "column")
        missing = [k for k in self.key if k not in self.columns]
        if missing:
            raise ConfigError(f"SQLiteTableSink('{table}'): key columns {missing} not in columns")
        self.name = name or f"table-{table}"
        cols = ", ".join(check_identifier(c, "column") for c in self.columns)
        keys = ", ".join(check_identifier(c, "column") for c in self.key)
        updates = ", ".join(
            f"{check_identifier(c, 'column')}=excluded.{check_identifier(c, 'column')}"
            for c in self.columns
            if c not in self.key
        )
        marks = ", ".join("?" for _ in self.columns)
        self._create = f"CREATE TABLE IF NOT EXISTS {self._qt} ({cols}, PRIMARY KEY({keys}))"
        conflict = f"DO UPDATE SET {updates}" if updates else "DO NOTHING"
        self._upsert = (
            f"INSERT INTO {self._qt} ({cols}) VALUES({marks}) ON CONFLICT({keys}) {conflict}"
        )

    def open(self, context: SinkContext) -> None:
        super().open(context)
        store = self._sql_store()
        with store.lock:
            store.conn.execute(self._create)
            have = {r[1] for r in store.conn.execute(f"PRAGMA table_info({self._qt})")}
        lacking = [c for c in self.columns if c not in have]
        if lacking:
            raise ConfigError(
                f"table '{self.table}' exists without columns {lacking}; "
                "operator action: add them or point the sink at another table"
            )

    def write(self, txn: Transaction, rows: Sequence[Row]) -> None:
        conn = sql_of(txn, self.name)
        cols = self.columns
        try:
            params = [tuple(v[c] for c in cols) for _, v, _ in rows]
        except (KeyError, TypeError) as exc:
            raise ConfigError(
                f"SQLiteTableSink('{self.table}') needs dict values with keys {cols}: {exc!r}"
            ) from exc
        conn.executemany(self._upsert, params)


class FileSink(Sink):
    """Appends one line per value (JSON unless bytes/str) to a file, exactly once.

    The epoch's lines are committed to the store's outbox with the epoch; after the
    commit they are written at the file position the store recorded and fsynced, and
    the new position is recorded. After a crash the file is cut back to the recorded
    position and the pending lines rewritten, so the file never keeps a partial or
    doubled line.

    A deliverer may be paused anywhere and resume after a successor delivered past it
    (a zombie). What keeps the file exact then:

    - The bytes of an epoch and their position are fixed once the epoch commits (the
      outbox row, and the position after the epochs before it), so whoever writes them
      writes the same bytes at the same offsets: a zombie's late write changes nothing.
    - Recording a delivery is fenced (the writer still holds its leases, checked in the
      same transaction) and a compare-and-set from the position the delivery started
      at, so a zombie records nothing and learns it was fenced (`FencedError`).
    - The file is only ever cut at `open`, inside a fenced store transaction: holding
      the store's write lock, no other process can take over or record a position
      until the cut is done, so the position it cuts to is the latest recorded one.
      Deliveries never cut, so a late one cannot remove lines delivered after it.
    """

    guarantee = "idempotent"

    def __init__(self, path: str | os.PathLike[str], *, name: str | None = None) -> None:
        self.path = os.fspath(path)
        self.name = name or f"file-{os.path.basename(self.path)}"
        self._app = ""

    def open(self, context: SinkContext) -> None:
        super().open(context)
        self._app = context.app

    def partitions_assigned(self, parts: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """With the leases taken: cut what a delivery left unfinished, deliver the rest."""
        with self.fenced("its start") as c:
            c.execute(
                "INSERT OR IGNORE INTO sink_progress(app, sink, next_seq, flushed_seq, "
                "position) VALUES(?,?,0,-1,0)",
                (self._app, self.name),
            )
            (pos,) = c.execute(
                "SELECT position FROM sink_progress WHERE app=? AND sink=?", (self._app, self.name)
            ).fetchone()
            # Whatever lies past the recorded position is a delivery that did not finish
            # (a crash, or a zombie's write of a pending epoch, rewritten below).
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                if os.fstat(fd).st_size > pos:
                    os.ftruncate(fd, pos)
                    os.fsync(fd)
            finally:
                os.close(fd)
        self._flush()
        return {}

    def write(self, txn: Transaction, rows: Sequence[Row]) -> None:
        conn = sql_of(txn, self.name)
        data = b"".join(encode_value(v).replace(b"\n", b"\\n") + b"\n" for _, v, _ in rows)
        (seq,) = conn.execute(
            "SELECT next_seq FROM sink_progress WHERE app=? AND sink=?", (self._app, self.name)
        ).fetchone()
        conn.execute(
            "INSERT INTO outbox(app, sink, seq, data) VALUES(?,?,?,?)",
            (self._app, self.name, seq, data),
        )
        conn.execute(
            "UPDATE sink_progress SET next_seq=? WHERE app=? AND sink=?",
            (seq + 1, self._app, self.name),
        )

    def after_commit(self, rows: Sequence[Row]) -> None:
        self._flush()

    def _flush(self) -> None:
        """Deliver every committed, undelivered epoch in order, at its recorded position."""
        # One snapshot: a position read before a successor's delivery and epochs read
        # after it would put an epoch's bytes at another one's offset. Its fence check
        # is not relied upon (the record below is fenced): it spares a zombie the
        # pointless rewrite of epochs its successor delivers.
        with self.fenced("what it delivers") as c:
            (flushed, pos) = c.execute(
                "SELECT flushed_seq, position FROM sink_progress WHERE app=? AND sink=?",
                (self._app, self.name),
            ).fetchone()
            pending = c.execute(
                "SELECT seq, data FROM outbox WHERE app=? AND sink=? ORDER BY seq",
                (self._app, self.name),
            ).fetchall()
        for seq, data in pending:
            self._write_at(pos, data)
            self._crash("sink_delivered")
            with self.fenced(f"the delivery of its epoch {seq}") as c:
                done = c.execute(
                    "UPDATE sink_progress SET flushed_seq=?, position=? WHERE app=? AND sink=? "
                    "AND flushed_seq=? AND position=?",
                    (seq, pos + len(data), self._app, self.name, flushed, pos),
                ).rowcount
                if done != 1:
                    raise FencedError(
                        f"FileSink '{self.name}': another process recorded a delivery past "
                        f"position {pos} of {self.path}; this one stops without recording"
                    )
                c.execute(
                    "DELETE FROM outbox WHERE app=? AND sink=? AND seq=?",
                    (self._app, self.name, seq),
                )
            flushed, pos = seq, pos + len(data)

    def _write_at(self, pos: int, data: bytes) -> None:
        """The epoch's bytes at their offset, then fsync. Never a cut: see the class."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            half = len(data) // 2
            _pwrite_all(fd, data[:half], pos)
            self._crash("sink_flush")
            _pwrite_all(fd, data[half:], pos + half)
            os.fsync(fd)
        finally:
            os.close(fd)


def _pwrite_all(fd: int, data: bytes, pos: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n


class CallbackSink(Sink):
    """Calls `fn(key, value)` for each row inside the epoch, before its commit.

    At-least-once: if the commit then fails, the epoch is replayed and `fn` runs again
    for the same rows. Use it with guarantee="at-least-once" only.
    """

    guarantee = "at-least-once"
    needs_store = False

    def __init__(self, fn: Callable[[Any, Any], None], *, name: str = "callback") -> None:
        if not callable(fn):
            raise ConfigError("CallbackSink needs a function fn(key, value)")
        self.fn = fn
        self.name = name

    def write(self, txn: Transaction, rows: Sequence[Row]) -> None:
        for k, v, _ in rows:
            self.fn(k, v)

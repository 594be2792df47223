"""The idempotent receiver: for services downstream of onceflow that apply its outputs to a
database of their own.

A consumer delivers at least once (it may crash after applying a record and before
committing its position). The receiver makes the effect exactly-once anyway: inside the
service's own database transaction it records the event id and runs the effect only if
the id was not there, so a redelivered record changes nothing.

    >>> import sqlite3
    >>> from onceflow.receiver import IdempotentReceiver
    >>> db = sqlite3.connect(":memory:", isolation_level=None)
    >>> _ = db.execute("CREATE TABLE credits(account TEXT, amount INT)")
    >>> rx = IdempotentReceiver(db)
    >>> credit = lambda c: c.execute("INSERT INTO credits VALUES ('a', 5)")
    >>> rx.handle("pay-1", credit), rx.handle("pay-1", credit)
    (True, False)

Works with a `sqlite3.Connection` (opened with `isolation_level=None`) or a psycopg 3
connection. Processed ids are kept for `retention` seconds (None: forever); `purge()`
drops older ones, which `run_receiver` calls now and then.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ._consumer import Consumer
from ._errors import ConfigError
from ._records import Record
from ._sinks import check_identifier

__all__ = ["IdempotentReceiver", "event_id", "run_receiver"]

T = TypeVar("T")


def event_id(record: Record) -> str:
    """A record's id, or its position when it has none (stable for a redelivery)."""
    return record.id or f"{record.topic}/{record.partition}/{record.offset}"


# The advisory lock key under which receivers create their table in PostgreSQL.
_DDL_LOCK = 0x6F6E63657265637A  # "oncerecz"


class IdempotentReceiver:
    """Runs each effect once per event id, in the receiver's own database transaction."""

    def __init__(
        self, conn: Any, *, table: str = "onceflow_processed", retention: float | None = None
    ) -> None:
        self.conn = conn
        self._table = check_identifier(table, "table")
        self.retention = retention
        self._sqlite = type(conn).__module__ == "sqlite3"
        if self._sqlite and conn.isolation_level is not None:
            raise ConfigError(
                "IdempotentReceiver needs the sqlite3 connection opened with "
                "isolation_level=None, so that it controls the transaction"
            )
        self._mark = "?" if self._sqlite else "%s"
        ddl = (
            f"CREATE TABLE IF NOT EXISTS {self._table}("
            "id TEXT PRIMARY KEY, processed_at DOUBLE PRECISION NOT NULL)"
        )
        self._run_in_txn(self._create(ddl))

    def _create(self, ddl: str) -> Callable[[Any], Any]:
        def create(c: Any) -> Any:
            if not self._sqlite:
                # Replicas starting at once: CREATE TABLE IF NOT EXISTS is not safe
                # against itself in PostgreSQL; the advisory lock makes them take turns.
                c.execute("SELECT pg_advisory_xact_lock(%s)", (_DDL_LOCK,))
            return c.execute(ddl)

        return create

    def _begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE" if self._sqlite else "BEGIN")

    def _run_in_txn(self, fn: Callable[[Any], T]) -> T:
        if not self._sqlite and self.conn.autocommit is False:
            # psycopg in its default mode opens transactions itself; use its block.
            with self.conn.transaction():
                return fn(self.conn)
        self._begin()
        try:
            result = fn(self.conn)
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        return result

    def handle(self, event_id: str, effect: Callable[[Any], object]) -> bool:
        """Apply `effect(conn)` if `event_id` is new, in one transaction with the id.

        True when applied now, False when the id was processed before. If the effect
        raises, nothing is recorded and the exception propagates.
        """
        m = self._mark

        def txn(c: Any) -> bool:
            cur = c.execute(
                f"INSERT INTO {self._table}(id, processed_at) VALUES({m}, {m}) "
                "ON CONFLICT(id) DO NOTHING",
                (event_id, time.time()),
            )
            if cur.rowcount != 1:
                return False
            effect(c)
            return True

        return self._run_in_txn(txn)

    def purge(self) -> int:
        """Forget ids older than the retention; returns how many."""
        if self.retention is None:
            return 0
        cutoff = time.time() - self.retention
        return int(
            self._run_in_txn(
                lambda c: (
                    c.execute(
                        f"DELETE FROM {self._table} WHERE processed_at < {self._mark}", (cutoff,)
                    ).rowcount
                )
            )
        )

    def seen(self, event_id: str) -> bool:
        row = self.conn.execute(
            f"SELECT 1 FROM {self._table} WHERE id = {self._mark}", (event_id,)
        ).fetchone()
        if not self._sqlite and self.conn.autocommit is False:
            self.conn.rollback()
        return row is not None


def _bind(handler: Callable[[Any, Record], object], rec: Record) -> Callable[[Any], object]:
    return lambda conn: handler(conn, rec)


def run_receiver(
    store: str | os.PathLike[str],
    *,
    group: str,
    topics: Sequence[str],
    receiver: IdempotentReceiver,
    handler: Callable[[Any, Record], object],
    stop: threading.Event | None = None,
    until_idle: bool = False,
    purge_every: float = 60.0,
) -> int:
    """A consumer loop: each committed record of `topics` is applied once by
    `handler(conn, record)` through `receiver`; positions are committed after each batch.
    Returns how many records were applied (not counting redeliveries)."""
    applied = 0
    last_purge = time.monotonic()
    with Consumer(store, group=group, topics=topics) as consumer:
        while stop is None or not stop.is_set():
            batch = consumer.poll(max_records=500, timeout=0.2)
            for rec in batch:
                applied += receiver.handle(event_id(rec), _bind(handler, rec))
            if batch:
                consumer.commit()
            elif until_idle:
                break
            if time.monotonic() - last_purge > purge_every:
                receiver.purge()
                last_purge = time.monotonic()
    return applied

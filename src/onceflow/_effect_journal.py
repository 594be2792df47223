"""Where the effect journal lives: the embedded store's `effects` table, or on Kafka the
local store of each input partition plus its changelog topic.

`EffectSink` holds the delivery logic and talks to either through the same four calls:
`add` (inside the epoch's transaction), `pending`, `attempt_failed` and `settle`
(journal an outcome durably, a dead letter with it), then `flush`.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ._errors import FencedError
from ._records import Columns
from ._serde import encode_value
from ._sinks import Row, sql_of

if TYPE_CHECKING:
    from ._backend import Transaction
    from ._kafka import KafkaSession
    from ._sqlite import SQLiteStore

SQLITE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS effects(app TEXT NOT NULL, sink TEXT NOT NULL, "
    "seq INTEGER NOT NULL, key TEXT NOT NULL, payload BLOB NOT NULL, status TEXT NOT NULL, "
    "attempts INTEGER NOT NULL DEFAULT 0, response BLOB, error TEXT, "
    "PRIMARY KEY(app, sink, seq)) WITHOUT ROWID"
)

KeyFn = Callable[[tuple[str, int, int, int]], str]


@dataclass(frozen=True)
class Intent:
    """A journalled effect: `ref` locates it in its journal."""

    ref: Any
    key: str
    payload: bytes


class Journal(Protocol):
    def add(self, txn: Transaction, rows: Sequence[Row], key: KeyFn) -> None: ...

    def pending(self) -> list[Intent]: ...

    def attempt_failed(self, intent: Intent, error: str) -> None: ...

    def settle(
        self, intent: Intent, status: str, response: bytes | None, error: str | None
    ) -> None: ...

    def flush(self) -> None: ...


def dead_letter_headers(app: str, sink: str, error: str) -> dict[str, str]:
    return {"onceflow-error": error[:2000], "onceflow-step": sink, "onceflow-app": app}


class SQLiteJournal:
    """The embedded store's table. Each outcome is settled in a transaction of its own,
    fenced by the leases (`Sink.fenced`) and a compare-and-set from 'pending': a
    recorder paused between its call and this entry, that resumes after a successor
    settled the intent, is refused and writes no second outcome or dead letter."""

    def __init__(
        self,
        fenced: Callable[[str], AbstractContextManager[sqlite3.Connection]],
        app: str,
        sink: str,
        store: SQLiteStore,
        dead_letter_topic: str,
    ) -> None:
        self.fenced, self.app, self.sink = fenced, app, sink
        self.store, self.dead_letter_topic = store, dead_letter_topic
        with store.lock:
            store.conn.execute(SQLITE_SCHEMA)

    def add(self, txn: Transaction, rows: Sequence[Row], key: KeyFn) -> None:
        conn = sql_of(txn, self.sink)
        (last,) = conn.execute(
            "SELECT COALESCE(MAX(seq), -1) FROM effects WHERE app=? AND sink=?",
            (self.app, self.sink),
        ).fetchone()
        conn.executemany(
            "INSERT INTO effects(app, sink, seq, key, payload, status) VALUES(?,?,?,?,?,'pending')",
            [
                (self.app, self.sink, last + 1 + i, key(row_id), encode_value(value))
                for i, (_, value, row_id) in enumerate(rows)
            ],
        )

    def pending(self) -> list[Intent]:
        with self.store.lock:
            return [
                Intent(seq, key, payload)
                for seq, key, payload in self.store.conn.execute(
                    "SELECT seq, key, payload FROM effects WHERE app=? AND sink=? "
                    "AND status='pending' ORDER BY seq",
                    (self.app, self.sink),
                )
            ]

    def attempt_failed(self, intent: Intent, error: str) -> None:
        with self.fenced(f"a failed attempt of effect {intent.key}") as conn:
            conn.execute(
                "UPDATE effects SET attempts=attempts+1, error=? "
                "WHERE app=? AND sink=? AND seq=? AND status='pending'",
                (error, self.app, self.sink, intent.ref),
            )

    def settle(
        self, intent: Intent, status: str, response: bytes | None, error: str | None
    ) -> None:
        with self.fenced(f"the outcome of effect {intent.key}") as conn:
            settled = conn.execute(
                "UPDATE effects SET status=?, response=?, error=?, attempts=attempts+1 "
                "WHERE app=? AND sink=? AND seq=? AND status='pending'",
                (status, response, error, self.app, self.sink, intent.ref),
            ).rowcount
            if settled != 1:
                raise FencedError(
                    f"EffectSink '{self.sink}': effect {intent.key} was settled by another "
                    "process; this one stops without recording a second outcome"
                )
            if status == "dead":
                self._dead_letter(conn, intent, error or "")

    def _dead_letter(self, conn: sqlite3.Connection, intent: Intent, error: str) -> None:
        if not self.dead_letter_topic:
            return
        found = self.store.topic(self.dead_letter_topic)
        if found is None:
            return
        headers = dead_letter_headers(self.app, self.sink, error)
        self.store.append(
            conn,
            found[0],
            0,
            Columns([None], [intent.payload], [headers], [time.time()], [intent.key]),
        )

    def flush(self) -> None:
        """Each outcome was committed by `settle`."""


class KafkaJournal:
    """Intents in the local store of their input partition, through its changelog, so
    that the worker that takes the partition over finds them. Outcomes are journalled
    together by one small Kafka transaction per delivery round (`flush`)."""

    def __init__(self, session: KafkaSession, app: str, sink: str, dead_letter_topic: str) -> None:
        self.session, self.app, self.sink = session, app, sink
        self.dead_letter_topic = dead_letter_topic
        self._settled: list[tuple[Intent, str, bytes | None, str | None]] = []

    def add(self, txn: Transaction, rows: Sequence[Row], key: KeyFn) -> None:
        # Into the session's open transaction, beside the input's state.
        for _, value, row_id in rows:
            topic, part, off, idx = row_id
            self.session.write_effect(
                topic, part, self.sink, key(row_id), (off, idx, encode_value(value))
            )

    def pending(self) -> list[Intent]:
        return [
            Intent(ref, key, payload)
            for ref, key, payload in self.session.pending_effects(self.sink)
        ]

    def attempt_failed(self, intent: Intent, error: str) -> None:
        """Not journalled: the intent stays pending, with its key."""

    def settle(
        self, intent: Intent, status: str, response: bytes | None, error: str | None
    ) -> None:
        self._settled.append((intent, status, response, error))

    def flush(self) -> None:
        settled, self._settled = self._settled, []
        if not settled:
            return
        dead = [
            (i.payload, i.key, dead_letter_headers(self.app, self.sink, e or ""))
            for i, status, _, e in settled
            if status == "dead"
        ]
        self.session.settle_effects(
            self.sink,
            [(i.ref, i.key, status, response, error) for i, status, response, error in settled],
            self.dead_letter_topic,
            dead,
        )

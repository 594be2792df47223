"""The idempotent receiver: a redelivered record changes nothing, in SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from onceflow import ConfigError, Producer, Record
from onceflow.receiver import IdempotentReceiver, event_id, run_receiver


def _credit(conn: Any, rec: Record, mark: str = "?") -> None:
    conn.execute(f"UPDATE balance SET total = total + {mark}", (int(rec.value),))


def sqlite_db(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE IF NOT EXISTS balance(total INTEGER)")
    if db.execute("SELECT COUNT(*) FROM balance").fetchone()[0] == 0:
        db.execute("INSERT INTO balance VALUES (0)")
    return db


def test_each_effect_once_across_a_crash_before_the_consumer_commits(tmp_path: Path) -> None:
    store = str(tmp_path / "log.db")
    with Producer(store) as p:
        p.send_batch("credits", [(None, i, f"c{i}") for i in range(1, 11)])
    db = sqlite_db(tmp_path / "svc.db")
    rx = IdempotentReceiver(db)
    crashed = {"n": 0}

    def flaky(conn: Any, rec: Record) -> None:
        _credit(conn, rec)
        if rec.id == "c7" and not crashed["n"]:
            crashed["n"] = 1
            raise RuntimeError("crash after applying, before the consumer commits")

    with pytest.raises(RuntimeError):
        run_receiver(
            store, group="svc", topics=["credits"], receiver=rx, handler=flaky, until_idle=True
        )
    # The crashed record's transaction rolled back; the batch is delivered again.
    applied = run_receiver(
        store, group="svc", topics=["credits"], receiver=rx, handler=_credit, until_idle=True
    )
    assert applied == 10 - 6
    assert db.execute("SELECT total FROM balance").fetchone()[0] == sum(range(1, 11))


def test_handle_is_once_per_id_and_retention_forgets(tmp_path: Path) -> None:
    db = sqlite_db(tmp_path / "svc.db")
    rx = IdempotentReceiver(db, retention=0.05)
    rec = Record("t", 0, 0, None, b"5", None, 0.0, "x")
    assert rx.handle(event_id(rec), lambda c: _credit(c, rec))
    assert not rx.handle(event_id(rec), lambda c: _credit(c, rec))
    assert rx.seen("x")
    time.sleep(0.1)
    assert rx.purge() == 1 and not rx.seen("x")
    assert event_id(Record("t", 2, 9, None, b"", None, 0.0, None)) == "t/2/9"


def test_a_failing_effect_records_nothing(tmp_path: Path) -> None:
    db = sqlite_db(tmp_path / "svc.db")
    rx = IdempotentReceiver(db)

    def boom(conn: Any) -> None:
        conn.execute("UPDATE balance SET total = 99")
        raise ValueError("no")

    with pytest.raises(ValueError):
        rx.handle("y", boom)
    assert not rx.seen("y") and db.execute("SELECT total FROM balance").fetchone()[0] == 0


def test_sqlite_connection_must_leave_transactions_to_the_receiver(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="isolation_level=None"):
        IdempotentReceiver(sqlite3.connect(tmp_path / "x.db"))


@pytest.mark.postgres
def test_postgres_receiver(postgres_url: str) -> None:
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE balance(total int)")
        conn.execute("INSERT INTO balance VALUES (0)")
        rx = IdempotentReceiver(conn, retention=3600)
        rec = Record("t", 0, 0, None, b"7", None, 0.0, "p-1")
        for _ in range(3):
            rx.handle(event_id(rec), lambda c: _credit(c, rec, "%s"))
        assert conn.execute("SELECT total FROM balance").fetchone()[0] == 7
        assert rx.seen("p-1")


def test_postgres_receivers_starting_at_once_create_their_table_once(postgres_url: str) -> None:
    import threading

    import psycopg

    conns = [psycopg.connect(postgres_url, autocommit=True) for _ in range(8)]
    start = threading.Barrier(len(conns))
    errors: list[BaseException] = []

    def open_one(conn: Any) -> None:
        start.wait()
        try:
            IdempotentReceiver(conn)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for c in conns:
        c.close()
    assert errors == []

"""The App's failure policy: a record whose commit can never succeed becomes one dead
letter and the pipeline goes on; an outage of any length is waited out, said once in
the log, and resumed from by itself; a stop is honoured while waiting."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import threading
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
import pytest

import onceflow._sqlite
from onceflow import App, Hooks, PostgresSink, Producer, UnavailableError
from onceflow._sinks import Row, Sink

from .helpers import read_all, values

Factory = Callable[..., App]


def dead_letters(store: str, app: str = "app") -> list[tuple[int, str, str]]:
    """(source offset, step, error) of each dead letter, by source offset."""
    out = []
    for r in read_all(store, f"{app}.dead-letters"):
        h = r.headers or {}
        out.append((int(h["onceflow-source-offset"]), h["onceflow-step"], h["onceflow-error"]))
    return sorted(out)


def test_poison_records_become_one_dead_letter_each(store: str, app_factory: Factory) -> None:
    """State that cannot be encoded (an int of 2**64 in a reduce), a dedupe id that cannot
    be stored and an output key that cannot be written each fail their commit every time.
    Each such record ends as one dead letter with its error, step and offset; everything
    else is committed once, and a restart does not meet the poison again."""
    rows = [
        {"n": 1, "pid": "p0", "acct": "x"},
        {"n": 2**64, "pid": "p1", "acct": "x"},  # the running sum cannot be stored
        {"n": 3, "pid": "bad", "acct": "x"},  # the dedupe id cannot be stored
        {"n": 4, "pid": "p3", "acct": "bad"},  # the output key cannot be written
        {"n": 5, "pid": "p4", "acct": "y"},
    ]
    with Producer(store) as p:
        p.send_batch("in", [("a", v, None) for v in rows])

    def build() -> App:
        app = app_factory()
        s = app.source("in")
        s.reduce(name="sum", fn=lambda a, v: a + v["n"], initial=0).to("sums")
        s.dedupe(
            name="ids", key=lambda v: "\ud800" if v["pid"] == "bad" else v["pid"], ttl=3600
        ).map(lambda v: v["pid"]).to("firsts")
        s.key_by(lambda v: "\ud800" if v["acct"] == "bad" else v["acct"]).to("by-acct")
        return app

    stats = build().run(until_idle=True)
    assert values(store, "sums") == [1, 4, 9]
    # The dedupe id fails at its step, so only that step drops the record.
    assert [r.value for r in read_all(store, "firsts")] == [b"p0", b"p4"]
    assert [r.key for r in read_all(store, "by-acct")] == ["x", "x", "y"]
    dead = dead_letters(store)
    assert [(off, step) for off, step, _ in dead] == [
        (1, "sum:state"),
        (2, "ids"),
        (3, "commit:outputs"),
    ]
    assert "64-bit" in dead[0][2] and "UnicodeEncodeError" in dead[1][2]
    assert stats.dead_letters == 3
    # The committed state left the poison out, and a restart goes on from it.
    with Producer(store, producer_id="later") as p:
        p.send("in", {"n": 10, "pid": "p5", "acct": "y"}, key="a")
    build().run(until_idle=True)
    assert values(store, "sums") == [1, 4, 9, 19]
    assert len(dead_letters(store)) == 3


def test_a_row_the_sink_refuses_becomes_a_dead_letter(embedded_store: str) -> None:
    store = embedded_store
    from onceflow import SQLiteTableSink

    with Producer(store) as p:
        p.send_batch("in", [("k", {"k": f"r{i}", "v": i}, None) for i in range(6)])
        p.send("in", {"k": "r6"}, key="k")  # no "v": the table sink refuses the row
        p.send_batch("in", [("k", {"k": f"r{i}", "v": i}, None) for i in range(7, 10)])
    app = App("app", store=store)
    src = app.source("in")
    src.map(lambda v: v["k"]).to("keys")
    src.sink(SQLiteTableSink("rows", key=["k"], columns=["k", "v"]))
    app.run(until_idle=True)
    conn = sqlite3.connect(store)
    table = conn.execute("SELECT k, v FROM rows ORDER BY v").fetchall()
    conn.close()
    assert table == [(f"r{i}", i) for i in range(10) if i != 6]
    assert [r.value for r in read_all(store, "keys")] == [
        f"r{i}".encode() for i in range(10) if i != 6
    ]
    ((off, step, err),) = dead_letters(store)
    assert off == 6 and step == "table-rows:write" and "'v'" in err


def test_a_row_postgresql_refuses_becomes_a_dead_letter(
    store: str, app_factory: Factory, postgres_url: str
) -> None:
    """A CHECK constraint refuses one balance: that payment becomes a dead letter, the
    balances of the others are in PostgreSQL once."""
    with psycopg.connect(postgres_url, autocommit=True) as c:
        c.execute("CREATE TABLE balances(acct text PRIMARY KEY, bal int CHECK (bal >= 0))")
    amounts = [("a", 5), ("b", 2), ("a", -10), ("a", 3), ("b", 1)]
    with Producer(store) as p:
        p.send_batch("in", [(acct, {"n": n}, None) for acct, n in amounts])

    def balance(v: Any, st: Any) -> list[Any]:
        st.value = st.get(0) + v["n"]
        return [{"acct": st.key, "bal": st.value}]

    app = app_factory()
    app.source("in").process(name="bal", fn=balance).sink(
        PostgresSink(table="balances", key=["acct"], columns=["acct", "bal"])
    )
    app.run(until_idle=True)
    with psycopg.connect(postgres_url, autocommit=True) as c:
        assert c.execute("SELECT acct, bal FROM balances ORDER BY 1").fetchall() == [
            ("a", 8),
            ("b", 3),
        ]
        assert c.execute("SELECT gid FROM pg_prepared_xacts").fetchall() == []
    ((off, step, err),) = dead_letters(store)
    assert off == 2 and step == "postgres-balances:prepare" and "bal" in err


class Outside(Sink):
    """An outside system in front of the commit (like PostgresSink's first phase) that
    is down for its first `down` attempts: it raises UnavailableError, as onceflow's own
    sinks do during an outage. Rows count once the store committed their epoch."""

    guarantee = "transactional"
    needs_store = False

    def __init__(self, down: int) -> None:
        self.name = "outside"
        self.down = down
        self.attempts = 0
        self.prepared: list[Any] = []
        self.rows: list[Any] = []

    def prepare(self, rows: Sequence[Row], positions: Any, fence: int) -> None:
        self.attempts += 1
        if self.attempts <= self.down:
            raise UnavailableError("the ledger service is unreachable")
        self.prepared = [v for _, v, _ in rows]

    def abort(self) -> None:
        self.prepared = []

    def after_commit(self, rows: Sequence[Row]) -> None:
        self.rows += self.prepared
        self.prepared = []


def messages(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)


def test_an_outage_is_waited_out_said_once_and_resumed(
    store: str, app_factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """More failed commits than the App used to allow before giving up: it waits, says
    so once, resumes by itself and says so once; no dead letter, every row once."""
    with Producer(store) as p:
        p.send_batch("in", [("k", i, None) for i in range(10)])
    sink = Outside(down=6)
    app = app_factory(commit_every=5, max_batch=5)
    src = app.source("in")
    src.to("copy")
    src.sink(sink)
    with caplog.at_level(logging.DEBUG, logger="onceflow"):
        app.run(until_idle=True)
    assert sink.attempts > 6
    assert sink.rows == list(range(10))
    assert values(store, "copy") == list(range(10))
    assert read_all(store, "app.dead-letters") == []
    assert messages(caplog, "waiting") == 1
    assert messages(caplog, "is back") == 1


def test_a_locked_store_is_waited_out(
    embedded_store: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Another connection holds the store's write lock across several of the App's
    attempts (a stuck process, a backup): the App waits and resumes when it is free."""
    store = embedded_store
    monkeypatch.setattr(onceflow._sqlite, "BUSY_TIMEOUT_S", 0.2)
    with Producer(store) as p:
        p.send_batch("amounts", [("k", {"n": 1}, None) for _ in range(20)])
    locker = sqlite3.connect(store, isolation_level=None, check_same_thread=False)
    failed: list[int] = []

    class LockAfterFirstCommit(Hooks):
        def commit_finished(self, epoch: int, n_in: int, n_out: int, secs: float) -> None:
            if not locker.in_transaction and not failed:
                locker.execute("BEGIN IMMEDIATE")

        def commit_failed(self, epoch: int, error: BaseException) -> None:
            failed.append(epoch)
            if len(failed) == 3:
                locker.execute("ROLLBACK")

    app = App("sums", store=store, commit_every=5, max_batch=5, hooks=[LockAfterFirstCommit()])
    app.source("amounts").reduce(name="total", fn=lambda a, v: a + v["n"], initial=0).to("totals")
    with caplog.at_level(logging.DEBUG, logger="onceflow"):
        app.run(until_idle=True)
    locker.close()
    assert len(failed) == 3
    assert [json.loads(r.value) for r in read_all(store, "totals")] == list(range(1, 21))
    assert read_all(store, "sums.dead-letters") == []
    assert messages(caplog, "waiting") == 1
    assert messages(caplog, "is back") == 1


def test_sigterm_while_waiting_out_an_outage_stops_the_app(embedded_store: str) -> None:
    """A real SIGTERM to this process while the App waits: it returns without
    committing, and the next run, with the system back, commits everything once."""
    store = embedded_store
    with Producer(store) as p:
        p.send_batch("in", [("k", i, None) for i in range(5)])
    sink = Outside(down=10**9)
    app = App("app", store=store)
    src = app.source("in")
    src.to("copy")
    src.sink(sink)

    class TermOnWait(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting" in record.getMessage():
                threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGTERM)).start()

    handler = TermOnWait()
    logging.getLogger("onceflow").addHandler(handler)
    try:
        stats = app.run(until_idle=True)
    finally:
        logging.getLogger("onceflow").removeHandler(handler)
    assert stats.commits == 0 and sink.rows == [] and read_all(store, "copy") == []
    sink.down = 0
    app.run(until_idle=True)
    assert sink.rows == list(range(5)) and values(store, "copy") == list(range(5))


def test_an_output_key_that_cannot_be_partitioned_is_a_dead_letter(
    store: str, app_factory: Factory
) -> None:
    """With several output partitions the key is hashed in the step itself: a key that
    is not valid text fails there, for that record only."""
    with Producer(store) as p:
        p.send_batch("in", [(None, {"acct": a}, None) for a in ["x", "bad", "y"]])
    app = app_factory(partitions=2)
    app.source("in").key_by(lambda v: "\ud800" if v["acct"] == "bad" else v["acct"]).to("by-acct")
    app.run(until_idle=True)
    assert sorted(r.key or "" for r in read_all(store, "by-acct")) == ["x", "y"]
    ((off, step, err),) = dead_letters(store)
    assert off == 1 and step.endswith(":encode") and "UnicodeEncodeError" in err


def test_a_step_that_meets_an_outage_runs_again_instead_of_dead_lettering(
    embedded_store: str,
) -> None:
    """UnavailableError from a user function is an outage too, never a dead letter."""
    store = embedded_store
    calls = {"n": 0}

    def rate(v: int) -> int:
        calls["n"] += 1
        if calls["n"] <= 3:
            raise UnavailableError("the rates service is unreachable")
        return v * 2

    with Producer(store) as p:
        p.send_batch("in", [("k", i, None) for i in range(5)])
    app = App("app", store=store)
    app.source("in").map(rate).to("out")
    app.run(until_idle=True)
    assert values(store, "out") == [0, 2, 4, 6, 8]
    assert read_all(store, "app.dead-letters") == []


def test_a_delivery_that_fails_after_the_commit_is_recovered_in_process(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A FileSink's directory disappears (an unmounted volume) after a commit: delivery
    fails after the store committed. The App reopens its session as a restart would,
    waits until the directory is back, then delivers every line once."""
    store = str(tmp_path / "store.db")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    away = tmp_path / "away"
    with Producer(store) as p:
        p.send_batch("in", [("k", i, None) for i in range(20)])
    from onceflow import FileSink

    class Unmount(Hooks):
        done = False

        def commit_finished(self, epoch: int, n_in: int, n_out: int, secs: float) -> None:
            if not self.done:
                self.done = True
                out_dir.rename(away)

    class Remount(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting" in record.getMessage():
                away.rename(out_dir)

    app = App("app", store=store, commit_every=5, max_batch=5, hooks=[Unmount()])
    app.source("in").sink(FileSink(out_dir / "lines.jsonl"))
    handler = Remount()
    logging.getLogger("onceflow").addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger="onceflow"):
            app.run(until_idle=True)
    finally:
        logging.getLogger("onceflow").removeHandler(handler)
    lines = (out_dir / "lines.jsonl").read_text().splitlines()
    assert [int(x) for x in lines] == list(range(20))
    assert messages(caplog, "waiting") == 1
    assert messages(caplog, "is back") == 1

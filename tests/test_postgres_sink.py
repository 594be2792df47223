"""PostgresSink: exactly-once into a real PostgreSQL by two-phase commit with the store,
crashing at every step (between PREPARE and COMMIT PREPARED included)."""

from __future__ import annotations

import logging
import random
import shutil
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from onceflow import App, ConfigError, FencedError, PostgresSink, UnavailableError
from onceflow._crash import CRASH_POINTS, CrashInjector, SimulatedCrash
from onceflow._embedded import EmbeddedSession
from onceflow._sinks import SinkContext
from onceflow._sqlite import SQLiteStore
from onceflow._supervisor import wait_until
from onceflow.testing import Crash, Event, run_with_crashes, send

from . import pipelines
from .helpers import run_until_idle

pytestmark = pytest.mark.postgres
ROOT = Path(__file__).resolve().parent.parent


def events(n: int, crash: str | None = None, seed: int = 0) -> list[Event | Crash]:
    rng = random.Random(seed)
    out: list[Event | Crash] = []
    for i in range(n):
        k = f"k{rng.randrange(5)}"
        out.append(Event("amounts", {"k": k, "n": rng.randint(1, 9)}, key=k, id=f"e{i}"))
        if crash and i % 11 == 5:
            out.append(Crash(crash, nth=rng.randint(1, 2)))
    return out


def open_embedded(sink: PostgresSink, path: Path, app: str = "app") -> None:
    """What an App on the embedded store does with the sink at start: open it, then
    (with the leases taken) hand it every partition once."""
    session = EmbeddedSession(SQLiteStore(str(path)), app, "test")
    sink.open(SinkContext(app, "embedded", session, lambda point: None, None, f"{app}.dlq"))
    sink.partitions_assigned([])


def create_tables(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("CREATE TABLE ledger(row_id text PRIMARY KEY, account text, amount int)")
        c.execute("CREATE TABLE seen(k text PRIMARY KEY, n int)")


def tables(url: str) -> tuple[list[Any], list[Any], list[Any]]:
    with psycopg.connect(url, autocommit=True) as c:
        ledger = c.execute("SELECT row_id, account, amount FROM ledger ORDER BY 1").fetchall()
        seen = c.execute("SELECT k, n FROM seen ORDER BY 1").fetchall()
        prepared = c.execute("SELECT gid FROM pg_prepared_xacts").fetchall()
    return ledger, seen, prepared


def prepared(url: str) -> list[str]:
    with psycopg.connect(url, autocommit=True) as c:
        return [r[0] for r in c.execute("SELECT gid FROM pg_prepared_xacts")]


@pytest.fixture
def two_dbs(postgres_server: Any) -> Any:
    import uuid

    names = [f"c{uuid.uuid4().hex[:8]}", f"r{uuid.uuid4().hex[:8]}"]
    urls = [postgres_server.create_database(n) for n in names]
    for u in urls:
        create_tables(u)
    yield urls
    for n in names:
        postgres_server.drop_database(n)


@pytest.mark.parametrize("point", [*CRASH_POINTS[:5], "sink_prepared"])
def test_every_input_once_in_postgres_through_crashes(
    point: str, two_dbs: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crashed_url, reference_url = two_dbs
    evs = events(60, crash=point)
    monkeypatch.setenv("ONCEFLOW_POSTGRES_URL", crashed_url)
    report = run_with_crashes(pipelines.to_postgres(), evs, store=tmp_path / "c.db")
    monkeypatch.setenv("ONCEFLOW_POSTGRES_URL", reference_url)
    run_with_crashes(
        pipelines.to_postgres(), [e for e in evs if isinstance(e, Event)], store=tmp_path / "r.db"
    )
    assert report.crashes >= 3
    got, want = tables(crashed_url), tables(reference_url)
    assert len(got[0]) == 60
    assert got[0] == want[0] and got[1] == want[1]
    assert got[2] == []  # no prepared transaction left behind


@pytest.mark.parametrize("point", ["sink_prepared", "in_transaction", "after_commit"])
def test_real_sigkill_between_prepare_and_commit_prepared(
    point: str, postgres_url: str, tmp_path: Path
) -> None:
    create_tables(postgres_url)
    store = str(tmp_path / "kill.db")
    evs = [e for e in events(120, seed=4) if isinstance(e, Event)]
    killed = 0
    env = {"ONCEFLOW_POSTGRES_URL": postgres_url}
    for i, start in enumerate(range(0, len(evs), 30)):
        send(store, evs[start : start + 30])
        target = "tests.pipelines:to_postgres_app"
        killed += run_until_idle(target, store, crash_at=f"{point}:{1 + i % 2}", env=env)
        # Right after a kill, before recovery: at most this epoch's prepared transaction.
        assert len(tables(postgres_url)[2]) <= 2
    run_until_idle("tests.pipelines:to_postgres_app", store, env=env)
    assert killed >= 2
    ledger, _, prepared = tables(postgres_url)
    assert len(ledger) == 120 and prepared == []


def test_a_zombie_epoch_is_refused_inside_postgres(postgres_url: str, tmp_path: Path) -> None:
    create_tables(postgres_url)
    new, old = (
        PostgresSink(table="seen", key=["k"], columns=["k", "n"]),
        PostgresSink(table="seen", key=["k"], columns=["k", "n"]),
    )
    for s in (new, old):
        open_embedded(s, tmp_path / "s.db")
    rows = [("k", {"k": "k", "n": 1}, ("t", 0, 0, 0))]
    new.prepare(rows, {("t", 0): 1}, fence=7)
    new.after_commit(rows)
    stale = [("k", {"k": "k", "n": 99}, ("t", 0, 0, 0))]
    with pytest.raises(FencedError, match="higher epoch than 3"):
        old.prepare(stale, {("t", 0): 1}, fence=3)
    assert tables(postgres_url)[1] == [("k", 1)] and tables(postgres_url)[2] == []


def test_resumes_from_postgres_offsets_when_they_are_ahead(
    postgres_url: str, tmp_path: Path
) -> None:
    create_tables(postgres_url)
    store = tmp_path / "s.db"
    evs = [e for e in events(40) if isinstance(e, Event)]
    send(str(store), evs[:20])
    app = pipelines.to_postgres()
    app.store = str(store)
    app.run(until_idle=True)
    backup = tmp_path / "backup.db"
    shutil.copy(store, backup)
    send(str(store), evs[20:])
    app.run(until_idle=True)
    # The store comes back from an older backup; the records since were lost from it,
    # so they are sent again, and PostgreSQL's offsets say the first 20 are done.
    for suffix in ("-wal", "-shm"):
        Path(str(store) + suffix).unlink(missing_ok=True)
    shutil.copy(backup, store)
    send(str(store), evs[20:])
    app.run(until_idle=True)
    assert len(tables(postgres_url)[0]) == 40


def _app_ledger(app: str, sink: str, store: Path) -> App:
    """Each input as a row of `apps_ledger`, tagged with the app's and sink's names."""

    def rows(cur: Any, batch: Any) -> None:
        for _, value, row_id in batch:
            cur.execute(
                "INSERT INTO apps_ledger(app, row_id, n) VALUES (%s, %s, %s)",
                (f"{app}|{sink}", "/".join(map(str, row_id)), value["n"]),
            )

    a = App(app, store=str(store), **pipelines.SMALL)  # type: ignore[arg-type]
    a.source("amounts").sink(PostgresSink(fn=rows, name=sink))
    return a


@pytest.mark.parametrize(
    "mine, other",
    [
        (("pay-in", "ledger"), ("pay_in", "ledger")),  # LIKE's '_' matches any character
        (("pay.in", "ledger"), ("pay", "in.ledger")),  # the same id with dots
        (("pay", "led ger"), ("pay", "led/ger")),  # characters not allowed in an id
    ],
)
def test_recovery_settles_only_its_own_prepared_transactions(
    mine: tuple[str, str], other: tuple[str, str], postgres_url: str, tmp_path: Path
) -> None:
    """An app that dies after its store committed an epoch leaves that epoch's prepared
    transaction for its own recovery to commit. Another app, whose names differ, must
    not roll it back when it recovers first: committed rows would be lost."""
    with psycopg.connect(postgres_url, autocommit=True) as c:
        c.execute(
            "CREATE TABLE apps_ledger(app text, row_id text, n int, PRIMARY KEY(app, row_id))"
        )
    evs = [e for e in events(30) if isinstance(e, Event)]
    for store in ("mine.db", "other.db"):
        send(str(tmp_path / store), evs)
    dying = _app_ledger(*mine, tmp_path / "mine.db")
    dying._crash = CrashInjector("after_commit:2", "raise")
    with pytest.raises(SimulatedCrash):
        dying.run(until_idle=True)
    assert len(prepared(postgres_url)) == 1  # the committed epoch's, in doubt
    _app_ledger(*other, tmp_path / "other.db").run(until_idle=True)
    _app_ledger(*mine, tmp_path / "mine.db").run(until_idle=True)
    with psycopg.connect(postgres_url, autocommit=True) as c:
        got = dict(c.execute("SELECT app, COUNT(*) FROM apps_ledger GROUP BY app").fetchall())
    assert got == {"|".join(mine): 30, "|".join(other): 30}
    assert prepared(postgres_url) == []


def test_an_app_rides_out_a_postgresql_crash_and_restart(
    postgres_server: Any, postgres_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL is SIGKILLed mid-run while inputs keep coming, and started again: the
    App says so once, waits, and goes on by itself, each input in PostgreSQL once."""
    caplog.set_level(logging.WARNING, logger="onceflow")
    create_tables(postgres_url)
    store = str(tmp_path / "s.db")
    evs = [e for e in events(80, seed=7) if isinstance(e, Event)]
    app = pipelines.to_postgres()
    app.store = store
    errors: list[BaseException] = []

    def run() -> None:
        try:
            app.run()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    try:
        send(store, evs[:40])
        assert wait_until(lambda: len(tables(postgres_url)[0]) == 40, 60), errors
        postgres_server.kill()
        send(store, evs[40:])
        assert wait_until(lambda: "is unreachable" in caplog.text, 60), errors
    finally:
        postgres_server.start()
    try:
        done = wait_until(
            lambda: len(tables(postgres_url)[0]) == 80 and not tables(postgres_url)[2], 120
        )
        assert done and not errors, errors
    finally:
        app.stop()
        t.join(60)
    assert not errors and not t.is_alive()
    ledger, seen, prepared = tables(postgres_url)
    values = [e.value for e in evs]
    assert sorted((a, n) for _, a, n in ledger) == sorted((v["k"], v["n"]) for v in values)
    assert dict(seen) == {v["k"]: v["n"] for v in values}  # the last value per key
    assert prepared == []
    assert caplog.text.count("is unreachable") == 1  # said once, however long it lasted
    assert caplog.text.count("is back after") == 1  # and once when it is over


def test_clear_errors(postgres_url: str, tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    with pytest.raises(ConfigError, match="does not exist"):
        open_embedded(PostgresSink(postgres_url, table="nope", key=["a"], columns=["a"]), db, "app")
    with psycopg.connect(postgres_url, autocommit=True) as c:
        c.execute("CREATE TABLE partial(a text PRIMARY KEY)")
    with pytest.raises(ConfigError, match=r"no columns \['b'\]"):
        open_embedded(
            PostgresSink(postgres_url, table="partial", key=["a"], columns=["a", "b"]), db, "a"
        )
    with pytest.raises(ConfigError, match="not a plain identifier"):
        PostgresSink(postgres_url, table="x; DROP TABLE y", key=["a"], columns=["a"])
    with pytest.raises(ConfigError, match="either table="):
        PostgresSink(postgres_url)
    bad = "postgresql://someone:s3cret-password@127.0.0.1:1/db"
    with pytest.raises(UnavailableError) as err:
        open_embedded(PostgresSink(bad, table="t", key=["a"], columns=["a"]), db, "app")
    assert "s3cret-password" not in str(err.value) and "***" in str(err.value)


def test_max_prepared_transactions_zero_is_refused(tmp_path: Path) -> None:
    from infra.postgres import PostgresServer, PostgresUnavailable

    server = PostgresServer(tmp_path / "pg0", settings={"max_prepared_transactions": 0})
    try:
        server.start()
    except PostgresUnavailable as exc:
        pytest.skip(f"PostgreSQL tests need the postgresql package: {exc}")
    try:
        sink = PostgresSink(server.url, table="t", key=["a"], columns=["a"])
        with pytest.raises(ConfigError, match="max_prepared_transactions"):
            open_embedded(sink, tmp_path / "s.db")
    finally:
        server.close()


def test_sinks_starting_at_once_create_their_tables_once(postgres_url: str) -> None:
    """Workers start together: their CREATE TABLE IF NOT EXISTS must not collide (it
    is not safe against itself in PostgreSQL without the sink's advisory lock)."""
    import threading

    sinks = [PostgresSink(postgres_url, fn=lambda cur, rows: None) for _ in range(8)]
    conns = [s._ensure() for s in sinks]
    start = threading.Barrier(len(sinks))
    errors: list[BaseException] = []

    def open_one(sink: PostgresSink, conn: Any) -> None:
        start.wait()
        try:
            sink._check_server(conn)
        except BaseException as exc:
            errors.append(exc)

    pairs = zip(sinks, conns, strict=True)
    threads = [threading.Thread(target=open_one, args=pair) for pair in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for s in sinks:
        s.close()
    assert errors == []

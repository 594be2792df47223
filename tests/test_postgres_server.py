"""The PostgreSQL test server itself: a real server whose transactions, prepared
transactions (two-phase commit) and committed data survive a SIGKILL. Everything the
PostgreSQL sink's tests build on.

psycopg is imported inside the tests, after the server started: when it is missing,
start() raises PostgresUnavailable and the test skips (fails under CI) with the hint,
instead of the whole module failing to import.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import infra.postgres as pg_infra
import pytest
from infra.postgres import PostgresServer, PostgresUnavailable

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PostgresServer]:
    server = PostgresServer(tmp_path / "pg")
    started = time.monotonic()
    try:
        server.start()
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    print(f"\nPostgreSQL start: {time.monotonic() - started:.2f}s {_rounded(server.timings)}")
    try:
        yield server
    finally:
        server.close()


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {phase: round(seconds, 3) for phase, seconds in timings.items()}


def _rows(server: PostgresServer) -> list[str]:
    """The committed rows of table t, read on a fresh connection."""
    with server.connect() as conn:
        return sorted(row[0] for row in conn.execute("SELECT v FROM t").fetchall())


def _prepared(server: PostgresServer) -> list[tuple[str, str]]:
    with server.connect() as conn:
        rows = conn.execute("SELECT gid, database FROM pg_prepared_xacts ORDER BY gid")
        return [(gid, db) for gid, db in rows.fetchall()]


def _prepare(server: PostgresServer, gid: str, values: list[str]) -> None:
    """Insert ``values`` in a transaction and PREPARE it as ``gid``, as the sink does.

    Autocommit with explicit BEGIN, so the SQL is exactly what is sent. After PREPARE
    the transaction belongs to no session: the connection closes, the transaction stays.
    """
    with server.connect(autocommit=True) as conn:
        conn.execute("BEGIN")
        for value in values:
            conn.execute("INSERT INTO t(v) VALUES (%s)", (value,))
        conn.execute(f"PREPARE TRANSACTION '{gid}'")


def _create_table(server: PostgresServer) -> None:
    with server.connect() as conn:
        conn.execute("CREATE TABLE t(v text PRIMARY KEY)")


@pytest.mark.postgres
def test_settings_and_url(server: PostgresServer) -> None:
    assert server.url == f"postgresql://postgres@127.0.0.1:{server.port}/onceflow"
    with server.connect() as conn:
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN ("
                "'max_prepared_transactions', 'fsync', 'synchronous_commit', "
                "'listen_addresses', 'max_connections', 'unix_socket_directories')"
            ).fetchall()
        )
        who = conn.execute("SELECT current_database(), current_user").fetchone()
    assert settings == {
        "max_prepared_transactions": "20",
        "fsync": "on",
        "synchronous_commit": "on",
        "listen_addresses": "127.0.0.1",
        "max_connections": "50",
        "unix_socket_directories": str(server.socket_dir),
    }
    assert who == ("onceflow", "postgres")


@pytest.mark.postgres
def test_transactions_and_two_phase_commit(server: PostgresServer) -> None:
    _create_table(server)
    with server.connect() as conn:
        with conn.transaction():
            conn.execute("INSERT INTO t(v) VALUES ('a'), ('b')")
        with pytest.raises(ZeroDivisionError), conn.transaction():
            conn.execute("INSERT INTO t(v) VALUES ('rolled-back')")
            raise ZeroDivisionError  # any exception rolls the block back
    assert _rows(server) == ["a", "b"]

    # PREPARE: durable, listed, invisible to others until COMMIT PREPARED.
    _prepare(server, "x", ["prepared-1", "prepared-2"])
    assert _prepared(server) == [("x", "onceflow")]
    assert _rows(server) == ["a", "b"]
    with server.connect(autocommit=True) as conn:
        conn.execute("COMMIT PREPARED 'x'")
    assert _rows(server) == ["a", "b", "prepared-1", "prepared-2"]
    assert _prepared(server) == []

    # ROLLBACK PREPARED discards, and also leaves nothing behind.
    _prepare(server, "y", ["never"])
    with server.connect(autocommit=True) as conn:
        conn.execute("ROLLBACK PREPARED 'y'")
    assert _rows(server) == ["a", "b", "prepared-1", "prepared-2"]
    assert _prepared(server) == []


@pytest.mark.postgres
def test_kill_keeps_committed_and_prepared_loses_open(server: PostgresServer) -> None:
    import psycopg

    _create_table(server)
    with server.connect() as conn, conn.transaction():
        conn.execute("INSERT INTO t(v) VALUES ('committed-1'), ('committed-2')")
    _prepare(server, "in-doubt", ["prepared"])
    # A transaction still open when the server dies: written, never committed.
    open_conn = server.connect()
    open_conn.execute("INSERT INTO t(v) VALUES ('uncommitted')")

    url = server.url
    started = time.monotonic()
    assert server.kill() == -signal.SIGKILL
    assert not server.is_running()
    killed_at = time.monotonic()
    server.restart()
    done = time.monotonic()
    print(
        f"\nPostgreSQL kill: {killed_at - started:.3f}s, restart: {done - killed_at:.2f}s "
        f"{_rounded(server.timings)}"
    )
    assert server.url == url

    # The old session died with the server: its client sees a dropped connection.
    with pytest.raises(psycopg.OperationalError):
        open_conn.execute("COMMIT")
    open_conn.close()
    # It was a crash, recovered from the WAL, not a shutdown.
    assert "not properly shut down; automatic recovery in progress" in server.log_tail(200)

    assert _rows(server) == ["committed-1", "committed-2"]
    # A prepared transaction survives the crash, still undecided: the sink's recovery
    # decides it from the coordinator's record.
    assert _prepared(server) == [("in-doubt", "onceflow")]
    with server.connect(autocommit=True) as conn:
        conn.execute("COMMIT PREPARED 'in-doubt'")
    assert _rows(server) == ["committed-1", "committed-2", "prepared"]
    assert _prepared(server) == []


@pytest.mark.postgres
def test_graceful_stop_and_restart_keep_data(server: PostgresServer) -> None:
    _create_table(server)
    with server.connect() as conn, conn.transaction():
        conn.execute("INSERT INTO t(v) VALUES ('kept')")
    _prepare(server, "across-stop", ["prepared"])
    started = time.monotonic()
    assert server.stop() == 0  # fast shutdown, clean exit
    stopped = time.monotonic()
    assert not server.is_running()
    assert "database system is shut down" in server.log_tail(20)
    server.restart()
    print(f"\nPostgreSQL stop: {stopped - started:.2f}s, start: {server.timings['total']:.2f}s")
    assert _rows(server) == ["kept"]
    assert _prepared(server) == [("across-stop", "onceflow")]
    with server.connect(autocommit=True) as conn:
        conn.execute("ROLLBACK PREPARED 'across-stop'")


@pytest.mark.postgres
def test_a_database_per_test(server: PostgresServer) -> None:
    url = server.create_database("per_test")
    assert url == server.url_for("per_test")
    with server.connect("per_test") as conn:
        conn.execute("CREATE TABLE t(v text)")  # no clash with the onceflow database
    with server.connect("per_test", autocommit=True) as conn:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO t(v) VALUES ('left behind')")
        conn.execute("PREPARE TRANSACTION 'left-behind'")
    server.drop_database("per_test")  # rolls the prepared transaction back first
    assert _prepared(server) == []
    server.drop_database("per_test")  # IF EXISTS: idempotent


@pytest.mark.postgres
def test_a_killed_owner_takes_its_server_along(tmp_path: Path) -> None:
    """A test run that is SIGKILLed leaves no postmaster and no backend behind."""
    script = (
        "import sys, time\n"
        "from infra.postgres import PostgresServer\n"
        "server = PostgresServer(sys.argv[1]).start()\n"
        "conn = server.connect()\n"  # a backend too, not only the postmaster
        "conn.execute('SELECT 1')\n"
        "print(server.pid, server.data_dir, flush=True)\n"
        "time.sleep(600)\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "pg")],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        line = owner.stdout.readline()
        if not line:
            err = owner.communicate(timeout=30)[1]
            if "PostgresUnavailable" in err:
                pytest.skip(err.strip().splitlines()[-1])
            pytest.fail(f"the owner process failed:\n{err}")
        pid_text, data_text = line.split(maxsplit=1)
        postmaster, data_dir = int(pid_text), Path(data_text.strip())
        assert _cluster_processes(data_dir), "no server processes found to begin with"
        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 10
        while left := _cluster_processes(data_dir):
            assert time.monotonic() < deadline, f"server processes outlived their owner: {left}"
            time.sleep(0.05)
        assert postmaster not in _cluster_processes(data_dir)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    # The killed owner's scratch cluster (and its SysV shared memory segment) is left
    # behind; the next start's sweep removes it.
    scratch = data_dir.parent
    if scratch != (tmp_path / "pg"):
        pg_infra._sweep_stale_scratch(scratch.parent)
        assert not scratch.exists()


def _cluster_processes(data_dir: Path) -> list[int]:
    """Live (non-zombie) processes whose working directory is ``data_dir``.

    Written out here rather than taken from infra.postgres, so that a bug there cannot
    hide itself.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if cwd == str(data_dir) and state != "Z":
            found.append(int(entry))
    return found


def test_missing_binaries_are_reported_as_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not marked postgres: it needs no server, and checks the message the suite turns
    # into a skip (or, under CI, a failure).
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setattr(pg_infra, "PG_BIN_GLOB", str(tmp_path / "no-such" / "*" / "bin"))
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("ONCEFLOW_PG_BINDIR", raising=False)
    with pytest.raises(PostgresUnavailable, match="apt-get install postgresql"):
        PostgresServer(tmp_path / "pg").start()
    monkeypatch.setenv("ONCEFLOW_PG_BINDIR", str(empty))
    with pytest.raises(PostgresUnavailable, match=f"postgres\\) in {empty}"):
        PostgresServer(tmp_path / "pg").start()

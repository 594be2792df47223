"""`onceflow chaos --postgres`: SIGKILLs at every step (between PREPARE TRANSACTION and
COMMIT PREPARED too) of a pipeline writing to a real PostgreSQL, audited table by table
against a reference run in a database of its own; and an audit that does fail when the
PostgreSQL side is tampered with."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from onceflow import ConfigError
from onceflow._chaos import ChaosResult, chaos_command, run_chaos
from onceflow._chaos_postgres import ScratchDatabases, audit, diff_rows
from onceflow._loader import load_app

pytestmark = pytest.mark.postgres
ROOT = Path(__file__).resolve().parent.parent
TARGET = "tests.chaos_pg:app"


Run = tuple[ChaosResult, ScratchDatabases, str, str]


@pytest.fixture(scope="module")
def chaos_run(postgres_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """One chaos run for the module, its databases kept so that a test can tamper."""
    workdir = tmp_path_factory.mktemp("chaos-pg")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        mp.delenv("ONCEFLOW_CRASH_AT", raising=False)
        result = run_chaos(
            TARGET,
            events=3000,
            kills=3,
            seed=5,
            workdir=str(workdir),
            postgres=postgres_server.url,
            keep_postgres=True,
            postgres_control=postgres_server,
            # Not "twin" yet: two processes started at once on one store with a
            # PostgresSink both stopped once (fenced, each by the other) in a full run; a
            # liveness hole, open in issue 8's notes (the effects were audited equal).
            faults=["kill", "pause", "producer-twin", "starve", "pg-restart"],
        )
    dbs = ScratchDatabases(postgres_server.url, result.postgres_databases)
    try:
        yield result, dbs, str(workdir / "chaos.db"), str(workdir / "reference.db")
    finally:
        dbs.drop()


def test_chaos_with_kills_at_every_step_keeps_the_postgres_audit_green(chaos_run: Run) -> None:
    result, dbs, _, _ = chaos_run
    assert result.ok, [c for c in result.checks if not c[1]]
    assert {"sink_prepared", "after_commit", "in_transaction"} <= set(result.step_kills)
    assert result.random_kills >= 3
    # Every embedded fault kind but "twin" ran, and the server was restarted in the middle.
    assert {"pause", "producer-twin", "starve", "pg-restart"} <= set(result.faults)
    assert "sink_prepared" in result.pauses
    passed = {name for name, ok, _ in result.checks if ok}
    assert "no worker stopped by itself (every worker alive at the end)" in passed
    for table in ("ledger", "seen"):
        assert (
            f"PostgreSQL table '{table}' equals the reference run's (none lost, none doubled)"
            in passed
        )
    assert "offsets of PostgresSink 'ledger' not ahead of the consumer offsets" in passed
    assert "offsets of PostgresSink 'seen' not ahead of the consumer offsets" in passed
    assert "no prepared transaction left in PostgreSQL" in passed
    assert "ledger sum is positive (hook got the database)" in passed
    with psycopg.connect(dbs.chaos_url) as conn:
        (n,) = conn.execute("SELECT count(*) FROM ledger").fetchone() or (0,)
    assert n == 3000


def test_offsets_behind_are_a_detail_not_a_failure(chaos_run: Run) -> None:
    """A sink after a filter records no offsets for records that gave it no rows: its
    offsets trail the consumer's without anything lost."""
    _, dbs, store, ref_store = chaos_run
    app = load_app(TARGET)
    with psycopg.connect(dbs.chaos_url, autocommit=True) as conn:
        conn.execute(BEHIND, ("seen",))
        try:
            checks = {name: (ok, detail) for name, ok, detail in audit(app, store, dbs, ref_store)}
        finally:
            conn.execute(BEHIND.replace("- 1", "+ 1"), ("seen",))
    ok, detail = checks["offsets of PostgresSink 'seen' not ahead of the consumer offsets"]
    assert ok, detail
    assert "behind" in detail and "not behind in the reference run" in detail
    ok, detail = checks["offsets of PostgresSink 'ledger' not ahead of the consumer offsets"]
    assert ok and "behind" not in detail, detail


# One partition of one sink moved back by one offset.
BEHIND = (
    "UPDATE onceflow_sink_offsets SET next_offset = next_offset - 1 WHERE sink = %s "
    "AND (topic, part) = (SELECT topic, min(part) FROM onceflow_sink_offsets "
    "WHERE sink = 'seen' GROUP BY topic ORDER BY topic LIMIT 1)"
)


def test_the_audit_fails_when_postgres_is_tampered_with(chaos_run: Run) -> None:
    _, dbs, store, ref_store = chaos_run
    app = load_app(TARGET)
    with psycopg.connect(dbs.chaos_url, autocommit=True) as conn:
        (row_id,) = conn.execute("SELECT min(row_id) FROM ledger").fetchone() or ("",)
        conn.execute("DELETE FROM ledger WHERE row_id = %s", (row_id,))
        conn.execute("UPDATE seen SET n = n + 1 WHERE k = (SELECT min(k) FROM seen)")
        conn.execute("UPDATE onceflow_sink_offsets SET next_offset = next_offset + 1")
        conn.execute("BEGIN")
        conn.execute("INSERT INTO ledger VALUES ('forged', 'k0', 1)")
        conn.execute("PREPARE TRANSACTION 'onceflow.pg.ledger.999.forged'")
    checks = {name: (ok, detail) for name, ok, detail in audit(app, store, dbs, ref_store)}
    ledger = checks[
        "PostgreSQL table 'ledger' equals the reference run's (none lost, none doubled)"
    ]
    assert not ledger[0] and "1 missing" in ledger[1] and row_id in ledger[1]
    seen = checks["PostgreSQL table 'seen' equals the reference run's (none lost, none doubled)"]
    assert not seen[0] and "1 different" in seen[1]
    ok, detail = checks["offsets of PostgresSink 'ledger' not ahead of the consumer offsets"]
    assert not ok and detail.startswith("AHEAD"), detail
    prepared = checks["no prepared transaction left in PostgreSQL"]
    assert not prepared[0] and "forged" in prepared[1]


def test_diff_rows_reports_duplicates_and_changes() -> None:
    got = [("a", 1), ("a", 1), ("b", 3)]
    want = [("a", 1), ("b", 2), ("c", 5)]
    problems = diff_rows(got, want, key=[0])
    assert problems == [
        "1 missing, e.g. [('c', 5)]",
        "1 extra, e.g. [('a', 1)]",
        "1 different, e.g. [\"('b', 3) instead of ('b', 2)\"]",
    ]
    assert diff_rows(want, list(reversed(want)), key=[0]) == []


def test_the_command_drops_its_databases(
    postgres_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    before = _chaos_databases(postgres_server.url)
    args = [TARGET, "--events", "300", "--kills", "0", "--faults", "kill"]
    out = CliRunner().invoke(chaos_command, [*args, "--postgres", postgres_server.url])
    assert out.exit_code == 0, out.output
    assert "PostgreSQL table 'ledger'" in out.output
    assert _chaos_databases(postgres_server.url) == before


def test_a_postgres_app_without_postgres_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match="--postgres postgresql://"):
        run_chaos(TARGET, events=10, kills=0, seed=1, workdir=str(tmp_path))


def test_a_missing_table_fails_before_the_first_kill_with_the_sinks_error(
    postgres_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    before = _chaos_databases(postgres_server.url)
    with pytest.raises(ConfigError, match="table 'seen' does not exist"):
        run_chaos(
            "tests.pipelines:to_postgres_app",
            events=10,
            kills=0,
            seed=1,
            workdir=str(tmp_path),
            postgres=postgres_server.url,
        )
    assert _chaos_databases(postgres_server.url) == before


def _chaos_databases(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {
            r[0]
            for r in conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE 'onceflow\\_%'"
            )
        }


def test_the_chaos_url_wins_over_the_url_a_pipeline_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from onceflow import PostgresSink

    monkeypatch.setenv("ONCEFLOW_CHAOS_POSTGRES_URL", "postgresql://u@127.0.0.1:1/scratch")
    sink = PostgresSink("postgresql://u@db.internal/prod", table="t", key=["k"], columns=["k"])
    assert sink.url == "postgresql://u@127.0.0.1:1/scratch"

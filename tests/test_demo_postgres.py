"""`onceflow demo --sink postgresql://...`: a small run against a real PostgreSQL, and a
PostgreSQL audit that can fail.

One demo run (3,000 payments, 4 kills: `sink_prepared`, a SIGKILL, `after_commit`, a
SIGKILL) is shared by the module. Each tamper test works on a copy of the run's
database (CREATE DATABASE ... TEMPLATE), so each starts from tables that passed.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result

from onceflow._chaos_postgres import with_dbname
from onceflow._demo import STORE_FILE, demo_command, run_audit, run_demo
from onceflow._demo_postgres import DB_PREFIX
from onceflow._errors import ConfigError
from onceflow._postgres_sink import app_gid_prefix

pytestmark = pytest.mark.postgres

ENTRIES = "PostgreSQL ledger: one debit and one credit row per accepted payment, none otherwise"
TOTALS = "PostgreSQL ledger: each running total follows from the one before"
BALANCES = "PostgreSQL balances equal the fold of its ledger and the committed state"
MONEY = "money conserved in PostgreSQL balances"
PREPARED = "no prepared transaction of the app left in PostgreSQL"


class Run:
    def __init__(self, result: Result, store: Path, server: Any, dbname: str) -> None:
        self.result, self.store, self.server, self.dbname = result, store, server, dbname

    @property
    def url(self) -> str:
        return with_dbname(self.server.url, self.dbname)


@pytest.fixture(scope="module")
def demo_run(postgres_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    directory = tmp_path_factory.mktemp("demo-pg") / "data"
    # Seed 10 plans the SIGKILL that arms `after_commit` early (at 14% of the payments),
    # and a modest rate keeps payments arriving while the crash points are armed.
    args = ["--payments", "3000", "--kills", "4", "--seed", "10", "--rate", "2000"]
    args += ["--dir", str(directory), "--sink", postgres_server.url]
    result = CliRunner().invoke(demo_command, args, catch_exceptions=False)
    found = re.search(rf"{DB_PREFIX}[0-9a-f]{{8}}", result.output)
    assert found, result.output
    try:
        yield Run(result, directory / STORE_FILE, postgres_server, found.group(0))
    finally:
        postgres_server.drop_database(found.group(0))


@pytest.fixture
def db_copy(demo_run: Run) -> Iterator[str]:
    """A copy of the run's database, to tamper with."""
    name = f"{DB_PREFIX}copy_{uuid.uuid4().hex[:8]}"
    with demo_run.server.connect("postgres", autocommit=True) as admin:
        admin.execute(
            psycopg.sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                psycopg.sql.Identifier(name), psycopg.sql.Identifier(demo_run.dbname)
            )
        )
    try:
        yield with_dbname(demo_run.server.url, name)
    finally:
        demo_run.server.drop_database(name)


def failed(run: Run, url: str) -> set[str]:
    return {c.name for c in run_audit(run.store, url).checks if not c.ok}


def tamper(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for stmt in statements:
            conn.execute(stmt)


def test_run_passes_every_check_and_crashed_around_prepare(demo_run: Run) -> None:
    out = demo_run.result.output
    assert demo_run.result.exit_code == 0, out
    assert "all 17 checks passed" in out
    assert "died at crash point sink_prepared" in out
    assert "died at crash point after_commit" in out
    assert "kill 4/4" in out
    audit = run_audit(demo_run.store, demo_run.url)
    assert [c for c in audit.checks if not c.ok] == []
    assert audit.figures["pg_ledger"] == audit.figures["ledger"] == 2 * audit.figures["accepted"]
    assert audit.figures["pg_money"] == audit.figures["money_expected"]


def test_tables_hold_the_ledger_and_the_balances(demo_run: Run) -> None:
    with psycopg.connect(demo_run.url) as conn:
        (sides,) = conn.execute("SELECT COUNT(DISTINCT side) FROM ledger").fetchone() or (0,)
        (rows,) = conn.execute("SELECT COUNT(*) FROM balances").fetchone() or (0,)
    assert sides == 2
    assert rows > 0


def test_audit_fails_on_a_lost_ledger_row(demo_run: Run, db_copy: str) -> None:
    # The last credit of an account: the running totals before it still hold.
    tamper(
        db_copy,
        "DELETE FROM ledger WHERE (account, side, total) IN (SELECT account, side, MAX(total) "
        "FROM ledger WHERE side = 'credit' GROUP BY account, side ORDER BY account LIMIT 1)",
    )
    assert failed(demo_run, db_copy) == {ENTRIES, BALANCES}


def test_audit_fails_on_an_extra_ledger_row(demo_run: Run, db_copy: str) -> None:
    tamper(
        db_copy,
        "INSERT INTO ledger SELECT payment || '-again', side, account, amount, total "
        "FROM ledger ORDER BY payment LIMIT 1",
    )
    broken = failed(demo_run, db_copy)
    assert {ENTRIES, BALANCES} <= broken
    # The embedded checks read the topics and the store, which still agree.
    assert all(name.startswith("PostgreSQL") for name in broken)


def test_audit_fails_when_a_balance_changes(demo_run: Run, db_copy: str) -> None:
    tamper(
        db_copy,
        "UPDATE balances SET total = total + 100 "
        "WHERE (account, side) = (SELECT account, side FROM balances ORDER BY 1, 2 LIMIT 1)",
    )
    assert failed(demo_run, db_copy) == {BALANCES, MONEY}


def test_audit_fails_on_a_prepared_transaction_left_behind(demo_run: Run, db_copy: str) -> None:
    tamper(
        db_copy,
        "BEGIN",
        "UPDATE balances SET total = total WHERE account = (SELECT MIN(account) FROM balances)",
        f"PREPARE TRANSACTION '{app_gid_prefix('payments')}e.0.999.left'",
    )
    assert failed(demo_run, db_copy) == {PREPARED}


def demo_databases(server: Any) -> set[str]:
    with server.connect("postgres") as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (f"{DB_PREFIX}%",)
        ).fetchall()
    return {r[0] for r in rows}


def test_a_refused_directory_leaves_no_database(postgres_server: Any, tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    before = demo_databases(postgres_server)
    args = ["--payments", "10", "--dir", str(tmp_path), "--sink", postgres_server.url]
    result = CliRunner().invoke(demo_command, args)
    assert result.exit_code != 0
    assert "will not wipe it" in result.output
    assert demo_databases(postgres_server) == before


def test_a_server_without_prepared_transactions_is_refused_up_front(
    postgres_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onceflow import _demo_postgres

    def no_prepared(admin: Any) -> None:
        raise ConfigError("PostgreSQL has max_prepared_transactions = 0")

    monkeypatch.setattr(_demo_postgres, "_check_prepared_allowed", no_prepared)
    before = demo_databases(postgres_server)
    args = ["--payments", "10", "--dir", str(tmp_path / "d"), "--sink", postgres_server.url]
    result = CliRunner().invoke(demo_command, args)
    assert result.exit_code != 0
    assert "max_prepared_transactions = 0" in result.output
    assert demo_databases(postgres_server) == before


@pytest.mark.kafka
def test_on_kafka_the_same_checks_pass(
    kafka_broker: Any, postgres_server: Any, tmp_path: Path
) -> None:
    before = demo_databases(postgres_server)
    result = run_demo(
        store=f"kafka://{kafka_broker.bootstrap}",
        sink=postgres_server.url,
        # Slow enough that both armed workers still have commits ahead of them.
        payments=4000,
        kills=2,
        seed=10,
        rate=600,
        directory=tmp_path / "data",
        workers=2,
    )
    try:
        assert result.ok, [c for c in result.audit.checks if not c.ok] or result.error
        names = {c.name for c in result.audit.checks}
        assert {ENTRIES, TOTALS, BALANCES, MONEY, PREPARED} <= names
        assert [k.point for k in result.kills if k.done == "crash_at"] == [
            "sink_prepared",
            "after_commit",
        ]
    finally:
        for name in demo_databases(postgres_server) - before:
            postgres_server.drop_database(name)

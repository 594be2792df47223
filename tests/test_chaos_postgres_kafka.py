"""`onceflow chaos --postgres` on Kafka: two workers writing into one scratch database,
SIGKILLed at random and at every protocol step (between PREPARE TRANSACTION and COMMIT
PREPARED too), the broker SIGKILLed once, then the PostgreSQL audit against a reference
run; and the audit failing once the sink's offsets are moved ahead of the group's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest

from onceflow._chaos import run_chaos
from onceflow._chaos_postgres import ScratchDatabases, audit
from onceflow._loader import load_app

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]
ROOT = Path(__file__).resolve().parent.parent
TARGET = "tests.chaos_pg:app"


def test_chaos_postgres_on_kafka_with_worker_and_broker_kills(
    own_broker: Any,
    postgres_server: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(ROOT)
    result = run_chaos(
        TARGET,
        events=3000,
        kills=2,
        seed=7,
        workdir=str(tmp_path / "chaos"),
        store=f"kafka://{own_broker.bootstrap}",
        workers=2,
        broker=own_broker,
        broker_kills=1,
        postgres=postgres_server.url,
        keep_postgres=True,
        # The other faults run in test_chaos_kafka.py; here the ones the sink meets.
        # Not "pause" yet: a PostgresSink on Kafka whose worker is paused while a
        # successor takes over is an open hole (a zombie exits with an error, and once
        # in four runs an epoch's rows were missing from PostgreSQL): issue 8's notes.
        faults=["kill", "broker-kill", "pg-restart"],
        postgres_control=postgres_server,
    )
    dbs = ScratchDatabases(postgres_server.url, result.postgres_databases)
    try:
        assert result.ok, [c for c in result.checks if not c[1]]
        assert result.broker_kills == 1
        assert result.faults["pg-restart"] == 1
        assert {"sink_prepared", "after_commit"} <= set(result.step_kills)
        passed = {name for name, ok, _ in result.checks if ok}
        for table in ("ledger", "seen"):
            assert (
                f"PostgreSQL table '{table}' equals the reference run's (none lost, none doubled)"
                in passed
            )
            assert f"offsets of PostgresSink '{table}' not ahead of the consumer offsets" in passed
        assert "no prepared transaction left in PostgreSQL" in passed
        assert "no sink intent left pending in PostgreSQL" in passed
        assert "no transaction left open" in passed
        with psycopg.connect(dbs.chaos_url) as conn:
            (n,) = conn.execute("SELECT count(*) FROM ledger").fetchone() or (0,)
            tables = {
                r[0]
                for r in conn.execute(
                    "SELECT table_name FROM information_schema.tables "
                    "WHERE table_schema = current_schema()"
                )
            }
        assert n == 3000
        # The Kafka bookkeeping was there, and left out of the comparison.
        assert {"onceflow_sink_fences", "onceflow_sink_intents"} <= tables
        assert not any("onceflow_sink_fences" in name for name in passed)

        # The offsets check can fail: PostgreSQL ahead of the consumer group.
        with psycopg.connect(dbs.chaos_url, autocommit=True) as conn:
            conn.execute(
                "UPDATE onceflow_sink_offsets SET next_offset = next_offset + 1 "
                "WHERE sink = 'ledger'"
            )
        store, ref_store = result.stores
        checks = {
            name: (ok, detail)
            for name, ok, detail in audit(load_app(TARGET), store, dbs, ref_store)
        }
        ok, detail = checks["offsets of PostgresSink 'ledger' not ahead of the consumer offsets"]
        assert not ok and detail.startswith("AHEAD"), detail
        assert checks["offsets of PostgresSink 'seen' not ahead of the consumer offsets"][0]
    finally:
        dbs.drop()

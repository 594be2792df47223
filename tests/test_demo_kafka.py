"""The payments demo on Kafka: two workers, worker SIGKILLs, a broker SIGKILL and
restart, a live read_committed reader, then the audit; and audits that can fail.

One run on a broker of this module's own (it is killed mid-run); the tamper tests
write into that run's topics afterwards, so they come after the checks of the run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner

from onceflow import Producer
from onceflow._demo import (
    APP_NAME,
    OUTCOMES,
    DemoResult,
    demo_command,
    read_topic,
    run_audit,
    run_demo,
)
from onceflow._kafka_clients import read_committed

from .helpers import own_broker

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def demo_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Killed mid-run, so it must not be the session's broker."""
    with own_broker(tmp_path_factory.mktemp("demo-kafka")) as broker:
        yield broker


@pytest.fixture(scope="module")
def kafka_run(demo_broker: Any, tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    return run_demo(
        payments=5_000,
        kills=4,
        seed=77,
        directory=tmp_path_factory.mktemp("demo") / "data",
        rate=2_000,
        store=f"kafka://{demo_broker.bootstrap}",
        workers=2,
        broker=demo_broker,
        broker_kills=1,
        timeout=300,
    )


def failed(store: str) -> set[str]:
    return {c.name for c in run_audit(store).checks if not c.ok}


def test_every_check_passes_after_worker_and_broker_kills(kafka_run: DemoResult) -> None:
    assert kafka_run.error == ""
    bad = [c for c in kafka_run.audit.checks if not c.ok]
    assert bad == []
    names = {c.name for c in kafka_run.audit.checks}
    assert "no transaction left open" in names
    assert "a read_committed reader during the run saw each payment once, all kept" in names
    assert len(kafka_run.audit.checks) == 14


def test_the_kills_happened(kafka_run: DemoResult) -> None:
    f = kafka_run.audit.figures
    assert f["broker_kills"] == 1
    assert f["workers"] == 2
    assert all(k.done for k in kafka_run.kills)
    # The first kill is a crash inside the first commit's open transaction.
    assert kafka_run.kills[0].done == "crash_at"
    assert f["live_records"] > 0


def test_figures_on_kafka(kafka_run: DemoResult) -> None:
    f = kafka_run.audit.figures
    assert f["outcomes"] == f["distinct_payments"] == 5_000
    assert f["ledger"] == 2 * f["accepted"] > 0
    # Kafka has no same-session re-sends: every re-send comes from a new session.
    assert f["sent_resent_same_session"] == 0
    assert f["dropped_by_dedupe"] == f["sent_resent_new_session"] > 0
    assert f["dead_letters"] == f["sent_malformed"] > 0
    assert f["money"] == f["money_expected"]


def test_audit_reads_the_changelog_state(kafka_run: DemoResult) -> None:
    """Money forged into the credits changelog is found: the audit folds the changelog,
    not a worker's local copy."""
    store = kafka_run.store
    last = read_committed(store, f"{APP_NAME}.credits.changelog")[-1]
    forged = msgspec.msgpack.encode(msgspec.msgpack.decode(last.value) + 100)
    with Producer(store) as p:
        p.send(
            f"{APP_NAME}.credits.changelog",
            forged,
            key=last.key,
            partition=last.partition,
        )
    broken = failed(store)
    assert "money conserved" in broken
    assert "balances equal the fold of the ledger" in broken


def test_audit_fails_on_a_duplicated_outcome_on_kafka(kafka_run: DemoResult) -> None:
    store = kafka_run.store
    first = next(iter(read_topic(store, OUTCOMES)))
    with Producer(store) as p:
        p.send(OUTCOMES, first.value, key=first.key, partition=first.partition)
    assert "exactly one outcome per payment" in failed(store)


def test_cli_on_kafka_without_broker_kills(kafka_broker: Any, tmp_path: Path) -> None:
    args = ["--payments", "1500", "--kills", "2", "--seed", "5", "--rate", "1500"]
    args += ["--dir", str(tmp_path / "d"), "--store", f"kafka://{kafka_broker.bootstrap}"]
    result = CliRunner().invoke(demo_command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "all 14 checks passed" in result.output
    assert "no broker kills" in result.output


def test_cli_refuses_broker_kills_without_kafka(tmp_path: Path) -> None:
    args = ["--broker-kill", "true", "--broker-start", "true", "--dir", str(tmp_path / "d")]
    result = CliRunner().invoke(demo_command, args)
    assert result.exit_code != 0
    assert "--store kafka://" in result.output


def test_cli_needs_both_broker_commands(tmp_path: Path) -> None:
    result = CliRunner().invoke(demo_command, ["--broker-kill", "true"])
    assert result.exit_code != 0
    assert "go together" in result.output

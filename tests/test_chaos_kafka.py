"""`onceflow chaos` on Kafka: two workers SIGKILLed at random and at every protocol step,
the broker SIGKILLed and restarted, a read_committed consumer watching, then the audit."""

from __future__ import annotations

from pathlib import Path

import pytest

from onceflow._chaos import run_chaos

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.kafka


def test_chaos_on_kafka_with_worker_and_broker_kills(
    own_broker: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT / "examples")
    store = f"kafka://{own_broker.bootstrap}"  # type: ignore[attr-defined]
    result = run_chaos(
        "wallets:app",
        events=20_000,
        kills=3,
        seed=11,
        workdir=str(tmp_path / "chaos"),
        store=store,
        workers=2,
        broker=own_broker,  # type: ignore[arg-type]
        broker_kills=1,
    )
    assert result.ok, [c for c in result.checks if not c[1]]
    assert result.broker_kills == 1
    assert result.random_kills + len(result.step_kills) == 3 + 5
    names = [c[0] for c in result.checks]
    assert "no transaction left open" in names
    assert "a read_committed consumer during the run never saw an id twice" in names

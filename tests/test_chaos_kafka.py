"""`onceflow chaos` on Kafka with every fault kind: two workers SIGKILLed at random and at
every protocol step, paused at every step while a successor (or, in a transaction, the
other worker) takes over, two processes on one slot, two producers of one id, a starved
CPU, the broker SIGKILLed and restarted, down past the group session, and paused in a
worker's commit; a read_committed consumer watching, then the audit."""

from __future__ import annotations

from pathlib import Path

import pytest

from onceflow._chaos import run_chaos

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.kafka


def test_chaos_on_kafka_with_every_fault(
    own_broker: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT / "examples")
    store = f"kafka://{own_broker.bootstrap}"  # type: ignore[attr-defined]
    result = run_chaos(
        "wallets:app",
        events=5000,
        kills=3,
        seed=11,
        workdir=str(tmp_path / "chaos"),
        store=store,
        workers=2,
        broker=own_broker,  # type: ignore[arg-type]
        broker_kills=1,
        # Past the group session, not past the client's transactional timeout (the
        # commit whose outcome is unknown is tests/test_kafka_outage.py's), to keep it short.
        broker_pause_s=12.0,
    )
    assert result.ok, [c for c in result.checks if not c[1]]
    assert result.broker_kills == 1
    assert result.random_kills + len(result.step_kills) == 3 + 5
    assert result.faults == {
        "kill": 8,
        "pause": 5,
        "twin": 1,
        "producer-twin": 1,
        "starve": 1,
        "broker-kill": 1,
        "broker-outage": 1,
        "broker-pause-commit": 1,
    }
    assert len(result.pauses) >= 3, result.pauses
    passed = {c[0] for c in result.checks if c[1]}
    assert "no transaction left open" in passed
    assert "a read_committed consumer during the run never saw an id twice" in passed
    assert "no worker stopped by itself (every worker alive at the end)" in passed
    assert "every zombie resumed after a takeover was fenced or rejoined" in passed
    assert "of two processes of one worker slot, one stopped fenced and one ran on" in passed
    assert "two Producers of one producer_id: neither fenced, both stored what they sent" in passed

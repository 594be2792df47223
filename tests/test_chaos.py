"""`onceflow chaos` on the README's example pipeline, with every fault kind of the embedded
store (kills, pauses with a takeover, twin processors, twin producers, a starved CPU),
and on a pipeline that must fail."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from onceflow._chaos import chaos_command, run_chaos

ROOT = Path(__file__).resolve().parent.parent


def test_chaos_passes_on_the_example_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT / "examples")
    result = run_chaos("wallets:app", events=1500, kills=3, seed=7, workdir=str(tmp_path))
    assert result.ok, [c for c in result.checks if not c[1]]
    assert result.random_kills + len(result.step_kills) == 3 + 5
    assert len(result.step_kills) >= 3
    # Every fault kind of the embedded store ran; pauses at most of the five steps.
    assert result.faults == {
        "kill": 8,
        "pause": 5,
        "twin": 1,
        "producer-twin": 1,
        "starve": 1,
    }
    assert len(result.pauses) >= 3, result.pauses
    passed = {c[0] for c in result.checks if c[1]}
    assert "state equals the fold of the committed inputs" in passed
    assert "every input id once in 'results'" in passed
    assert "no worker stopped by itself (every worker alive at the end)" in passed
    assert "every zombie resumed after a takeover was fenced or rejoined" in passed
    assert "of two processes of one worker slot, one stopped fenced and one ran on" in passed
    assert "two Producers of one producer_id: the older fenced, and re-sent" in passed


def test_chaos_command_reports_and_exits_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT / "examples")
    args = ["wallets:app", "--events", "600", "--kills", "2", "--faults", "kill,twin"]
    out = CliRunner().invoke(chaos_command, [*args, "--dir", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "exactly-once holds" in out.output
    assert "│ twin " in out.output and "│ pause " not in out.output


def test_chaos_command_refuses_a_fault_the_store_cannot_have(tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(chaos_command, ["wallets:app", "--faults", "broker-outage"])
    assert out.exit_code == 2
    assert "broker-outage cannot run here" in out.output
    out = runner.invoke(chaos_command, ["wallets:app", "--faults", "kill,hiccup"])
    assert out.exit_code == 2
    assert "unknown hiccup" in out.output


def test_chaos_fails_a_pipeline_whose_effects_differ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    result = run_chaos(
        "tests.pipelines:nondeterministic_app",
        events=300,
        kills=1,
        seed=1,
        workdir=str(tmp_path),
        faults=["kill"],
    )
    assert not result.ok
    failed = [name for name, ok, _ in result.checks if not ok]
    assert "committed outputs equal the reference fold (none lost, none doubled)" in failed


def test_the_audit_says_where_a_lost_id_is(tmp_path: Path) -> None:
    """A lost id is located: in the input at a partition and offset (the pipeline skipped
    it), or not in the input at all (the input lost it)."""
    from onceflow._chaos import ChaosResult, _locate_lost
    from onceflow.testing import Event, Snapshot, send

    store = str(tmp_path / "s.db")
    evs = [Event("in", {"n": i}, key="k", id=f"e{i}") for i in range(4)]
    send(store, evs[:2])
    send(store, [Event("dlq", {"n": 0}, key="k", id="e0")])
    expected, actual = Snapshot(), Snapshot()
    expected.outputs[("out", "k")] = [(b"1", f"e{i}", ()) for i in range(4)]
    actual.outputs[("out", "k")] = [(b"1", "e3", ())]
    result = ChaosResult(events=3)
    _locate_lost(result, actual, expected, evs, store, "dlq")
    [(_name, ok, detail)] = result.checks
    assert not ok
    assert detail == ("3 lost: e0 in[0]@0, dead-lettered (), e1 in[0]@1, e2 not in the input"), (
        detail
    )

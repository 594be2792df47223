"""The payments demo: a small run end to end, and an audit that can fail.

One demo run (3,000 payments, 3 kills) is shared by the module; the tamper tests work
on copies of its store, so each one starts from a store that passed the audit.
"""

from __future__ import annotations

import random
import shutil
import sqlite3
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner, Result

from onceflow import Consumer, Producer
from onceflow._demo import (
    APP_NAME,
    LEDGER,
    MARKER,
    OUTCOMES,
    STORE_FILE,
    audit_payments,
    demo_command,
    make_app,
    plan_kills,
    prepare_dir,
    run_audit,
)
from onceflow._errors import ConfigError


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Path]:
    directory = tmp_path_factory.mktemp("demo") / "data"
    # A modest producer rate keeps the pipeline busy while the kills land, so that each
    # kill interrupts real work instead of an idle process.
    args = ["--payments", "3000", "--kills", "3", "--seed", "1234"]
    args += ["--dir", str(directory), "--rate", "3000"]
    result = CliRunner().invoke(demo_command, args, catch_exceptions=False)
    return result, directory / STORE_FILE


@pytest.fixture
def store_copy(demo_run: tuple[Result, Path], tmp_path: Path) -> Path:
    _, store = demo_run
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{store}{suffix}")
        if src.exists():
            shutil.copy(src, tmp_path / f"{STORE_FILE}{suffix}")
    return tmp_path / STORE_FILE


def first_record(store: Path, topic: str) -> tuple[str | None, bytes]:
    with Consumer(store, group="test-tamper", topics=[topic]) as c:
        rec = c.poll(max_records=1)[0]
    return rec.key, rec.value


def failed(store: Path) -> set[str]:
    return {name for name, ok, _ in audit_payments(store) if not ok}


def test_small_run_exits_zero_and_every_check_passes(demo_run: tuple[Result, Path]) -> None:
    result, store = demo_run
    assert result.exit_code == 0, result.output
    assert "all 12 checks passed" in result.output
    checks = audit_payments(store)
    assert len(checks) == 12
    assert [c for c in checks if not c.ok] == []


def test_small_run_killed_the_pipeline_inside_the_protocol(
    demo_run: tuple[Result, Path],
) -> None:
    result, _ = demo_run
    assert "kill 3/3" in result.output
    assert "died at crash point" in result.output


def test_small_run_figures(demo_run: tuple[Result, Path]) -> None:
    _, store = demo_run
    f = run_audit(store).figures
    assert f["outcomes"] == f["distinct_payments"] == 3000
    assert f["accepted"] + f["rejected"] == 3000
    assert f["accepted"] > 0 and f["rejected"] > 0
    assert f["ledger"] == 2 * f["accepted"]
    assert f["dropped_by_dedupe"] == f["sent_resent_new_session"] > 0
    assert f["sent_dropped_by_log"] == f["sent_resent_same_session"] > 0
    assert f["dead_letters"] == f["sent_malformed"] > 0
    assert f["money"] == f["money_expected"]


def test_audit_fails_on_a_duplicated_ledger_entry(store_copy: Path) -> None:
    key, value = first_record(store_copy, LEDGER)
    with Producer(store_copy) as p:
        p.send(LEDGER, value, key=key)
    broken = failed(store_copy)
    assert "one debit and one credit per accepted payment, none otherwise" in broken
    assert "balances equal the fold of the ledger" in broken
    assert "exactly one outcome per payment" not in broken


def test_audit_fails_on_a_duplicated_outcome(store_copy: Path) -> None:
    key, value = first_record(store_copy, OUTCOMES)
    with Producer(store_copy) as p:
        p.send(OUTCOMES, value, key=key)
    assert failed(store_copy) == {
        "exactly one outcome per payment",
        # Duplicates dropped by dedupe are counted as log payments less outcomes.
        "new-session re-sends dropped by dedupe",
    }


def test_audit_fails_when_money_appears_in_state(store_copy: Path) -> None:
    conn = sqlite3.connect(store_copy, isolation_level=None)
    try:
        part, key, raw = conn.execute(
            "SELECT part, key, value FROM state WHERE app=? AND step='credits' LIMIT 1",
            (APP_NAME,),
        ).fetchone()
        forged = msgspec.msgpack.encode(msgspec.msgpack.decode(raw) + 100)
        conn.execute(
            "UPDATE state SET value=? WHERE app=? AND step='credits' AND part=? AND key=?",
            (forged, APP_NAME, part, key),
        )
    finally:
        conn.close()
    assert failed(store_copy) == {"money conserved", "balances equal the fold of the ledger"}


def test_audit_of_a_missing_store_fails(tmp_path: Path) -> None:
    checks = audit_payments(tmp_path / "nothing.db")
    assert checks and not any(c.ok for c in checks)


def test_refuses_to_wipe_a_directory_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    result = CliRunner().invoke(demo_command, ["--payments", "10", "--dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "will not wipe it" in result.output
    assert (tmp_path / "precious.txt").exists()
    assert not (tmp_path / MARKER).exists()


def test_app_builds() -> None:
    make_app("unused.db").build()


@pytest.mark.parametrize("kills", [1, 3, 6, 10])
def test_kill_plan_starts_inside_the_commit(kills: int) -> None:
    plan = plan_kills(kills, random.Random(kills))
    assert len(plan) == kills
    assert (plan[0].how, plan[0].point, plan[0].nth) == ("crash_at", "in_transaction", 1)
    assert sum(k.how == "crash_at" for k in plan) == max(1, kills // 3)
    assert any(k.how == "signal" for k in plan) == (kills > 1)


@pytest.mark.parametrize("kills", [1, 2, 4, 6, 10])
def test_kill_plan_with_a_sink_crashes_around_prepare(kills: int) -> None:
    plan = plan_kills(kills, random.Random(kills), sink=True)
    assert len(plan) == kills
    points = [k.point for k in plan if k.how == "crash_at"]
    assert (plan[0].how, plan[0].point, plan[0].nth) == ("crash_at", "sink_prepared", 1)
    assert ("after_commit" in points) == (kills >= 2)
    assert len(points) == min(kills, max(2, kills // 3))


def test_kill_plan_without_a_sink_never_arms_sink_points() -> None:
    points = {k.point for n in range(1, 20) for k in plan_kills(n, random.Random(n))}
    assert not points & {"sink_prepared", "sink_flush", "effect_called"}


def test_no_kills_is_a_valid_plan() -> None:
    assert plan_kills(0, random.Random(0)) == []


def test_refuses_a_file_as_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        prepare_dir(tmp_path / "file")

"""The `onceflow` command, run through click's CliRunner against real SQLite stores."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from onceflow import App, ConfigError, FencedError, FileSink, Producer
from onceflow._cli import OnceflowGroup, age, cli
from onceflow._settings import ENV_HELP
from onceflow._sqlite import SQLiteStore
from onceflow._status import reset_app, status

APP = "pay"

# Every test here takes well under a second; a hang (a run without --until-idle, a
# follow that never ends) must fail fast rather than hold the suite for the default.
pytestmark = pytest.mark.timeout(60)

PIPELINE = """
from onceflow import App

app = App({name!r}, store={store!r})
(app.source("payments")
    .dedupe(name="ids", key=lambda v: v["id"], ttl=3600)
    .reduce(name={step!r}, fn=lambda acc, v: acc + v["amount"], initial=0)
    .to("balances"))
"""


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The CLI reads ONCEFLOW_STORE and `run` imports from the working directory; neither
    # may leak in from the environment or out into other tests.
    monkeypatch.delenv("ONCEFLOW_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "store.db")


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env)


def ok(*args: str, env: dict[str, str] | None = None) -> Result:
    result = invoke(*args, env=env)
    assert result.exit_code == 0, result.output
    return result


def assert_clean_error(result: Result, fragment: str) -> None:
    """Exit 1, one `Error:` line on stderr, no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert result.stderr.startswith("Error: ") or "\nError: " in result.stderr
    assert fragment in result.stderr


def build_app(store: str, name: str = APP, step: str = "balances") -> App:
    app = App(name, store=store)
    (
        app.source("payments")
        .dedupe(name="ids", key=lambda v: v["id"], ttl=3600)
        .reduce(name=step, fn=lambda acc, v: acc + v["amount"], initial=0)
        .to("balances")
    )
    return app


def send_payments(
    store: str, n: int, *, start: int = 0, partitions: int = 1, accounts: int = 3
) -> None:
    """Payments pay-<i> of amount i to acct-<i % accounts>. With 2 partitions, acct-0..3
    hash to partition 1 and acct-4, acct-5 to partition 0."""
    with Producer(store, partitions=partitions) as p:
        for i in range(start, start + n):
            p.send("payments", {"id": f"pay-{i}", "amount": i}, key=f"acct-{i % accounts}")


def write_pipeline(tmp_path: Path, store: str, name: str = APP, step: str = "balances") -> str:
    """A pipeline module in the working directory; a fresh module name per call, since
    an imported module is cached for the rest of the test session."""
    module = f"pipeline_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(PIPELINE.format(name=name, store=store, step=step))
    return f"{module}:app"


def status_json(store: str, *extra: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads(ok("--store", store, "status", "--json", *extra).stdout)
    return data


def balances(store: str) -> dict[str, int]:
    """The latest committed balance per account."""
    recs = jsonl(ok("--store", store, "tail", "balances", "--from-beginning", "--json"))
    return {rec["key"]: json.loads(rec["value"]) for rec in recs}


# -- group ------------------------------------------------------------------------


def test_help_lists_commands_and_environment() -> None:
    out = ok("--help").stdout
    for name in ("run", "topics", "tail", "status", "reset", "demo", "chaos"):
        assert re.search(rf"^\s+{name}\s", out, re.M), name
    assert "Run the payments demo" in out
    assert "Kill a pipeline repeatedly" in out
    for var in ENV_HELP:
        assert var in out


def test_version() -> None:
    assert ok("--version").stdout.strip() == "onceflow, version 0.1.0"


def test_python_dash_m() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "onceflow", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "tail" in proc.stdout and "ONCEFLOW_STORE" in proc.stdout


def test_missing_store_is_refused_not_created(tmp_path: Path) -> None:
    for cmd in (["topics"], ["tail", "x"], ["status"], ["reset", APP, "--yes"]):
        assert_clean_error(invoke("--store", "nope.db", *cmd), "store 'nope.db' does not exist")
    assert not (tmp_path / "nope.db").exists()


def test_store_after_the_command_overrides_the_group_and_env(tmp_path: Path) -> None:
    a, b = str(tmp_path / "a.db"), str(tmp_path / "b.db")
    send_payments(a, 1)
    with Producer(b) as p:
        p.send("other", "x")
    assert "other" in ok("--store", a, "topics", "--store", b).stdout
    assert "payments" in ok("topics", env={"ONCEFLOW_STORE": a}).stdout
    assert "other" in ok("--store", b, "topics", env={"ONCEFLOW_STORE": a}).stdout


# -- lazy commands ------------------------------------------------------------------


def test_lazy_commands_load_on_demand_and_fail_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, db: str
) -> None:
    send_payments(db, 2)
    broken = f"broken_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{broken}.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    group = OnceflowGroup(
        lazy_commands={
            "ghost": ("onceflow._no_such_module:command", "Ghost help."),
            "broken": (f"{broken}:command", "Broken help."),
            "notcmd": ("onceflow._cli:main", "Not a command."),
            "ls": ("onceflow._cli:topics", "Topics, loaded lazily."),
        }
    )
    runner = CliRunner()
    help_text = runner.invoke(group, ["--help"]).stdout
    assert "Ghost help." in help_text and "Topics, loaded lazily." in help_text
    assert_clean_error(runner.invoke(group, ["ghost", "--any", "arg"]), "'ghost' command")
    assert_clean_error(runner.invoke(group, ["notcmd"]), "not a click command")
    assert_clean_error(runner.invoke(group, ["broken"]), "RuntimeError: boom")
    listed = runner.invoke(group, ["ls", "--store", db])
    assert listed.exit_code == 0, listed.output
    assert "payments" in listed.stdout


@pytest.mark.parametrize("name", ["demo", "chaos"])
def test_registered_lazy_commands_resolve(name: str) -> None:
    # The import paths are strings; a rename on either side shows up here, not in use.
    out = ok(name, "--help").stdout
    assert out.startswith(f"Usage: cli {name} ") and "is not available" not in out


# -- run ----------------------------------------------------------------------------


def test_run_uses_the_apps_own_store_unless_given_one(tmp_path: Path) -> None:
    own, other = str(tmp_path / "own.db"), str(tmp_path / "other.db")
    send_payments(own, 4)
    target = write_pipeline(tmp_path, own)
    out = ok("run", target, "--until-idle").stdout
    assert f"app '{APP}' (store {own}): 4 records in, 4 out" in out

    send_payments(other, 2)
    out = ok("run", target, "--until-idle", "--store", other).stdout
    assert "2 records in" in out and other in out
    out = ok("run", target, "--until-idle", env={"ONCEFLOW_STORE": other}).stdout
    assert "0 records in" in out and other in out
    assert status_json(own)[0]["commits"] == 1


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("nosuchmodule:app", "cannot import module 'nosuchmodule'"),
        ("nocolon", "is not MODULE:ATTRIBUTE"),
        ("onceflow:__version__", "is a str, not an onceflow App"),
    ],
)
def test_run_bad_target_is_a_clean_error(target: str, message: str) -> None:
    assert_clean_error(invoke("run", target), message)


def test_run_library_error_is_clean_and_its_reset_hint_works(tmp_path: Path, db: str) -> None:
    send_payments(db, 3)
    ok("run", write_pipeline(tmp_path, db), "--until-idle")
    changed = invoke("run", write_pipeline(tmp_path, db, step="totals"), "--until-idle")
    assert_clean_error(changed, "changed its stateful steps")
    assert changed.stderr.count("\n") == 1
    # The TopologyError tells the operator what to type; it must work as printed.
    hint = re.search(r"`onceflow (reset [^`]+)`", changed.stderr)
    assert hint is not None
    ok(*hint.group(1).split(), "--yes")
    rerun = ok("run", write_pipeline(tmp_path, db, step="totals"), "--until-idle")
    assert "3 records in" in rerun.stdout


# -- topics -------------------------------------------------------------------------


def test_topics_table_and_json(db: str) -> None:
    send_payments(db, 5, partitions=2)
    with Producer(db) as p:
        p.send("audit", "x")
    table = ok("--store", db, "topics").stdout
    assert re.search(r"payments\s+\S\s+2\s+\S\s+5", table), table
    data = json.loads(ok("--store", db, "topics", "--json").stdout)
    assert data == [
        {"name": "audit", "partitions": 1, "records": 1},
        {"name": "payments", "partitions": 2, "records": 5},
    ]


def test_topics_on_a_store_without_topics(db: str) -> None:
    SQLiteStore(db).close()
    assert "no topics" in ok("--store", db, "topics").stdout
    assert json.loads(ok("--store", db, "topics", "--json").stdout) == []


# -- tail ---------------------------------------------------------------------------


def jsonl(result: Result) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def offsets(out: str) -> list[int]:
    return [int(m) for m in re.findall(r"^p\d+@(\d+) ", out, re.M)]


def test_tail_starting_points(db: str) -> None:
    send_payments(db, 15)
    assert offsets(ok("--store", db, "tail", "payments").stdout) == list(range(5, 15))
    assert offsets(ok("--store", db, "tail", "payments", "-n", "3").stdout) == [12, 13, 14]
    assert offsets(ok("--store", db, "tail", "payments", "--from-beginning").stdout) == list(
        range(15)
    )
    assert ok("--store", db, "tail", "payments", "--from-end").stdout == ""


def test_tail_formats_keys_ids_headers_and_any_bytes(db: str) -> None:
    with Producer(db) as p:
        p.send("t", {"a": 1}, key="k", id="e-1", headers={"h": "v"})
        p.send("t", b"\xff\x00")
        p.send("t", "two\nlines")
    lines = ok("--store", db, "tail", "t").stdout.splitlines()
    assert lines == [
        'p0@0 key=k id=e-1 headers={"h": "v"} {"a":1}',
        "p0@1 key=None id=None b'\\xff\\x00'",
        "p0@2 key=None id=None 'two\\nlines'",
    ]
    recs = jsonl(ok("--store", db, "tail", "t", "--json"))
    assert recs[0]["headers"] == {"h": "v"} and recs[0]["id"] == "e-1"
    assert (recs[0]["value"], recs[0]["encoding"]) == ('{"a":1}', "utf-8")
    assert (recs[1]["value"], recs[1]["encoding"]) == ("ff00", "hex")
    assert recs[2]["value"] == "two\nlines"


def test_tail_across_partitions_and_one_partition(db: str) -> None:
    send_payments(db, 12, partitions=2, accounts=6)
    both = jsonl(ok("--store", db, "tail", "payments", "--json", "--from-beginning"))
    assert sorted(json.loads(r["value"])["amount"] for r in both) == list(range(12))
    # The latest records of the topic, whichever partition they sit on.
    latest = jsonl(ok("--store", db, "tail", "payments", "--json", "-n", "4"))
    assert [json.loads(r["value"])["id"] for r in latest] == [f"pay-{i}" for i in range(8, 12)]
    one = jsonl(ok("--store", db, "tail", "payments", "-p", "1", "--from-beginning", "--json"))
    assert one == [r for r in both if r["partition"] == 1] and one
    assert_clean_error(invoke("--store", db, "tail", "payments", "-p", "2"), "has 2 partition")
    assert_clean_error(invoke("--store", db, "tail", "nope"), "topic 'nope' does not exist")


def test_tail_never_moves_an_offset(db: str) -> None:
    send_payments(db, 3)
    ok("--store", db, "tail", "payments", "--from-beginning")
    with closing(SQLiteStore(db)) as store:
        assert store.groups() == []


def test_tail_follow_prints_new_records_until_ctrl_c(db: str) -> None:
    send_payments(db, 1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "onceflow", "--store", db, "tail", "payments", "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A test runner started in the background may ignore SIGINT; the CLI must not.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    watchdog = threading.Timer(30, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("p0@0 ")
        send_payments(db, 1, start=1)
        assert proc.stdout.readline().startswith("p0@1 ")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        watchdog.cancel()
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err


# -- status -------------------------------------------------------------------------


def test_status_numbers_match_the_store(db: str) -> None:
    send_payments(db, 6, partitions=2, accounts=6)
    with Producer(db) as p:
        p.send("payments", {"id": "pay-0", "amount": 0}, key="acct-0")  # a duplicate id
        p.send("payments", b"{not json", key="acct-1")  # a dead letter
    stats = build_app(db).run(until_idle=True)
    assert (stats.duplicates, stats.dead_letters) == (1, 1)

    [app] = status_json(db)
    assert app["name"] == APP and app["commits"] == stats.commits and app["lag"] == 0
    assert app["dead_letter_topic"] == "pay.dead-letters" and app["dead_letters"] == 1
    with closing(SQLiteStore(db)) as store:
        ends, committed = store.end_offsets("payments"), store.committed(APP, "payments")
    assert ends == committed and sum(ends.values()) == 8
    assert [
        (
            p["topic"],
            p["partition"],
            p["end_offset"],
            p["committed_offset"],
            p["lag"],
            p["lease_epoch"],
        )
        for p in app["partitions"]
    ] == [("payments", part, ends[part], ends[part], 0, 1) for part in (0, 1)]
    steps = {s["name"]: s for s in app["steps"]}
    assert steps["ids"]["kind"] == "dedupe" and steps["ids"]["dedup_keys"] == 6
    assert steps["ids"]["oldest_dedup_seen"] is not None
    assert steps["balances"]["kind"] == "reduce" and steps["balances"]["state_keys"] == 6

    send_payments(db, 4, start=100, partitions=2, accounts=6)
    [app] = status_json(db, "--app", APP)
    assert app["lag"] == 4
    assert {p["partition"]: p["committed_offset"] for p in app["partitions"]} == committed

    text = ok("--store", db, "status").stdout
    assert f"app {APP}: {stats.commits} commits" in text and "lag 4" in text
    assert "1 dead letters in pay.dead-letters" in text
    assert re.search(r"ids\s+\S\s+dedupe\s+\S\s+payments\s+\S\s+6\s", text), text


def test_status_functions_are_plain_data(db: str) -> None:
    send_payments(db, 2)
    build_app(db).run(until_idle=True)
    with closing(SQLiteStore(db)) as store:
        [app] = status(store)
    assert app.name == APP and app.partitions[0].committed_offset == 2 and app.sinks == []


def test_status_reports_outbox_sinks(tmp_path: Path, db: str) -> None:
    send_payments(db, 3)
    app = App("files", store=db)
    app.source("payments").sink(FileSink(tmp_path / "out.txt", name="file"))
    app.run(until_idle=True)
    [st] = status_json(db, "--app", "files")
    assert st["sinks"] == [
        {
            "name": "file",
            "pending_epochs": 0,
            "delivered_epochs": st["commits"],
            "position": (tmp_path / "out.txt").stat().st_size,
        }
    ]


def test_status_without_apps_and_unknown_app(db: str) -> None:
    send_payments(db, 1)
    assert "no apps" in ok("--store", db, "status").stdout
    assert status_json(db) == []
    assert_clean_error(invoke("--store", db, "status", "--app", "ghost"), "no app named 'ghost'")


def test_age() -> None:
    assert age(None) == "never"
    assert age(100.0, now=104.4) == "4s ago"
    assert age(0.0, now=192.0) == "3m 12s ago"
    assert age(0.0, now=2 * 3600 + 5 * 60) == "2h 5m ago"
    assert age(0.0, now=3 * 86400 + 4 * 3600) == "3d 4h ago"


# -- reset --------------------------------------------------------------------------


def test_reset_refuses_without_yes(db: str) -> None:
    send_payments(db, 3)
    build_app(db).run(until_idle=True)
    before = status_json(db)
    result = invoke("reset", APP, "--store", db)
    assert_clean_error(result, "without --yes")
    assert "3 dedup keys" in result.stderr
    assert status_json(db) == before


def test_reset_then_rerun_reprocesses_from_zero(db: str) -> None:
    send_payments(db, 6)
    build_app(db).run(until_idle=True)
    first = balances(db)
    assert first == {"acct-0": 3, "acct-1": 5, "acct-2": 7}

    out = ok("reset", APP, "--store", db, "--yes").stdout
    assert "1 committed offsets, 3 state keys, 6 dedup keys, 1 leases" in out
    assert status_json(db) == []
    with closing(SQLiteStore(db)) as store:
        assert store.committed(APP, "payments") == {}
        assert [t[0] for t in store.topics()] == ["balances", "pay.dead-letters", "payments"]

    stats = build_app(db).run(until_idle=True)
    # From offset 0, with empty state and no remembered ids: the same balances again,
    # neither dropped as duplicates nor added onto the old totals.
    assert (stats.records_in, stats.duplicates) == (6, 0)
    assert balances(db) == first


def test_reset_fences_an_instance_still_running(db: str) -> None:
    send_payments(db, 3)
    app = build_app(db)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            app.run()
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while not status_json(db) or status_json(db)[0]["lag"]:
            assert time.monotonic() < deadline, "the app never committed"
            time.sleep(0.02)
        ok("reset", APP, "--store", db, "--yes")
        send_payments(db, 1, start=3)
        worker.join(10)
    finally:
        app.stop()
        worker.join(10)
    assert [type(e) for e in errors] == [FencedError]
    assert status_json(db) == []


def test_reset_unknown_app_and_group_store_option(db: str) -> None:
    send_payments(db, 1)
    build_app(db).run(until_idle=True)
    assert_clean_error(invoke("--store", db, "reset", "ghost", "--yes"), "no app named 'ghost'")
    assert_clean_error(invoke("--store", db, "reset", "ghost"), "no app named 'ghost'")
    ok("--store", db, "reset", APP, "--yes")
    with closing(SQLiteStore(db)) as store, pytest.raises(ConfigError, match="no app named"):
        reset_app(store, APP)


def test_status_shows_retention_and_a_custom_dead_letter_topic(db: str) -> None:
    with Producer(db) as p:
        p.send_batch("in", [(None, {"n": 1}, "a"), (None, b"not json", "b")])
    app = App("ret", store=db, dead_letter_topic="ret-bad")
    app.source("in").dedupe(name="ids", ttl=7 * 86400, max_keys=1000).to("out")
    app.run(until_idle=True)
    (st,) = status_json(db, "--app", "ret")
    assert st["dead_letter_topic"] == "ret-bad" and st["dead_letters"] == 1
    (step,) = st["steps"]
    assert step["retention"] == "ttl 7d, newest 1,000"
    assert "ttl 7d, newest 1,000" in ok("--store", db, "status", "--app", "ret").stdout

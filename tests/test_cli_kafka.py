"""The `onceflow` command on Kafka: status, topics, tail, reset and `run --worker`,
against the session's real broker, each test in a namespace of its own."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from onceflow import App, Producer
from onceflow._cli import cli
from onceflow._kafka_common import KafkaURL

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]

PIPELINE = """
from onceflow import App

app = App("pay", store={store!r}, partitions=2)
(app.source("payments")
    .dedupe(name="ids", key=lambda v: v["id"], ttl=3600)
    .reduce(name="balances", fn=lambda acc, v: acc + v["amount"], initial=0)
    .to("balances"))
"""


@pytest.fixture
def kstore(kafka_broker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    # The CLI reads ONCEFLOW_STORE and `run` imports from the working directory; neither
    # may leak in from the environment or out into other tests.
    monkeypatch.setenv("ONCEFLOW_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("ONCEFLOW_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return f"kafka://{kafka_broker.bootstrap}/t{uuid.uuid4().hex[:10]}"


def ok(*args: str) -> Result:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result


def fails(*args: str, code: int = 1) -> Result:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result


def status_json(store: str, *extra: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(ok("status", "--store", store, "--json", *extra).stdout)
    return data


def jsonl(result: Result) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def send_payments(store: str, ids: list[int]) -> None:
    """Payments pay-<i> of amount i to acct-<i % 6>; acct-4 and acct-5 hash to
    partition 0 of 2, the others to partition 1."""
    with Producer(store, partitions=2) as p:
        for i in ids:
            p.send("payments", {"id": f"pay-{i}", "amount": i}, key=f"acct-{i % 6}", id=str(i))


def pay_app(store: str) -> App:
    app = App("pay", store=store, partitions=2)
    (
        app.source("payments")
        .dedupe(name="ids", key=lambda v: v["id"], ttl=3600)
        .reduce(name="balances", fn=lambda acc, v: acc + v["amount"], initial=0)
        .to("balances")
    )
    return app


def groups(store: str) -> set[str]:
    from confluent_kafka.admin import AdminClient

    url = KafkaURL.parse(store)
    # Kept in a variable: a client collected while its request is in flight answers
    # with an empty list.
    admin = AdminClient({"bootstrap.servers": url.bootstrap})
    found = admin.list_consumer_groups(request_timeout=15).result()
    return {
        url.strip(g.group_id) for g in found.valid if g.group_id.startswith(url.namespace + ".")
    }


def test_status_topics_and_tail_after_a_run(kstore: str) -> None:
    send_payments(kstore, [1, 2, 3, 4, 5, 6, 3])  # the second pay-3 is a re-send
    pay_app(kstore).run(until_idle=True)
    # A stateless app leaves no topology: its sources are found from its group's
    # offsets. It reads a transactional topic, whose commit markers take offsets.
    mirror = App("mirror", store=kstore)
    mirror.source("balances").map(lambda v: v).to("mirror")
    mirror.run(until_idle=True)

    data = status_json(kstore)
    apps = {a["name"]: a for a in data["apps"]}
    assert sorted(apps) == ["mirror", "pay"]
    pay = apps["pay"]
    assert pay["lag"] == 0
    assert [(p["topic"], p["partition"]) for p in pay["partitions"]] == [
        ("payments", 0),
        ("payments", 1),
    ]
    for p in pay["partitions"]:
        assert p["committed_offset"] == p["end_offset"]
        assert p["lag"] == 0
    assert sum(p["committed_offset"] for p in pay["partitions"]) == 7
    assert {s["name"]: (s["kind"], s["changelog"]) for s in pay["steps"]} == {
        "balances": ("reduce", "pay.payments.changelog"),
        "ids": ("dedupe", "pay.payments.changelog"),
    }
    assert pay["transaction_timeout_seconds"] == 10.0
    assert pay["dead_letter_end_offset"] == 0
    assert pay["group"] == f"{KafkaURL.parse(kstore).namespace}.pay"
    mirror_parts = apps["mirror"]["partitions"]
    assert [(p["topic"], p["partition"]) for p in mirror_parts] == [
        ("balances", 0),
        ("balances", 1),
    ]
    assert all(p["lag"] == 0 for p in mirror_parts)
    # Caught up, though the offset after its last record is the commit marker's.
    assert {p["end_offset"] - p["committed_offset"] for p in mirror_parts} == {1}
    assert data["open_transactions"] == []

    text = ok("status", "--store", kstore).stdout
    assert "app pay: group" in text
    assert "lag 0" in text
    assert "no open transactions" in text
    only = status_json(kstore, "--app", "mirror")
    assert [a["name"] for a in only["apps"]] == ["mirror"]

    topics = {t["name"]: t for t in json.loads(ok("topics", "--store", kstore, "--json").stdout)}
    assert {"payments", "balances", "mirror", "pay.meta", "pay.payments.changelog"} <= set(topics)
    assert topics["payments"]["partitions"] == 2
    assert sum(topics["payments"]["end_offsets"]) == 7
    assert "pay.payments.changelog" in ok("topics", "--store", kstore).stdout

    recs = jsonl(ok("tail", "balances", "--store", kstore, "--from-beginning", "--json"))
    assert len(recs) == 6  # the re-send was dropped
    final = {r["key"]: json.loads(r["value"]) for r in recs}
    assert final == {f"acct-{i % 6}": i for i in range(1, 7)}
    last = ok("tail", "balances", "--store", kstore, "-n", "2").stdout.splitlines()
    assert len(last) == 2
    assert all(line.startswith("p") and " key=acct-" in line for line in last)
    assert ok("tail", "balances", "--store", kstore, "--from-end").stdout == ""
    one = jsonl(ok("tail", "payments", "--store", kstore, "-p", "1", "--from-beginning", "--json"))
    assert one and {r["partition"] for r in one} == {1}
    assert {r["id"] for r in jsonl(ok("tail", "payments", "--store", kstore, "--json"))} == {
        "1",
        "2",
        "3",
        "4",
        "5",
        "6",
    }

    # Looking joined no group and committed nothing: only the two apps have groups.
    assert groups(kstore) == {"pay", "mirror"}

    err = fails("tail", "nope", "--store", kstore)
    assert "topic 'nope' does not exist" in err.stderr
    err = fails("status", "--store", kstore, "--app", "nope")
    assert "no app named 'nope'" in err.stderr
    assert "mirror, pay" in err.stderr


def test_status_of_a_stateless_app_before_its_first_commit(kstore: str) -> None:
    app = App("quiet", store=kstore)
    app.source("silence").map(lambda v: v).to("echo")
    app.run(until_idle=True)
    with Producer(kstore) as p:
        for i in range(3):
            p.send("silence", {"n": i})
    # No stateful step and no committed offset: the App's recorded config names its
    # sources, and --topic names them explicitly too.
    (found,) = status_json(kstore, "--app", "quiet")["apps"]
    assert found["partitions"] == [
        {"topic": "silence", "partition": 0, "end_offset": 3, "committed_offset": None, "lag": 3}
    ]
    (found,) = status_json(kstore, "--app", "quiet", "--topic", "silence")["apps"]
    assert found["partitions"] == [
        {"topic": "silence", "partition": 0, "end_offset": 3, "committed_offset": None, "lag": 3}
    ]
    assert found["lag"] == 3
    fails("status", "--store", kstore, "--topic", "silence", code=2)


def test_status_shows_open_and_hanging_transactions_until_aborted(kstore: str) -> None:
    from confluent_kafka import Producer as KafkaProducer

    url = KafkaURL.parse(kstore)
    with Producer(kstore, partitions=2) as p:
        p.send("pending", {"committed": True}, partition=0)
    txn = KafkaProducer(
        {"bootstrap.servers": url.bootstrap, "transactional.id": url.topic("test-txn")}
    )
    txn.init_transactions(30)
    txn.begin_transaction()
    now_ms = int(time.time() * 1000)
    txn.produce(url.topic("pending"), b"fresh", partition=0, timestamp=now_ms)
    # A record stamped two minutes ago stands for a transaction open that long: past
    # any onceflow App's timeout, so the broker should have aborted it.
    txn.produce(url.topic("pending"), b"stale", partition=1, timestamp=now_ms - 120_000)
    assert txn.flush(30) == 0
    try:
        open_txns = {t["partition"]: t for t in status_json(kstore)["open_transactions"]}
        assert sorted(open_txns) == [0, 1]
        fresh, stale = open_txns[0], open_txns[1]
        assert fresh["topic"] == "pending"
        assert (fresh["stable_offset"], fresh["end_offset"]) == (1, 2)
        assert 0 <= fresh["age_seconds"] < 60
        assert not fresh["hanging"]
        assert stale["age_seconds"] >= 110
        assert stale["hanging"]
        assert stale["app"] is None
        assert stale["timeout_seconds"] == 10.0
        text = ok("status", "--store", kstore).stdout
        assert "2 open transaction(s)" in text
        rows = [line for line in text.splitlines() if "pending" in line]
        assert len(rows) == 2
        assert "open" in rows[0] and "HANGING" not in rows[0]
        assert "HANGING" in rows[1] and "10s" in rows[1]
        # read_committed: the open transaction's records are not shown.
        shown = jsonl(ok("tail", "pending", "--store", kstore, "--from-beginning", "--json"))
        assert [r["value"] for r in shown] == ['{"committed":true}']
    finally:
        txn.abort_transaction(30)
    assert status_json(kstore)["open_transactions"] == []
    assert "no open transactions" in ok("status", "--store", kstore).stdout


def test_tail_follow_prints_committed_records_until_ctrl_c(kstore: str) -> None:
    with Producer(kstore) as p:
        p.send("events", {"n": 0}, key="k")
    proc = subprocess.Popen(
        [sys.executable, "-m", "onceflow", "--store", kstore, "tail", "events", "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A test runner started in the background may ignore SIGINT; the CLI must not.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    watchdog = threading.Timer(45, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("p0@0 key=k ")
        with Producer(kstore) as p:
            p.send("events", {"n": 1}, key="k")
        assert proc.stdout.readline().startswith("p0@1 key=k ")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        watchdog.cancel()
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert groups(kstore) == set()


def test_reset_is_refused_with_what_to_do_instead(kstore: str) -> None:
    for extra in ((), ("--yes",)):
        err = fails("reset", "pay", "--store", kstore, *extra).stderr
        assert "reset is not available on Kafka" in err
        assert "new app name" in err
        assert "namespace" in err


def test_run_takes_a_worker_slot(kstore: str, tmp_path: Path) -> None:
    module = f"pipeline_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(PIPELINE.format(store=kstore))
    send_payments(kstore, [1, 2, 3])
    out = ok("run", f"{module}:app", "--store", kstore, "--worker", "3", "--until-idle").stdout
    assert "worker 3" in out
    assert "3 records in" in out
    # The slot names the local state directory (and the transactional id).
    ns = KafkaURL.parse(kstore).namespace
    assert (tmp_path / "state" / ns / "pay" / "worker-3").is_dir()
    assert not (tmp_path / "state" / ns / "pay" / "worker-0").exists()
    assert status_json(kstore, "--app", "pay")["apps"][0]["lag"] == 0
    # On SQLite one process runs an app; a slot there is a mistake, not a no-op.
    err = fails("run", f"{module}:app", "--store", str(tmp_path / "s.db"), "--worker", "1", code=2)
    assert "--worker applies to a kafka:// store" in err.stderr

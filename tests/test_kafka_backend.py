"""The Kafka backend's own parts: partitioning like Java clients, state rebuilt from the
changelog, and a clear refusal of a broker that cannot run transactions."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from onceflow import App, ConfigError, Producer
from onceflow._kafka_common import kafka_partition

from .helpers import read_all

pytestmark = pytest.mark.kafka


def test_keys_land_where_librdkafkas_murmur2_puts_them(kafka_broker: Any) -> None:
    import confluent_kafka
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"murmur-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=7)])[topic].result()
    p = confluent_kafka.Producer(
        {"bootstrap.servers": kafka_broker.bootstrap, "partitioner": "murmur2"}
    )
    got: dict[str, int] = {}
    keys = [f"acct-{i}" for i in range(200)] + ["", "a", "ab", "abc", "ünïcode"]
    for key in keys:
        p.produce(
            topic,
            b"x",
            key=key.encode(),
            on_delivery=lambda err, msg, k=key: got.__setitem__(k, msg.partition()),
        )
    p.flush(30)
    assert got == {k: kafka_partition(k, 7, 0) for k in keys}


def _app(store: str) -> App:
    app = App("tally", store=store, partitions=2, commit_interval=0.05)
    app.source("in").reduce(name="sum", fn=lambda a, v: a + v["n"], initial=0).to("sums")
    return app


def test_state_is_rebuilt_from_the_changelog_when_local_stores_are_gone(
    kafka_broker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = f"kafka://{kafka_broker.bootstrap}/t{uuid.uuid4().hex[:10]}"
    state_dir = tmp_path / "state"
    monkeypatch.setenv("ONCEFLOW_STATE_DIR", str(state_dir))
    with Producer(store, partitions=2) as p:
        p.send_batch("in", [(f"k{i % 3}", {"n": 1}, None) for i in range(30)])
    _app(store).run(until_idle=True)
    # The partitions move to a machine with no local copy: everything from the changelog.
    shutil.rmtree(state_dir)
    with Producer(store, partitions=2) as p:
        p.send_batch("in", [(f"k{i % 3}", {"n": 1}, None) for i in range(3)])
    _app(store).run(until_idle=True)
    last: dict[str, int] = {}
    for r in read_all(store, "sums"):
        last[r.key or ""] = json.loads(r.value)
    assert last == {"k0": 11, "k1": 11, "k2": 11}


def test_a_broker_that_cannot_run_transactions_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from infra.kafka_broker import KafkaBroker, KafkaUnavailable

    from onceflow import _kafka

    broker = KafkaBroker(
        tmp_path / "kafka",
        wait_transactions=False,
        server_config={"transaction.state.log.replication.factor": "3"},
    )
    try:
        broker.start()
    except KafkaUnavailable as exc:
        pytest.skip(f"Kafka tests need Java 17 and Maven: {exc}")
    try:
        monkeypatch.setattr(_kafka, "TXN_TIMEOUT_S", 6.0)
        monkeypatch.setenv("ONCEFLOW_STATE_DIR", str(tmp_path / "state"))
        app = App("tx", store=f"kafka://{broker.bootstrap}")
        app.source("in").to("out")
        with pytest.raises(ConfigError, match=r"transaction\.state\.log\.replication\.factor"):
            app.run(until_idle=True)
    finally:
        broker.stop()


def test_a_producer_rides_out_a_broker_restart(own_broker: Any) -> None:
    """Sends made while the broker is down (a new topic among them) are acknowledged once
    it is back, each once: the demo's producer process must survive a broker kill."""
    import threading

    store = f"kafka://{own_broker.bootstrap}"
    with Producer(store, partitions=2) as p:
        p.send("before", {"n": 0}, key="k")
        own_broker.kill()
        errors: list[BaseException] = []

        def send() -> None:
            try:
                p.send_batch("during", [(f"k{i}", {"n": i}, f"id-{i}") for i in range(50)])
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=send)
        t.start()
        own_broker.restart()
        t.join(180)
        assert not t.is_alive() and errors == []
    got = sorted(json.loads(r.value)["n"] for r in read_all(store, "during"))
    assert got == list(range(50))

"""A worker that fails to take a partition over (its local store cannot be opened or
restored) must not process that partition on state it did not restore."""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from onceflow import App, State
from onceflow.testing import Event, diff, reference, send, snapshot

pytestmark = pytest.mark.kafka


def _app(store: str, state_dir: Path) -> App:
    app = App("takeover", store=store, partitions=1, worker=0, state_dir=str(state_dir))

    def count(value: Any, state: State) -> list[int]:
        state.value = (state.value or 0) + 1
        return [state.value]

    app.source("events").dedupe(name="ids", key=lambda v: v["id"], ttl=86_400).process(
        name="counts", fn=count
    ).to("counted")
    return app


def test_a_partition_whose_takeover_failed_is_not_processed_on_unrestored_state(
    kafka_broker: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Run 1 counts 20 events and commits. Run 2 is the same worker slot on a new machine
    (an empty state dir), whose local store for the partition cannot be opened at first
    (a directory sits where the file goes: a full or broken disk). Taking the partition
    over fails; once the store can be opened the worker must restore it and go on from
    the restored counts and dedup ids: a re-sent id stays a duplicate, counts go on."""
    ns = f"t{uuid.uuid4().hex[:10]}"
    store = f"kafka://{kafka_broker.bootstrap}/{ns}"
    first = [Event("events", {"id": f"e{i}"}, key="k", id=f"e{i}") for i in range(20)]
    # Two re-sends of ids run 1 committed, and new ones.
    second = [Event("events", {"id": f"e{i}"}, key="k", id=f"e{i}") for i in (3, 7)] + [
        Event("events", {"id": f"n{i}"}, key="k", id=f"n{i}") for i in range(10)
    ]
    send(store, first)
    _app(store, tmp_path / "machine-a").run(until_idle=True, timeout=120)

    fresh = tmp_path / "machine-b"
    blocked = fresh / ns / "takeover" / "worker-0" / "events-0.db"
    blocked.mkdir(parents=True)
    send(store, second)

    unblocked = threading.Event()

    class Unblock(logging.Handler):
        # The failed takeover reaches the App's log as the outage it waits out; only
        # then is the disk "repaired".
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            failed = "cannot go on" in msg and "unable to open database file" in msg
            if failed and not unblocked.is_set():
                shutil.rmtree(blocked)
                unblocked.set()

    handler = Unblock()
    logging.getLogger("onceflow").addHandler(handler)
    try:
        _app(store, fresh).run(until_idle=True, timeout=120)
    finally:
        logging.getLogger("onceflow").removeHandler(handler)
    assert unblocked.is_set(), "the takeover never failed: the fault was not injected"

    ref = _app(store, tmp_path / "ref")
    expected = reference(ref, first + second, store=str(tmp_path / "ref.db"))
    actual = snapshot(_app(store, fresh), store)
    assert diff(actual, expected) == []


def test_changelog_ends_are_read_after_a_broker_restart(own_broker: Any) -> None:
    """A worker's admin client keeps the partition leaders' epochs it saw before a broker
    restart; the restarted broker refuses ListOffsets with them (FENCED_LEADER_EPOCH),
    and librdkafka does not refresh them by itself. Every takeover after a restart
    (a rebalance, a new consumer) must still read the changelogs' ends."""
    store = f"kafka://{own_broker.bootstrap}"
    app = _app(store, Path(own_broker.workdir) / "state")
    session = app._open_session()
    try:
        session.ensure_topics(app._topics())
        assert session._changelog_ends([("events", 0)]) == {("events", 0): (0, 0)}
        own_broker.kill()
        own_broker.start()
        assert session._changelog_ends([("events", 0)]) == {("events", 0): (0, 0)}
    finally:
        session.close()

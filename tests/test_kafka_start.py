"""A Kafka worker started while the broker is down waits for it, as it does for an
outage that starts later."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from onceflow import App
from onceflow.testing import Event, diff, reference, send, snapshot

pytestmark = pytest.mark.kafka


def _app(store: str, tmp_path: Path) -> App:
    app = App("late", store=store, partitions=2, worker=0, state_dir=str(tmp_path / "state"))
    app.source("events").map(lambda v: {"twice": v["n"] * 2}).to("doubled")
    return app


def test_a_worker_started_while_the_broker_is_down_waits_for_it(
    own_broker: Any, tmp_path: Path
) -> None:
    store = f"kafka://{own_broker.bootstrap}"
    events = [Event("events", {"n": i}, key=f"k{i % 5}", id=f"e{i}") for i in range(50)]
    send(store, events)
    own_broker.kill()
    app = _app(store, tmp_path)
    waiting = threading.Event()
    died: list[BaseException] = []

    class Outage(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "cannot go on" in record.getMessage():
                waiting.set()

    def run() -> None:
        try:
            app.run(until_idle=True)
        except BaseException as exc:
            died.append(exc)

    handler = Outage()
    logging.getLogger("onceflow").addHandler(handler)
    worker = threading.Thread(target=run, daemon=True)
    try:
        worker.start()
        while not waiting.is_set() and worker.is_alive():
            waiting.wait(0.1)
        assert not died, f"the worker gave up instead of waiting: {died[0]!r}"
        own_broker.start()
        # A failure bound, not a speed figure: a worker that did not drain by then is stuck.
        worker.join(300)
        assert not worker.is_alive() and not died, died
    finally:
        app.stop()
        logging.getLogger("onceflow").removeHandler(handler)
    expected = reference(_app(store, tmp_path), events, store=str(tmp_path / "ref.db"))
    assert diff(snapshot(app, store), expected) == []

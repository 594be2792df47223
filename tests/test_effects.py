"""The effect journal against a local HTTP server that honours idempotency keys and counts
what it applies: kills between every step, and each effect applied once by the server."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from onceflow import App, ConfigError, EffectSink, FencedError, HttpEffectSink, PermanentError
from onceflow._cli import cli
from onceflow._sqlite import SQLiteStore
from onceflow._status import status
from onceflow._supervisor import wait_until
from onceflow.testing import Event, send

from .helpers import read_all, run_until_idle, zombie_beside
from .payment_server import PaymentServer

ROOT = Path(__file__).resolve().parent.parent
CHARGES = "tests.pipelines:charges_app"


def payments(n: int) -> list[Event]:
    return [
        Event(
            "payments",
            {"id": f"p{i}", "amount": -1 if i % 25 == 24 else i, "flaky": i % 7 == 0},
            key=f"acct{i % 4}",
            id=f"p{i}",
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("point", ["in_transaction", "after_commit", "effect_called"])
def test_each_effect_applied_once_through_kills(
    point: str, server: PaymentServer, tmp_path: Path
) -> None:
    store = str(tmp_path / "fx.db")
    evs = payments(100)
    env = {"ONCEFLOW_TEST_HTTP": server.url}
    killed = 0
    for i, start in enumerate(range(0, len(evs), 20)):
        send(store, evs[start : start + 20])
        killed += run_until_idle(CHARGES, store, crash_at=f"{point}:{1 + i % 3}", env=env)
    run_until_idle(CHARGES, store, env=env)
    assert killed >= 2
    good = [e for e in evs if e.value["amount"] >= 0]
    # Every effect once, by the server's own count; retries re-sent the same key.
    assert len(server.applied) == len(good)
    assert sorted(v["id"] for v in server.applied.values()) == sorted(e.value["id"] for e in good)
    assert server.calls > len(good)
    dead = read_all(store, "charges.dead-letters")
    assert sorted(json.loads(d.value)["id"] for d in dead) == ["p24", "p49", "p74", "p99"]
    assert all("HTTP 422" in (d.headers or {})["onceflow-error"] for d in dead)


def one_epoch_charges(store: str, url: str) -> App:
    """Every input in one epoch, so a paused deliverer holds every intent in hand."""
    app = App("charges", store=store, commit_every=10_000, max_batch=10_000, commit_interval=60)
    app.source("payments").sink(HttpEffectSink(url, name="charges", retries=2, backoff=0.01))
    return app


def test_a_paused_recorder_is_fenced_and_settles_nothing(
    server: PaymentServer, tmp_path: Path
) -> None:
    """Paused between a call and its journal entry, a recorder resumes after its
    successor settled every intent: it must be refused (`FencedError`), so that no
    effect gets a second outcome and no input a second dead letter."""
    store = str(tmp_path / "fx.db")
    evs = payments(30)
    send(store, evs)
    zombie = one_epoch_charges(store, server.url)

    def successor() -> None:
        one_epoch_charges(store, server.url).run(until_idle=True)

    assert isinstance(zombie_beside(zombie, "effect_called", successor), FencedError)
    good = sorted(e.value["id"] for e in evs if e.value["amount"] >= 0)
    assert sorted(v["id"] for v in server.applied.values()) == good
    dead = read_all(store, "charges.dead-letters")
    assert [json.loads(d.value)["id"] for d in dead] == ["p24"]


def effects_of(store: str) -> Any:
    st = SQLiteStore(store)
    try:
        (app,) = status(st, "charges")
    finally:
        st.close()
    return app


def test_pending_intents_are_retried_while_the_app_is_idle(
    server: PaymentServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The API is down when the inputs come: the App commits them, then sits idle with
    every intent pending, retrying with backoff (and `status` shows them pending and
    failing), until the API is back; then each effect is applied once."""
    caplog.set_level(logging.WARNING, logger="onceflow")
    store = str(tmp_path / "fx.db")
    evs = payments(30)
    server.down = True
    send(store, evs)
    app = App("charges", store=store, commit_interval=0.05)
    sink = HttpEffectSink(server.url, name="charges", retries=0, backoff=0.01, max_backoff=0.2)
    app.source("payments").sink(sink)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            app.run()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    try:

        def idle_with_all_pending() -> bool:
            if not app.stats.commits and not errors:
                return False  # not even registered in the store yet
            st = effects_of(store)
            return st.lag == 0 and [(e.pending, e.failing > 0) for e in st.effects] == [(30, True)]

        assert wait_until(idle_with_all_pending, 60), errors
        (shown,) = effects_of(store).effects
        assert shown.name == "charges" and "HTTP Error 503" in (shown.last_error or "")
        printed = CliRunner().invoke(cli, ["--store", store, "status"], env={"COLUMNS": "200"})
        assert printed.exit_code == 0, printed.output
        assert "effect sink" in printed.output and "HTTP Error 503" in printed.output
        calls = server.calls
        # No new input: the retries alone call the API again.
        assert wait_until(lambda: server.calls >= calls + 3, 60), errors
        server.down = False
        good = sorted(e.value["id"] for e in evs if e.value["amount"] >= 0)
        assert wait_until(lambda: len(server.applied) == len(good), 60), errors
        assert wait_until(lambda: effects_of(store).effects[0].pending == 0, 60), errors
    finally:
        app.stop()
        t.join(60)
    assert not errors and not t.is_alive(), errors
    assert sorted(v["id"] for v in server.applied.values()) == good
    (done,) = effects_of(store).effects
    assert (done.pending, done.failing, done.done, done.dead) == (0, 0, len(good), 1)
    dead = read_all(store, "charges.dead-letters")
    assert [json.loads(d.value)["id"] for d in dead] == ["p24"]
    assert caplog.text.count("calls fail") == 1  # said once, however many retries
    assert "calls succeed again" in caplog.text


def test_pending_intents_keep_their_key_until_the_call_succeeds(tmp_path: Path) -> None:
    keys: list[str] = []
    state = {"down": True}

    def call(payload: Any, key: str) -> Any:
        keys.append(key)
        if state["down"]:
            raise ConnectionError("service down")
        return {"ok": True}

    store = str(tmp_path / "fx.db")
    send(store, payments(1))
    app = App("fx", store=store)
    app.source("payments").sink(EffectSink(call, name="fx", retries=1, backoff=0.0))
    app.run(until_idle=True)
    state["down"] = False
    app.run(until_idle=True)  # the restart sends the pending intent again
    assert len(keys) == 3 and len(set(keys)) == 1


def test_effect_sink_errors_are_clear() -> None:
    with pytest.raises(ConfigError, match="http"):
        HttpEffectSink("ftp://x", name="x")
    with pytest.raises(ConfigError, match="call"):
        EffectSink("nope", name="x")  # type: ignore[arg-type]
    assert issubclass(PermanentError, Exception)

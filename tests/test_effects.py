"""The effect journal against a local HTTP server that honours idempotency keys and counts
what it applies: kills between every step, and each effect applied once by the server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from onceflow import App, ConfigError, EffectSink, HttpEffectSink, PermanentError
from onceflow._supervisor import Child
from onceflow.testing import Event, send

from .helpers import read_all

ROOT = Path(__file__).resolve().parent.parent


class PaymentServer:
    """Applies a charge once per Idempotency-Key; a repeat gets the first response."""

    def __init__(self) -> None:
        self.applied: dict[str, Any] = {}
        self.calls = 0
        self.flaky: set[str] = set()
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                key = self.headers["Idempotency-Key"]
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.calls += 1
                    if body.get("amount", 0) < 0:
                        self._reply(422, {"error": "negative amount"})
                        return
                    if key not in outer.flaky and body.get("flaky"):
                        outer.flaky.add(key)
                        self._reply(503, {"error": "try again"})
                        return
                    if key not in outer.applied:
                        outer.applied[key] = {"charge": len(outer.applied) + 1, **body}
                    self._reply(200, outer.applied[key])

            def _reply(self, code: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/charges"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[PaymentServer]:
    s = PaymentServer()
    monkeypatch.setenv("ONCEFLOW_TEST_HTTP", s.url)
    yield s
    s.httpd.shutdown()


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
        child = Child(
            "tests.pipelines:charges_app",
            store=store,
            until_idle=True,
            crash_at=f"{point}:{1 + i % 3}",
            env=env,
            cwd=str(ROOT),
        )
        assert child.wait(60) in (0, -9), child.stderr()
        killed += child.killed
    final = Child(
        "tests.pipelines:charges_app", store=store, until_idle=True, env=env, cwd=str(ROOT)
    )
    assert final.wait(60) == 0, final.stderr()
    assert killed >= 2
    good = [e for e in evs if e.value["amount"] >= 0]
    # Every effect once, by the server's own count; retries re-sent the same key.
    assert len(server.applied) == len(good)
    assert sorted(v["id"] for v in server.applied.values()) == sorted(e.value["id"] for e in good)
    assert server.calls > len(good)
    dead = read_all(store, "charges.dead-letters")
    assert sorted(json.loads(d.value)["id"] for d in dead) == ["p24", "p49", "p74", "p99"]
    assert all("HTTP 422" in (d.headers or {})["onceflow-error"] for d in dead)


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

"""A local HTTP payments API that honours Idempotency-Key and counts calls: the
outside world of the effect-journal tests, on 127.0.0.1 only."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class PaymentServer:
    """Applies a charge once per Idempotency-Key; a repeat gets the first response."""

    def __init__(self) -> None:
        self.applied: dict[str, Any] = {}
        self.calls = 0
        self.flaky: set[str] = set()
        # While set, every call is answered 503: the API is down.
        self.down = False
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
                    if outer.down:
                        self._reply(503, {"error": "down for maintenance"})
                        return
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

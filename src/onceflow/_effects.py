"""The effect journal: side effects on systems without transactions (an HTTP payment API,
e-mail), applied once through idempotency keys.

Per epoch, inside the store's transaction, each intent is journalled with a
deterministic idempotency key. After the commit the call is made with that key, and its
response journalled. After a crash, pending intents are sent again with the same key,
never a new one, so a server that honours idempotency keys applies each effect once.
A permanent failure (the server refuses the request) becomes a dead letter; a transient
one (timeout, 5xx, 429) is retried with backoff, and stays pending across restarts.
While calls keep failing (the API is down) the intents stay pending, in order, and
delivery rounds come with a backoff of their own, after a commit or while the App is
idle, until the calls succeed: an outage of any length is waited out, said once.

The journal lives in the embedded store, or on Kafka in the per-partition local stores
and their changelog (`_effect_journal.py`); the delivery logic here is the same for both.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._effect_journal import Journal
from ._errors import ConfigError, FencedError
from ._serde import encode_value
from ._sinks import Row, Sink, SinkContext

if TYPE_CHECKING:
    from ._backend import Transaction

log = logging.getLogger("onceflow")


class PermanentError(Exception):
    """Raised by an effect call that must not be retried (the request itself is wrong)."""


class EffectSink(Sink):
    """Calls `call(payload, idempotency_key)` once per output, through the journal.

    `call` returns a JSON-able response (journalled), raises `PermanentError` for a
    request that will never succeed (a dead letter), or raises anything else for a
    transient failure (retried `retries` times with exponential backoff from `backoff`
    seconds, then left pending: the next delivery round comes after a backoff doubling
    up to `max_backoff` seconds, after a commit or while the App is idle).
    """

    guarantee = "idempotent"
    needs_store = False

    def __init__(
        self,
        call: Callable[[Any, str], Any],
        *,
        name: str,
        retries: int = 3,
        backoff: float = 0.2,
        max_backoff: float = 30.0,
    ) -> None:
        if not callable(call):
            raise ConfigError("EffectSink needs a function call(payload, idempotency_key)")
        if retries < 0 or backoff < 0 or max_backoff < 0:
            raise ConfigError("EffectSink: retries and backoffs must not be negative")
        self.call = call
        self.name = name
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        # The rounds' own backoff while calls fail: no round starts before `_next_round`.
        self._next_round = 0.0
        self._delay = 0.0
        self._failing = False
        self._backlog = False
        self._app = ""
        self._journal: Journal | None = None

    def open(self, context: SinkContext) -> None:
        """The backend's journal; pending intents are delivered once their partitions
        are assigned."""
        super().open(context)
        self._app = context.app
        self._journal = context.session.effect_journal(
            context.app, self.name, context.dead_letter_topic, self.fenced
        )

    def partitions_assigned(self, parts: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        # The previous owner may have died with intents pending: same keys, sent again.
        self._deliver(now=True)
        return {}

    def write(self, txn: Transaction, rows: Sequence[Row]) -> None:
        """Journal the intents inside the epoch's transaction."""
        assert self._journal is not None, "EffectSink used before open"
        self._journal.add(txn, rows, self._key)

    def _key(self, row_id: tuple[str, int, int, int]) -> str:
        # Deterministic: the same output of the same input always gets the same key.
        topic, part, off, idx = row_id
        return f"{self._app}:{self.name}:{topic}:{part}:{off}:{idx}"

    def after_commit(self, rows: Sequence[Row]) -> None:
        self._deliver()

    def retry_pending(self) -> None:
        """While the App is idle: the next round for intents an outage left pending."""
        if self._backlog:
            self._deliver()

    def _deliver(self, *, now: bool = False) -> None:
        """One delivery round: every pending intent in order, each outcome journalled.
        A call that still fails after its retries ends the round, and the next one
        waits for the rounds' backoff (unless `now`: a start or a new assignment)."""
        journal = self._journal
        assert journal is not None, "EffectSink used before open"
        if not now and time.monotonic() < self._next_round:
            return
        self._backlog = False
        try:
            for intent in journal.pending():
                status, response, error = self._call(json.loads(intent.payload), intent.key)
                self._crash("effect_called")
                if status == "pending":
                    # Still failing: left for a later round or restart, same key.
                    journal.attempt_failed(intent, error or "")
                    self._round_failed(error or "")
                    break
                journal.settle(intent, status, response, error)
                # Calls go through again: a later failure starts the backoff anew.
                self._delay = 0.0
            else:
                self._round_done()
            journal.flush()
        except FencedError:
            raise
        except Exception as exc:
            # The outcomes could not be journalled: the store is away, or (on Kafka) the
            # worker's partitions moved on while it was away, and its settle was refused
            # with its group generation. The intents stay pending and go again with the
            # same keys, here or at their new owner.
            self._round_failed(
                f"{type(exc).__name__}: {exc}", what="their outcomes could not be journalled"
            )

    def _round_failed(self, error: str, what: str = "calls fail") -> None:
        self._backlog = True
        self._delay = min(self.max_backoff, max(self._delay * 2, self.backoff, 0.05))
        self._next_round = time.monotonic() + self._delay
        if not self._failing:
            self._failing = True
            log.warning(
                "effect sink %s: %s (%s); the pending intents are retried in "
                "order with the same keys, with backoff up to %gs, until they succeed",
                self.name,
                what,
                error,
                self.max_backoff,
            )

    def _round_done(self) -> None:
        self._delay = 0.0
        self._next_round = 0.0
        if self._failing:
            self._failing = False
            log.warning("effect sink %s: calls succeed again", self.name)

    def _call(self, payload: Any, key: str) -> tuple[str, bytes | None, str | None]:
        delay = self.backoff
        error = ""
        for attempt in range(self.retries + 1):
            try:
                response = self.call(payload, key)
                return "done", encode_value(response), None
            except PermanentError as exc:
                return "dead", None, f"{type(exc).__name__}: {exc}"
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                if attempt < self.retries:
                    time.sleep(delay)
                    delay *= 2
        return "pending", None, error


class HttpEffectSink(EffectSink):
    """POSTs each output as JSON to `url` with an `Idempotency-Key` header.

    A 2xx response is journalled; 4xx other than 408, 409 and 429 is permanent (a dead
    letter); anything else (5xx, timeouts, refused connections) is retried.

        >>> stream.sink(HttpEffectSink("https://payments.internal/charges", name="charges"))
        ...                                                              # doctest: +SKIP
    """

    def __init__(
        self,
        url: str,
        *,
        name: str,
        method: str = "POST",
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.2,
        max_backoff: float = 30.0,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"HttpEffectSink needs an http(s) URL, got {url!r}")
        self.url = url
        self.method = method
        self.headers = dict(headers or {})
        self.timeout = timeout
        super().__init__(
            self._post, name=name, retries=retries, backoff=backoff, max_backoff=max_backoff
        )

    def _post(self, payload: Any, key: str) -> Any:
        req = urllib.request.Request(
            self.url,
            data=json.dumps(payload).encode(),
            method=self.method,
            headers={"Content-Type": "application/json", "Idempotency-Key": key, **self.headers},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            if 400 <= exc.code < 500 and exc.code not in (408, 409, 429):
                raise PermanentError(f"HTTP {exc.code} from {self.url}") from exc
            raise
        try:
            return json.loads(body) if body else None
        except ValueError:
            return body.decode(errors="replace")

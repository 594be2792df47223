"""Observability hooks: a small interface the App calls at the moments that matter.

Subclass `Hooks` and pass `App(hooks=[...])`. Methods must be cheap and must not raise;
an exception from a hook is logged and swallowed so that metrics never stop a pipeline.
"""

from __future__ import annotations

import logging

log = logging.getLogger("onceflow")


class Hooks:
    """Override any of these; the defaults do nothing."""

    def commit_started(self, epoch: int, records_in: int) -> None: ...

    def commit_finished(
        self, epoch: int, records_in: int, records_out: int, seconds: float
    ) -> None: ...

    def commit_failed(self, epoch: int, error: BaseException) -> None: ...

    def duplicate_dropped(self, step: str, id: str) -> None: ...

    def dead_letter_written(
        self, step: str, topic: str, partition: int, offset: int, error: str
    ) -> None: ...

    def recovered(self, seconds: float, positions: dict[tuple[str, int], int]) -> None: ...


class _Fanout:
    """Calls every registered hook, isolating the pipeline from their failures."""

    def __init__(self, hooks: list[Hooks]) -> None:
        self.hooks = hooks

    def _each(self, name: str, *args: object) -> None:
        for h in self.hooks:
            try:
                getattr(h, name)(*args)
            except Exception:
                log.exception("hook %s.%s raised; ignored", type(h).__name__, name)

    def commit_started(self, epoch: int, n: int) -> None:
        if self.hooks:
            self._each("commit_started", epoch, n)

    def commit_finished(self, epoch: int, n_in: int, n_out: int, secs: float) -> None:
        if self.hooks:
            self._each("commit_finished", epoch, n_in, n_out, secs)

    def commit_failed(self, epoch: int, error: BaseException) -> None:
        if self.hooks:
            self._each("commit_failed", epoch, error)

    def duplicate(self, step: str, id: str) -> None:
        if self.hooks:
            self._each("duplicate_dropped", step, id)

    def dead_letter(self, step: str, topic: str, part: int, off: int, err: str) -> None:
        log.warning("dead letter from step %s at %s[%d]@%d: %s", step, topic, part, off, err)
        if self.hooks:
            self._each("dead_letter_written", step, topic, part, off, err)

    def recovered(self, secs: float, positions: dict[tuple[str, int], int]) -> None:
        if self.hooks:
            self._each("recovered", secs, positions)

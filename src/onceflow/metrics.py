"""Prometheus metrics for an App, behind the `metrics` extra.

>>> from onceflow.metrics import PrometheusHooks
>>> app = App("payments", hooks=[PrometheusHooks()])   # doctest: +SKIP
>>> prometheus_client.start_http_server(9108)          # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from ._errors import MissingExtraError
from ._hooks import Hooks

try:
    import prometheus_client
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise MissingExtraError("metrics", "prometheus-client") from exc

__all__ = ["PrometheusHooks"]


class PrometheusHooks(Hooks):
    """Counts commits, records, duplicates and dead letters; times commits and recovery."""

    def __init__(self, *, registry: Any = None, app: str = "") -> None:
        kw: dict[str, Any] = {"registry": registry} if registry is not None else {}
        labels = ["app"]
        self._app = app
        self.commits = prometheus_client.Counter(
            "onceflow_commits", "Committed epochs", labels, **kw
        )
        self.failed = prometheus_client.Counter(
            "onceflow_commit_failures", "Epochs that did not commit and were rewound", labels, **kw
        )
        self.records_in = prometheus_client.Counter(
            "onceflow_records_in", "Input records of committed epochs", labels, **kw
        )
        self.records_out = prometheus_client.Counter(
            "onceflow_records_out", "Outputs of committed epochs", labels, **kw
        )
        self.duplicates = prometheus_client.Counter(
            "onceflow_duplicates_dropped", "Business duplicates dropped", ["app", "step"], **kw
        )
        self.dead_letters = prometheus_client.Counter(
            "onceflow_dead_letters", "Records sent to the dead letters", ["app", "step"], **kw
        )
        self.commit_seconds = prometheus_client.Histogram(
            "onceflow_commit_seconds", "Time to commit an epoch", labels, **kw
        )
        self.recovery_seconds = prometheus_client.Gauge(
            "onceflow_recovery_seconds", "Time the last start took to recover", labels, **kw
        )

    def commit_finished(
        self, epoch: int, records_in: int, records_out: int, seconds: float
    ) -> None:
        self.commits.labels(self._app).inc()
        self.records_in.labels(self._app).inc(records_in)
        self.records_out.labels(self._app).inc(records_out)
        self.commit_seconds.labels(self._app).observe(seconds)

    def commit_failed(self, epoch: int, error: BaseException) -> None:
        self.failed.labels(self._app).inc()

    def duplicate_dropped(self, step: str, id: str) -> None:
        self.duplicates.labels(self._app, step).inc()

    def dead_letter_written(
        self, step: str, topic: str, partition: int, offset: int, error: str
    ) -> None:
        self.dead_letters.labels(self._app, step).inc()

    def recovered(self, seconds: float, positions: dict[tuple[str, int], int]) -> None:
        self.recovery_seconds.labels(self._app).set(seconds)

"""Observability: hooks see commits, duplicates, dead letters and recovery; Prometheus too."""

from __future__ import annotations

from collections.abc import Callable

import prometheus_client

from onceflow import App, Hooks, Producer
from onceflow.metrics import PrometheusHooks


class Recorder(Hooks):
    def __init__(self) -> None:
        self.events: list[str] = []

    def commit_finished(
        self, epoch: int, records_in: int, records_out: int, seconds: float
    ) -> None:
        self.events.append(f"commit:{records_in}:{records_out}")

    def duplicate_dropped(self, step: str, id: str) -> None:
        self.events.append(f"dup:{step}:{id}")

    def dead_letter_written(
        self, step: str, topic: str, partition: int, offset: int, error: str
    ) -> None:
        self.events.append(f"dead:{offset}")

    def recovered(self, seconds: float, positions: dict[tuple[str, int], int]) -> None:
        self.events.append("recovered")


class Broken(Hooks):
    def commit_finished(
        self, epoch: int, records_in: int, records_out: int, seconds: float
    ) -> None:
        raise RuntimeError("metrics backend down")


def test_hooks_see_what_happens(store: str, app_factory: Callable[..., App]) -> None:
    with Producer(store) as p:
        p.send_batch("in", [(None, 1, "a"), (None, 2, "a"), (None, b"{", "b")])
    rec = Recorder()
    registry = prometheus_client.CollectorRegistry()
    app = app_factory(hooks=[rec, Broken(), PrometheusHooks(registry=registry, app="app")])
    app.source("in").dedupe(name="d", ttl=60).to("out")
    app.run(until_idle=True)
    assert rec.events == ["recovered", "dead:2", "dup:d:a", "commit:3:1"]
    assert (
        registry.get_sample_value("onceflow_duplicates_dropped_total", {"app": "app", "step": "d"})
        == 1
    )
    assert registry.get_sample_value("onceflow_records_in_total", {"app": "app"}) == 3

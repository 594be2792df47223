"""Shared fixtures. Backends are a parameter, so every behavioural test that is not
about one backend's internals runs against each backend that is available."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from onceflow import App

BACKENDS = ["embedded"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(tmp_path: Path, backend: str) -> str:
    """A fresh store for the test, on the backend under test."""
    return str(tmp_path / "store.db")


@pytest.fixture
def app_factory(store: str) -> Callable[..., App]:
    """Build Apps on the test's store; the same name means the same app restarted."""

    def make(name: str = "app", **kwargs: Any) -> App:
        kwargs.setdefault("store", store)
        return App(name, **kwargs)

    return make


@pytest.fixture(autouse=True)
def _no_crash_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # A crash point set in the developer's shell must not kill the test process.
    monkeypatch.delenv("ONCEFLOW_CRASH_AT", raising=False)
    yield


REQUIRED_INFRA = ("kafka", "postgres")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under CI (ONCEFLOW_REQUIRE_INFRA=1) a skipped Kafka or PostgreSQL test fails."""
    outcome = yield
    report = outcome.get_result()
    if (
        report.skipped
        and os.environ.get("ONCEFLOW_REQUIRE_INFRA") == "1"
        and any(item.get_closest_marker(m) for m in REQUIRED_INFRA)
    ):
        report.outcome = "failed"
        report.longrepr = f"required infrastructure missing under CI: {report.longrepr}"

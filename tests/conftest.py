"""Shared fixtures. Backends are a parameter, so every behavioural test that is not
about one backend's internals runs against each backend that is available."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from onceflow import App
from onceflow._backend import BACKENDS


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real Kafka broker (KRaft, loopback) for the whole session."""
    from infra.kafka_broker import KafkaBroker, KafkaUnavailable

    broker = KafkaBroker(tmp_path_factory.mktemp("kafka"))
    try:
        broker.start()
    except KafkaUnavailable as exc:
        pytest.skip(f"Kafka tests need Java 17 and Maven: {exc}")
    _BROKERS.append(broker)
    try:
        yield broker
    finally:
        _BROKERS.remove(broker)
        broker.stop()


# The session's broker, so that a failing Kafka test can show the broker's log.
_BROKERS: list[Any] = []


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Any]:
    """A broker of this test's own: it is killed mid-run, which must not disturb others."""
    from .helpers import own_broker as start

    with start(tmp_path / "kafka") as broker:
        yield broker


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real PostgreSQL server (throwaway cluster, loopback) for the whole session."""
    from infra.postgres import PostgresServer, PostgresUnavailable

    server = PostgresServer(tmp_path_factory.mktemp("postgres"))
    try:
        server.start()
    except PostgresUnavailable as exc:
        pytest.skip(f"PostgreSQL tests need the postgresql package: {exc}")
    _PG_SERVERS.append(server)
    try:
        yield server
    finally:
        _PG_SERVERS.remove(server)
        server.close()


# The session's server, so that a failing PostgreSQL test can show the server's log.
_PG_SERVERS: list[Any] = []


@pytest.fixture
def postgres_url(postgres_server: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh database per test (the sink's tables and pg_prepared_xacts are per
    database), also in ONCEFLOW_POSTGRES_URL for PostgresSink and child processes."""
    name = f"t{uuid.uuid4().hex[:10]}"
    url = postgres_server.create_database(name)
    monkeypatch.setenv("ONCEFLOW_POSTGRES_URL", url)
    yield url
    postgres_server.drop_database(name)


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> str:
    """A fresh store for the test, on the backend under test. On Kafka a namespace of
    its own keeps the test's topics, groups and transactional ids apart."""
    if backend == "kafka":
        broker = request.getfixturevalue("kafka_broker")
        os.environ["ONCEFLOW_STATE_DIR"] = str(tmp_path / "state")
        return f"kafka://{broker.bootstrap}/t{uuid.uuid4().hex[:10]}"
    return str(tmp_path / "store.db")


@pytest.fixture
def store_pair(store: str, backend: str, tmp_path: Path) -> tuple[str, str]:
    """Two fresh stores of the backend: one for a crashing run, one for the reference."""
    if backend == "kafka":
        return (f"{store}-crashed", f"{store}-reference")
    return (str(tmp_path / "crashed.db"), str(tmp_path / "reference.db"))


@pytest.fixture
def embedded_store(tmp_path: Path) -> str:
    """For tests about the embedded log itself."""
    return str(tmp_path / "store.db")


# A test that uses one of these (directly or through another fixture) needs that part:
# it is marked so, whether or not its module says it, and under CI it cannot skip.
_NEEDS = {
    "kafka": {"kafka_broker", "own_broker", "demo_broker"},
    "postgres": {"postgres_server", "postgres_url"},
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == "kafka":
            item.add_marker(pytest.mark.kafka)
        used = set(getattr(item, "fixturenames", ()))
        for marker, fixtures in _NEEDS.items():
            if used & fixtures:
                item.add_marker(marker)


@pytest.fixture
def app_factory(store: str) -> Callable[..., App]:
    """Build Apps on the test's store; the same name means the same app restarted."""

    def make(name: str = "app", **kwargs: Any) -> App:
        kwargs.setdefault("store", store)
        return App(name, **kwargs)

    return make


@pytest.fixture(autouse=True)
def _no_crash_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # A crash point set in the developer's shell must not kill the test process, and
    # each test's Kafka state directory is its own.
    monkeypatch.delenv("ONCEFLOW_CRASH_AT", raising=False)
    monkeypatch.delenv("ONCEFLOW_STATE_DIR", raising=False)
    yield


REQUIRED_INFRA = ("kafka", "postgres")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under CI (ONCEFLOW_REQUIRE_INFRA=1) a skipped Kafka or PostgreSQL test fails."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and item.get_closest_marker("kafka") and _BROKERS:
        report.sections.append(("Kafka broker log (tail)", _BROKERS[0].log_tail(60)))
    if report.failed and item.get_closest_marker("postgres") and _PG_SERVERS:
        report.sections.append(("PostgreSQL server log (tail)", _PG_SERVERS[0].log_tail(60)))
    if (
        report.skipped
        and os.environ.get("ONCEFLOW_REQUIRE_INFRA") == "1"
        and any(item.get_closest_marker(m) for m in REQUIRED_INFRA)
    ):
        report.outcome = "failed"
        report.longrepr = f"required infrastructure missing under CI: {report.longrepr}"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The local payments API of the effect tests; sinks find it in ONCEFLOW_TEST_HTTP."""
    from .payment_server import PaymentServer

    s = PaymentServer()
    monkeypatch.setenv("ONCEFLOW_TEST_HTTP", s.url)
    yield s
    s.httpd.shutdown()

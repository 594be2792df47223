"""Small helpers shared by the tests: reading committed outputs back."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from onceflow import Consumer, Record
from onceflow._supervisor import Child

ROOT = Path(__file__).resolve().parent.parent


def read_all(store: str, topic: str) -> list[Record]:
    """Every committed record of a topic, partition by partition, without a group commit."""
    if store.startswith("kafka://"):
        from onceflow._kafka_clients import read_committed

        return read_committed(store, topic)
    with Consumer(store, group=f"tests-reader-{uuid.uuid4().hex[:8]}", topics=[topic]) as c:
        return sorted(c, key=lambda r: (r.partition, r.offset))


def values(store: str, topic: str) -> list[Any]:
    return [json.loads(r.value) for r in read_all(store, topic)]


@contextlib.contextmanager
def own_broker(path: Path) -> Iterator[Any]:
    """A broker of the caller's own: a test that kills it must not disturb the others."""
    from infra.kafka_broker import KafkaBroker, KafkaUnavailable

    broker = KafkaBroker(path)
    try:
        broker.start()
    except KafkaUnavailable as exc:
        pytest.skip(f"Kafka tests need Java 17 and Maven: {exc}")
    try:
        yield broker
    finally:
        broker.stop()


def run_until_idle(
    target: str,
    store: str,
    *,
    crash_at: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> bool:
    """One incarnation of the App in a child process, run until idle: it must exit
    cleanly, or, armed with `crash_at`, may die there. Whether it died there."""
    child = Child(target, store=store, until_idle=True, crash_at=crash_at, env=env, cwd=str(ROOT))
    code = child.wait(timeout)
    assert code in ((0, -9) if crash_at else (0,)), child.stderr()
    return child.killed


def zombie_beside(zombie: Any, point: str, successor: Any) -> BaseException | None:
    """Run `zombie` (an App) in a thread, pause it in-process at `point` (its first
    time there), run `successor()` to the end meanwhile, then let the zombie resume.
    Returns what the zombie's run raised (None if it returned)."""
    import threading

    from onceflow._crash import CrashInjector

    reached, release = threading.Event(), threading.Event()

    def hold(_point: str) -> None:
        reached.set()
        release.wait(60)

    zombie._crash = CrashInjector(None, "raise", pause=f"{point}:1", on_pause=hold)
    outcome: list[BaseException | None] = []

    def run_zombie() -> None:
        try:
            zombie.run(until_idle=True)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=run_zombie)
    t.start()
    try:
        assert reached.wait(60), f"the zombie never reached {point}"
        successor()
    finally:
        release.set()
        t.join(60)
    assert len(outcome) == 1, outcome
    return outcome[0]

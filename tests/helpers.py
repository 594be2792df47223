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

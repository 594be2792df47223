"""Small helpers shared by the tests: reading committed outputs back."""

from __future__ import annotations

import json
import uuid
from typing import Any

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

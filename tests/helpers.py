"""Small helpers shared by the tests: reading committed outputs back."""

from __future__ import annotations

import json
from typing import Any

from onceflow import Consumer, Record


def read_all(store: str, topic: str) -> list[Record]:
    """Every committed record of a topic, partition by partition, without a group commit."""
    with Consumer(store, group="tests-reader", topics=[topic]) as c:
        out: list[Record] = []
        while batch := c.poll(max_records=10_000):
            out.extend(batch)
        return out


def values(store: str, topic: str) -> list[Any]:
    return [json.loads(r.value) for r in read_all(store, topic)]

"""What `onceflow status` and the chaos audit read from a Kafka cluster: per-partition
lag of an app, and transactions left open (hanging) with their age."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from ._kafka_common import KafkaURL, kafka_module

_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class KafkaPartitionStatus:
    topic: str
    partition: int
    end_offset: int
    committed_offset: int | None
    lag: int


@dataclass(frozen=True)
class OpenTransaction:
    """A partition whose last stable offset trails its end: a transaction is open."""

    topic: str
    partition: int
    stable_offset: int
    end_offset: int
    age_seconds: float | None


def _admin(url: KafkaURL) -> Any:
    ck = kafka_module()
    return ck, ck.admin.AdminClient({"bootstrap.servers": url.bootstrap})


def app_lag(store: str, app: str, topics: list[str]) -> list[KafkaPartitionStatus]:
    """End offsets of `topics` against the app's committed group offsets."""
    url = KafkaURL.parse(store)
    ck, admin = _admin(url)
    md = admin.list_topics(timeout=_TIMEOUT_S)
    tps = [
        ck.TopicPartition(url.topic(t), p)
        for t in topics
        if url.topic(t) in md.topics
        for p in md.topics[url.topic(t)].partitions
    ]
    if not tps:
        return []
    c = ck.Consumer(
        {
            "bootstrap.servers": url.bootstrap,
            "group.id": url.topic(app),
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        committed = {(tp.topic, tp.partition): tp.offset for tp in c.committed(tps, _TIMEOUT_S)}
        out = []
        for tp in sorted(tps, key=lambda t: (t.topic, t.partition)):
            _, high = c.get_watermark_offsets(tp, timeout=_TIMEOUT_S, cached=False)
            off = committed.get((tp.topic, tp.partition))
            off = None if off is None or off < 0 else off
            out.append(
                KafkaPartitionStatus(
                    url.strip(tp.topic), tp.partition, high, off, high - (off or 0)
                )
            )
        return out
    finally:
        c.close()


def open_transactions(store: str, topics: list[str] | None = None) -> list[OpenTransaction]:
    """Partitions (of `topics`, or of every topic of the store's namespace) with an open
    transaction, and how long ago its first record was written."""
    url = KafkaURL.parse(store)
    ck, admin = _admin(url)
    md = admin.list_topics(timeout=_TIMEOUT_S)
    names = (
        [url.topic(t) for t in topics]
        if topics is not None
        else [
            n
            for n in md.topics
            if not n.startswith("__") and (not url.namespace or n.startswith(url.namespace + "."))
        ]
    )
    tps = [
        ck.TopicPartition(n, p) for n in names if n in md.topics for p in md.topics[n].partitions
    ]
    if not tps:
        return []
    latest = ck.admin.OffsetSpec.latest()
    committed_iso = ck.IsolationLevel.READ_COMMITTED
    stable = admin.list_offsets(
        {tp: latest for tp in tps}, isolation_level=committed_iso, request_timeout=_TIMEOUT_S
    )
    ends = admin.list_offsets({tp: latest for tp in tps}, request_timeout=_TIMEOUT_S)
    out = []
    for tp in tps:
        lso = stable[tp].result().offset
        hw = ends[tp].result().offset
        if lso < hw:
            out.append(
                OpenTransaction(url.strip(tp.topic), tp.partition, lso, hw, _age(url, tp, lso))
            )
    return out


def _age(url: KafkaURL, tp: Any, offset: int) -> float | None:
    """Age of the first record of the open transaction, read uncommitted."""
    ck = kafka_module()
    c = ck.Consumer(
        {
            "bootstrap.servers": url.bootstrap,
            "group.id": f"onceflow-status-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_uncommitted",
        }
    )
    try:
        c.assign([ck.TopicPartition(tp.topic, tp.partition, offset)])
        msg = c.poll(5.0)
        if msg is None or msg.error():
            return None
        return max(0.0, time.time() - msg.timestamp()[1] / 1000.0)
    finally:
        c.close()

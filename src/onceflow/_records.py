"""The record types that cross the public API and the backend interface."""

from __future__ import annotations

from typing import NamedTuple


class Record(NamedTuple):
    """One committed record of a topic, as a `Consumer` or `onceflow tail` sees it."""

    topic: str
    partition: int
    offset: int
    key: str | None
    value: bytes
    headers: dict[str, str] | None
    timestamp: float
    id: str | None


class SendResult(NamedTuple):
    """Where a sent record landed. `duplicate` is True when the store had it already."""

    topic: str
    partition: int
    offset: int | None
    duplicate: bool


class TopicPartition(NamedTuple):
    topic: str
    partition: int


class OutRecord(NamedTuple):
    """An output waiting in the epoch buffer; written to its topic at commit."""

    topic: str
    key: str | None
    value: bytes
    headers: dict[str, str] | None
    timestamp: float
    id: str | None
    # The source partition decides the partition of a keyless output, so that a replay
    # after a crash writes every output to the same partition as the first attempt.
    src_partition: int

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
    """Where a sent record landed. `duplicate` is True when the store had it already
    (then `offset` is where the earlier copy is). `sequence` is the record's sequence
    number under its producer id and partition on the embedded log (None on Kafka)."""

    topic: str
    partition: int
    offset: int | None
    duplicate: bool
    sequence: int | None = None


class TopicPartition(NamedTuple):
    topic: str
    partition: int


class Columns:
    """Records of one partition, column by column: the unit the log stores and reads.

    The embedded log keeps a run of records as one msgpack blob of five columns, like a
    Kafka record batch, so that a commit writes one row per partition and a poll decodes
    whole columns in C instead of building a Python object per record.
    """

    __slots__ = ("headers", "ids", "keys", "tss", "values")

    def __init__(
        self,
        keys: list[str | None] | None = None,
        values: list[bytes] | None = None,
        headers: list[dict[str, str] | None] | None = None,
        tss: list[float] | None = None,
        ids: list[str | None] | None = None,
    ) -> None:
        self.keys: list[str | None] = keys if keys is not None else []
        self.values: list[bytes] = values if values is not None else []
        self.headers: list[dict[str, str] | None] | None = headers
        self.tss: list[float] = tss if tss is not None else []
        self.ids: list[str | None] = ids if ids is not None else []

    def __len__(self) -> int:
        return len(self.values)

    def add(
        self,
        key: str | None,
        value: bytes,
        headers: dict[str, str] | None,
        ts: float,
        id: str | None,
    ) -> None:
        if headers is not None and self.headers is None:
            self.headers = [None] * len(self.values)
        self.keys.append(key)
        self.values.append(value)
        if self.headers is not None:
            self.headers.append(headers)
        self.tss.append(ts)
        self.ids.append(id)

    def header(self, i: int) -> dict[str, str] | None:
        return None if self.headers is None else self.headers[i]

    def slice(self, start: int, stop: int) -> Columns:
        return Columns(
            self.keys[start:stop],
            self.values[start:stop],
            None if self.headers is None else self.headers[start:stop],
            self.tss[start:stop],
            self.ids[start:stop],
        )

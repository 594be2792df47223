"""Consumer: reads committed records of a group's topics; offsets committed explicitly."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence

from ._backend import ConsumerClient, open_backend
from ._errors import ConfigError
from ._records import Record
from ._sqlite import SQLiteStore


class Consumer:
    """Reads committed records, partition by partition, and commits its position.

    Only records from committed transactions exist in the embedded log, so a consumer
    never sees an output of an epoch that was rolled back.

        >>> c = Consumer("demo.db", group="audit", topics=["ledger"])  # doctest: +SKIP
        >>> for rec in c.poll(timeout=1.0): ...                       # doctest: +SKIP
        >>> c.commit()                                                  # doctest: +SKIP
    """

    def __init__(
        self,
        store: str | os.PathLike[str],
        *,
        group: str,
        topics: Sequence[str],
        start: str = "earliest",
    ) -> None:
        if start not in ("earliest", "latest"):
            raise ConfigError(f"start must be 'earliest' or 'latest', got {start!r}")
        if not topics:
            raise ConfigError("Consumer needs at least one topic")
        self.group = group
        self.topics = list(topics)
        self._client: ConsumerClient = open_backend(store).consumer(group, self.topics, start)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def position(self, topic: str, partition: int) -> int:
        return self._client.position(topic, partition)

    def seek(self, topic: str, partition: int, offset: int) -> None:
        self._client.seek(topic, partition, offset)

    def poll(self, max_records: int = 1000, timeout: float = 0.0) -> list[Record]:
        """Up to `max_records` committed records, waiting up to `timeout` seconds for any."""
        return self._client.poll(max_records, timeout)

    def __iter__(self) -> Iterator[Record]:
        """Records until the topics are drained (no follow)."""
        yield from self._client.drained()

    def commit(self) -> None:
        """Store the current positions for the group, durably."""
        self._client.commit()


class EmbeddedConsumer:
    """The embedded log's side of `Consumer`: positions in memory, committed per group."""

    def __init__(self, store: SQLiteStore, group: str, topics: Sequence[str], start: str) -> None:
        self.group = group
        self.topics = list(topics)
        self._store = store
        self._start = start
        self._positions: dict[tuple[str, int], int] = {}
        self._cursor = 0

    def close(self) -> None:
        self._store.close()

    def _refresh(self) -> list[tuple[str, int]]:
        """Pick up topics and partitions that appeared since the last poll."""
        for topic in self.topics:
            found = self._store.topic(topic)
            if found is None:
                self._store._topics.pop(topic, None)
                continue
            committed = self._store.committed(self.group, topic)
            ends = self._store.end_offsets(topic) if self._start == "latest" else {}
            for part in range(found[1]):
                if (topic, part) not in self._positions:
                    self._positions[(topic, part)] = committed.get(part, ends.get(part, 0))
        return sorted(self._positions)

    def position(self, topic: str, partition: int) -> int:
        return self._positions.get((topic, partition), 0)

    def seek(self, topic: str, partition: int, offset: int) -> None:
        self._positions[(topic, partition)] = offset

    def poll(self, max_records: int, timeout: float) -> list[Record]:
        deadline = time.monotonic() + timeout
        while True:
            tps = self._refresh()
            out: list[Record] = []
            n = len(tps)
            for i in range(n):
                topic, part = tps[(self._cursor + i) % n]
                want = max_records - len(out)
                if want <= 0:
                    break
                recs = self._store.read_records(topic, part, self._positions[(topic, part)], want)
                if recs:
                    self._positions[(topic, part)] = recs[-1].offset + 1
                    out.extend(recs)
            if n:
                self._cursor = (self._cursor + 1) % n
            if out or time.monotonic() >= deadline:
                return out
            time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))

    def drained(self) -> Iterator[Record]:
        """An empty poll of the log means every topic is drained."""
        while batch := self.poll(1000, 0.0):
            yield from batch

    def commit(self) -> None:
        rows = []
        for (topic, part), off in self._positions.items():
            found = self._store.topic(topic)
            if found is not None:
                rows.append((found[0], part, off))
        with self._store.transaction() as conn:
            self._store.write_offsets(conn, self.group, rows)

"""Consumer: reads committed records of a group's topics; offsets committed explicitly."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence

from ._errors import ConfigError
from ._kafka_clients import KafkaConsumerImpl
from ._kafka_common import is_kafka
from ._records import Record
from ._sqlite import SQLiteStore, store_path


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
        self._kafka: KafkaConsumerImpl | None = None
        if is_kafka(os.fspath(store)):
            self._kafka = KafkaConsumerImpl(os.fspath(store), group, self.topics, start)
            return
        self._store = SQLiteStore(store_path(store))
        self._start = start
        self._positions: dict[tuple[str, int], int] = {}
        self._cursor = 0

    def close(self) -> None:
        if self._kafka is not None:
            self._kafka.close()
            return
        self._store.close()

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        if self._kafka is not None:
            return self._kafka.position(topic, partition)
        return self._positions.get((topic, partition), 0)

    def seek(self, topic: str, partition: int, offset: int) -> None:
        if self._kafka is not None:
            self._kafka.seek(topic, partition, offset)
            return
        self._positions[(topic, partition)] = offset

    def poll(self, max_records: int = 1000, timeout: float = 0.0) -> list[Record]:
        """Up to `max_records` committed records, waiting up to `timeout` seconds for any."""
        if self._kafka is not None:
            return self._kafka.poll(max_records, timeout)
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

    def __iter__(self) -> Iterator[Record]:
        """Records until the topics are drained (no follow)."""
        if self._kafka is not None:
            # A group consumer has no partitions until the group assigns them, so
            # "drained" means assigned and at the end of each, not one empty poll.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                batch = self._kafka.poll(1000, 0.2)
                yield from batch
                if not batch and self._kafka.caught_up():
                    return
            return
        while batch := self.poll():
            yield from batch

    def commit(self) -> None:
        """Store the current positions for the group, durably."""
        if self._kafka is not None:
            self._kafka.commit()
            return
        rows = []
        for (topic, part), off in self._positions.items():
            found = self._store.topic(topic)
            if found is not None:
                rows.append((found[0], part, off))
        with self._store.transaction() as conn:
            self._store.write_offsets(conn, self.group, rows)

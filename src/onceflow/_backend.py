"""The backend seam: what the App, the checkpoint, the sinks and the clients may ask of a
store, and nothing else; `open_backend` is the one place that tells the backends apart.

The fenced write path is a property of the seam: every durable write of an epoch goes
through the `Transaction` that `Session.transaction()` opens, whose `check_fence` (on
the embedded store) or commit (on Kafka: the producer epoch and the group generation)
refuses a writer that no longer owns its partitions, inside that same transaction.
Sinks get that transaction in `Sink.write`, never a connection of their own.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ._effect_journal import Journal
    from ._records import Columns, Record, SendResult
    from ._runtime import Batch
    from ._sqlite import SQLiteStore

TP = tuple[str, int]
PartKey = tuple[int, str]
# (partition, key, encoded value, or None for a delete)
StateRow = tuple[int, str, bytes | None]
# (partition, id, seen timestamp, encoded first outcome or None)
DedupRow = tuple[int, str, float, bytes | None]

# The backends this library supports, by name: the contract tests run on each, so a
# new backend is tested by adding it here (and its store to the tests' fixture).
BACKENDS = ("embedded", "kafka")


class RebalanceListener(Protocol):
    """What the App does when partitions move. The embedded backend takes every
    partition at start and calls `assigned` once; Kafka calls it on each rebalance."""

    def assigned(self, parts: list[TP]) -> dict[TP, int]:
        """Partitions just taken, before any is read: sinks recover what is in doubt on
        them. Returns offsets to resume from where a sink recorded it is further on."""
        ...

    def revoking(self, parts: list[TP]) -> None:
        """Partitions about to go: commit the epoch in flight while they are ours."""

    def lost(self, parts: list[TP]) -> None:
        """Partitions gone without a chance to commit: drop the epoch in flight."""

    def revoked(self, parts: list[TP]) -> None:
        """Partitions gone (after `revoking` or `lost`): sinks and caches forget them."""


class Transaction(Protocol):
    """One fenced write transaction of a session. Nothing it writes is visible before
    `commit` returns; `rollback` drops it all."""

    # The store's own SQL connection, inside this transaction, for sinks that write into
    # the store's tables (`SQLiteTableSink`, `FileSink`); None on a backend without one.
    sql: sqlite3.Connection | None

    def check_fence(self) -> None:
        """Step 3b: raise `FencedError` unless this process still owns its partitions
        (on Kafka the broker checks that at commit, so this does nothing)."""

    def write_outputs(self, outputs: dict[TP, Columns]) -> None: ...

    def write_state(self, step: str, rows: list[StateRow]) -> None: ...

    def write_dedup(self, step: str, rows: list[DedupRow]) -> None: ...

    def purge_dedup(self, step: str, ttl: float | None, max_keys: int | None) -> int:
        """Apply a dedupe step's retention; how many ids were forgotten."""
        ...

    def write_positions(self, positions: dict[TP, int]) -> None:
        """The input offsets this transaction consumed; they only move forward."""

    def commit(self) -> None:
        """Make everything durable at once. An exception means the outcome is unknown:
        ask `Session.outcome_of`, never retry blindly."""

    def rollback(self) -> None: ...


class Session(Protocol):
    """One App process's hold on a store: its partitions, positions, state and commits."""

    @property
    def sql_store(self) -> SQLiteStore | None:
        """The embedded store, for sinks that keep their bookkeeping in its tables; None
        on a backend without SQL tables (such sinks are refused there at build)."""
        ...

    def ensure_topics(self, topics: dict[str, int]) -> None: ...

    def check_topology(
        self, sig: list[list[str]], reset_hint: str, config: dict[str, Any]
    ) -> None: ...

    def acquire(self, sources: Iterable[str], listener: RebalanceListener) -> None:
        """Join the sources' partitions; `listener` hears of every assignment change."""

    def committed_positions(self) -> dict[TP, int]:
        """Where the held partitions resume: the committed offsets, or further on where
        a sink recorded it is done."""
        ...

    def committed_of(self, parts: Iterable[TP]) -> dict[TP, int]:
        """The committed offsets of any partitions, negative where none: the record an
        external sink's prepared transaction is decided from."""
        ...

    def poll(self, positions: dict[TP, int], max_records: int) -> list[Batch]: ...

    def wait_for_data(self, timeout: float, stop: threading.Event) -> None: ...

    def idle(self) -> bool:
        """After an empty poll: every held partition is drained."""
        ...

    def partitions_of(self, topic: str) -> int: ...

    def partition_for(self, key: str | None, partitions: int, fallback: int) -> int: ...

    def load_state(self, step: str, pks: list[PartKey]) -> dict[PartKey, Any]: ...

    def load_dedup(self, step: str, pks: list[PartKey]) -> dict[PartKey, Any]: ...

    def transaction(self) -> Transaction:
        """Step 3a: open a write transaction (the epoch's, or a small one that settles
        something)."""
        ...

    def fence_token(self) -> int:
        """This process's fencing epoch for an external sink (0 where the backend fences
        per partition instead)."""
        ...

    def commit_offsets(self, positions: dict[TP, int]) -> None:
        """At-least-once: the epoch's input offsets, after its transaction, on their own
        (a crash between the two replays the epoch)."""

    def outcome_of(self, positions: dict[TP, int]) -> bool:
        """After a commit that raised: did it land? Found out, never guessed."""
        ...

    def after_commit(self) -> None: ...

    def rewind(self) -> dict[TP, int]:
        """Back to the last commit: the positions to read from."""
        ...

    def is_transient(self, exc: BaseException) -> bool:
        """Whether a client error of this backend is the store's passing state (5b)."""
        ...

    def effect_journal(
        self,
        app: str,
        sink: str,
        dead_letter_topic: str,
        fenced: Callable[[str], AbstractContextManager[sqlite3.Connection]],
    ) -> Journal:
        """Where an effect sink journals its intents and outcomes on this backend."""
        ...

    def close(self) -> None: ...


class ProducerClient(Protocol):
    """What `Producer` sends through."""

    def send_batch(
        self,
        topic: str,
        items: list[tuple[str | None, Any, str | None]],
        headers: dict[str, str] | None,
        partition: int | None,
        sequences: list[int] | None,
        timestamp: float | None,
    ) -> list[SendResult]: ...

    def last_sequence(self, topic: str, partition: int) -> int: ...

    def close(self) -> None: ...


class ConsumerClient(Protocol):
    """What `Consumer` reads through."""

    def poll(self, max_records: int, timeout: float) -> list[Record]: ...

    def drained(self) -> Iterable[Record]:
        """Every record until the topics are drained (no follow)."""
        ...

    def position(self, topic: str, partition: int) -> int: ...

    def seek(self, topic: str, partition: int, offset: int) -> None: ...

    def commit(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SessionOptions:
    """What an App tells its backend when it opens a session."""

    app: str
    owner: str
    worker: int
    state_dir: str
    commit_interval: float
    step_topics: dict[str, str]
    topic_partitions: int


class Backend(Protocol):
    """What a store URL names. Capabilities are attributes, never guessed from types."""

    name: str  # one of BACKENDS
    url: str
    # Sinks that write into the store's own tables (or outbox) can run on it.
    has_sql_store: bool
    # Several worker processes share the sources' partitions (a consumer group), so a
    # step's state is partitioned like one input topic (an effect sink with two sources
    # would journal half its intents nowhere).
    several_workers: bool

    def session(self, options: SessionOptions) -> Session: ...

    def producer(self, producer_id: str, partitions: int) -> ProducerClient: ...

    def consumer(self, group: str, topics: Sequence[str], start: str) -> ConsumerClient: ...

    def committed_records(self, topic: str) -> list[Record]:
        """Every committed record of `topic`, partition by partition."""
        ...

    def committed_state(
        self, app: str, step_topics: dict[str, str]
    ) -> tuple[dict[tuple[str, int, str], bytes], set[tuple[str, int, str]]]:
        """`app`'s committed state rows, encoded, by (step, partition, key), and its
        dedup ids by (step, partition, id). `step_topics`: each stateful step's input."""
        ...


def open_backend(store: str | os.PathLike[str]) -> Backend:
    """The backend a store names: a `kafka://` URL, or else a SQLite file (a path or a
    `sqlite://` URL). The only place that tells them apart."""
    url = os.fspath(store)
    if url.startswith("kafka://"):
        from ._kafka import KafkaBackend

        return KafkaBackend(url)
    from ._embedded import EmbeddedBackend

    return EmbeddedBackend(url)

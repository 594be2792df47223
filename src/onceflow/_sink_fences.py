"""PostgreSQL-side fencing and in-doubt resolution for PostgresSink on the Kafka backend.

On Kafka several workers write to one PostgreSQL at once, each for the input partitions
it holds, so the fence is per input partition: a row (app, sink, topic, part, epoch)
that a worker raises when it is assigned the partition. Every prepared transaction
checks, inside itself, that each partition of its epoch still carries this worker's
epoch, and keeps that row locked until it is resolved; a worker whose partition moved
(a zombie) is refused inside PostgreSQL.

The coordinator's record is the Kafka transaction: its consumer offsets. Before each
PREPARE the sink records, in autocommit, the input positions the prepared id stands for
(its intent). A prepared id is committed if the group's committed offsets reached its
positions, and rolled back otherwise. That decision is final only because nobody
commits further offsets of those partitions first: the new owner of a partition
resolves before it processes anything, and a zombie's offsets are refused by the group
generation (or by the producer epoch of its slot).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from ._errors import FencedError, StoreError

log = logging.getLogger("onceflow")

TP = tuple[str, int]

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS onceflow_sink_fences("
    " app text NOT NULL, sink text NOT NULL, topic text NOT NULL, part integer NOT NULL,"
    " epoch bigint NOT NULL, PRIMARY KEY(app, sink, topic, part))",
    "CREATE TABLE IF NOT EXISTS onceflow_sink_intents("
    " app text NOT NULL, sink text NOT NULL, gid text NOT NULL, topic text NOT NULL,"
    " part integer NOT NULL, next_offset bigint NOT NULL, PRIMARY KEY(gid, topic, part))",
)

# A prepared transaction that appears while the fences are raised holds their rows: the
# raise gives up after this long and resolves again, rather than waiting on it forever.
_LOCK_TIMEOUT = "2s"
_ACQUIRE_ROUNDS = 30


class PartitionFences:
    """One sink's fencing epochs for the partitions this worker holds."""

    def __init__(
        self, app: str, sink: str, committed_of: Callable[[Iterable[TP]], dict[TP, int]]
    ) -> None:
        self.app = app
        self.sink = sink
        # Read from the consumer group with read_committed semantics, which wait for a
        # transaction in flight on those partitions to end.
        self.committed_of = committed_of
        self.epochs: dict[TP, int] = {}

    def acquire(self, pg: Any, parts: list[TP]) -> None:
        """Resolve what is in doubt on `parts`, then raise their epochs: in this order,
        since an in-doubt prepared transaction holds the rows the raise updates."""
        lock_error = _psycopg_errors().LockNotAvailable
        for _ in range(_ACQUIRE_ROUNDS):
            self.recover(pg, parts)
            try:
                self._raise_epochs(pg, parts)
                break
            except lock_error:
                log.info(
                    "sink %s: a prepared transaction appeared on %s; resolving", self.sink, parts
                )
        else:
            raise StoreError(
                f"PostgresSink '{self.sink}': the fencing rows of {parts} stayed locked. Operator "
                "action: look for a long-running or prepared transaction in PostgreSQL"
            )
        self._sweep(pg, parts)

    def release(self, parts: Iterable[TP]) -> None:
        for tp in parts:
            self.epochs.pop(tp, None)

    def _raise_epochs(self, pg: Any, parts: list[TP]) -> None:
        got: dict[TP, int] = {}
        with pg.transaction():
            pg.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
            for topic, part in sorted(parts):
                (epoch,) = pg.execute(
                    "INSERT INTO onceflow_sink_fences AS f(app, sink, topic, part, epoch) "
                    "VALUES(%s, %s, %s, %s, 1) ON CONFLICT(app, sink, topic, part) "
                    "DO UPDATE SET epoch = f.epoch + 1 RETURNING epoch",
                    (self.app, self.sink, topic, part),
                ).fetchone()
                got[(topic, part)] = int(epoch)
        self.epochs.update(got)

    def check(self, pg: Any, positions: dict[TP, int]) -> None:
        """Inside the sink's transaction: every partition of the epoch is still ours. The
        row lock taken here is kept by PREPARE, so no new owner raises the epoch past a
        transaction of ours that is still in doubt."""
        for tp in sorted(positions):
            mine = self.epochs.get(tp)
            cur = pg.execute(
                "UPDATE onceflow_sink_fences SET epoch = epoch WHERE app = %s AND sink = %s "
                "AND topic = %s AND part = %s AND epoch = %s",
                (self.app, self.sink, tp[0], tp[1], mine if mine is not None else -1),
            )
            if cur.rowcount != 1:
                raise FencedError(
                    f"PostgresSink '{self.sink}': partition {tp[1]} of '{tp[0]}' of app "
                    f"'{self.app}' now belongs to another worker (fencing epoch {mine} is "
                    "stale); this one stops without writing"
                )

    def record_intent(self, pg: Any, gid: str, positions: dict[TP, int]) -> None:
        """Autocommit, before the transaction: what recovery needs to decide `gid`."""
        with pg.cursor() as c:
            c.executemany(
                "INSERT INTO onceflow_sink_intents(app, sink, gid, topic, part, next_offset) "
                "VALUES(%s, %s, %s, %s, %s, %s)",
                [(self.app, self.sink, gid, t, p, o) for (t, p), o in positions.items()],
            )

    def forget(self, pg: Any, gid: str) -> None:
        pg.execute("DELETE FROM onceflow_sink_intents WHERE gid = %s", (gid,))

    def recover(self, pg: Any, parts: list[TP]) -> None:
        """Commit each prepared transaction touching `parts` whose positions the group
        committed, roll back the others."""
        intents: dict[str, dict[TP, int]] = {}
        for gid, topic, part, off in pg.execute(
            "SELECT i.gid, i.topic, i.part, i.next_offset FROM onceflow_sink_intents i "
            "JOIN pg_prepared_xacts x ON x.gid = i.gid AND x.database = current_database() "
            "WHERE i.app = %s AND i.sink = %s",
            (self.app, self.sink),
        ).fetchall():
            intents.setdefault(gid, {})[(topic, int(part))] = int(off)
        wanted = set(parts)
        todo = {gid: pos for gid, pos in intents.items() if wanted & set(pos)}
        if not todo:
            return
        committed = self.committed_of({tp for pos in todo.values() for tp in pos})
        for gid, pos in todo.items():
            landed = all(committed.get(tp, -1) >= off for tp, off in pos.items())
            pg.execute(f"{'COMMIT' if landed else 'ROLLBACK'} PREPARED '{gid}'")
            self.forget(pg, gid)
            log.info(
                "sink %s: %s in-doubt %s", self.sink, "committed" if landed else "rolled back", gid
            )

    def _sweep(self, pg: Any, parts: list[TP]) -> None:
        """Intents whose transaction never prepared (a crash in between). Safe once the
        epochs are raised: a transaction touching these partitions cannot prepare now."""
        for topic, part in parts:
            pg.execute(
                "DELETE FROM onceflow_sink_intents WHERE gid IN (SELECT gid FROM "
                "onceflow_sink_intents WHERE app = %s AND sink = %s AND topic = %s AND part = %s)"
                " AND gid NOT IN (SELECT gid FROM pg_prepared_xacts)",
                (self.app, self.sink, topic, part),
            )


def _psycopg_errors() -> Any:
    import psycopg

    return psycopg.errors

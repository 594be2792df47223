"""What the CLI reads from a store, and what `onceflow reset` deletes, as plain data.

Every function takes an open `SQLiteStore` and returns dataclasses, so tests and other
tools can call them without going through click. Records are read through the store's
own reader, never by a consumer group, so looking at a store never moves an offset.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from ._errors import ConfigError, StoreError
from ._records import Record
from ._sqlite import SQLiteStore, store_path

# Rows an app owns: table, the column naming the app, what a row is to a user. Topics
# and their records are shared with producers and other apps, so `reset` keeps them.
APP_TABLES: tuple[tuple[str, str, str], ...] = (
    ("group_offsets", "grp", "committed offsets"),
    ("state", "app", "state keys"),
    ("dedup", "app", "dedup keys"),
    ("leases", "app", "leases"),
    ("outbox", "app", "outbox rows"),
    ("sink_progress", "app", "sink positions"),
    ("apps", "app", "app record"),
)


# -- opening ----------------------------------------------------------------------


@contextmanager
def open_store(path: str) -> Iterator[SQLiteStore]:
    """An existing store, closed on exit.

    Opening a missing path would create an empty store, so a typo in `--store` would
    show "no topics" instead of an error; it is refused here.
    """
    p = store_path(path)
    if not os.path.isfile(p):
        raise StoreError(
            f"store '{p}' does not exist; operator action: pass --store PATH "
            "or set ONCEFLOW_STORE to an existing store"
        )
    try:
        store = SQLiteStore(p)
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"'{p}' is not an onceflow store ({exc})") from exc
    try:
        yield store
    finally:
        store.close()


def as_json(obj: Any) -> Any:
    """Dataclasses (and lists of them) as JSON-ready dicts."""
    if isinstance(obj, list):
        return [as_json(o) for o in obj]
    return asdict(obj)


# -- topics -----------------------------------------------------------------------


@dataclass(frozen=True)
class TopicInfo:
    name: str
    partitions: int
    records: int


def list_topics(store: SQLiteStore) -> list[TopicInfo]:
    return [TopicInfo(name, parts, n) for name, parts, n in store.topics()]


def records_held(store: SQLiteStore, topic: str) -> int:
    return sum(store.end_offsets(topic).values())


# -- records (tail) ---------------------------------------------------------------


def tail_partitions(store: SQLiteStore, topic: str, partition: int | None) -> list[int]:
    """The partitions to read, refusing a missing topic or partition by name."""
    found = store.topic(topic)
    if found is None:
        known = ", ".join(t.name for t in list_topics(store)) or "none"
        raise ConfigError(
            f"topic '{topic}' does not exist in store '{store.path}' (topics: {known})"
        )
    nparts = found[1]
    if partition is None:
        return list(range(nparts))
    if not 0 <= partition < nparts:
        raise ConfigError(f"topic '{topic}' has {nparts} partition(s); --partition {partition}")
    return [partition]


def end_positions(store: SQLiteStore, topic: str, parts: list[int]) -> dict[int, int]:
    ends = store.end_offsets(topic)
    return {p: ends.get(p, 0) for p in parts}


def last_records(
    store: SQLiteStore, topic: str, parts: list[int], n: int
) -> tuple[list[Record], dict[int, int]]:
    """The last `n` records across `parts` (by timestamp), and the positions after them.

    The end offsets are read first and each read stops at them, so a record appended
    meanwhile is neither shown here nor skipped by a follow-up `read_new`.
    """
    ends = end_positions(store, topic, parts)
    found: list[Record] = []
    for part, end in ends.items():
        start = max(0, end - n)
        if end > start:
            found.extend(store.read_records(topic, part, start, end - start))
    found.sort(key=lambda r: (r.timestamp, r.partition, r.offset))
    return (found[-n:] if n else []), ends


def read_new(
    store: SQLiteStore, topic: str, positions: dict[int, int], limit: int = 500
) -> list[Record]:
    """Up to `limit` records per partition from `positions`, which move past them."""
    out: list[Record] = []
    for part in sorted(positions):
        recs = store.read_records(topic, part, positions[part], limit)
        if recs:
            positions[part] = recs[-1].offset + 1
            out.extend(recs)
    return out


def decode_value(raw: bytes) -> tuple[str, str]:
    """(encoding, text): UTF-8 text when the bytes are UTF-8, else their hex."""
    try:
        return "utf-8", raw.decode("utf-8")
    except UnicodeDecodeError:
        return "hex", raw.hex()


def record_dict(rec: Record) -> dict[str, Any]:
    encoding, text = decode_value(rec.value)
    return {
        "topic": rec.topic,
        "partition": rec.partition,
        "offset": rec.offset,
        "timestamp": rec.timestamp,
        "key": rec.key,
        "id": rec.id,
        "headers": rec.headers,
        "value": text,
        "encoding": encoding,
    }


# -- apps (status) ----------------------------------------------------------------


@dataclass(frozen=True)
class PartitionStatus:
    """One source partition of an app. `committed_offset` is None before its first commit."""

    topic: str
    partition: int
    end_offset: int
    committed_offset: int | None
    lag: int
    committed_at: float | None
    lease_epoch: int | None
    lease_owner: str | None
    lease_acquired: float | None


@dataclass(frozen=True)
class StepStatus:
    """A stateful step: state keys (reduce, process) or dedup ids (dedupe) it holds."""

    name: str
    kind: str
    topic: str | None
    state_keys: int
    dedup_keys: int
    oldest_dedup_seen: float | None
    retention: str | None = None


@dataclass(frozen=True)
class SinkStatus:
    """An outbox sink: committed epochs not yet delivered, and where delivery stands."""

    name: str
    pending_epochs: int
    delivered_epochs: int
    position: int


@dataclass(frozen=True)
class EffectStatus:
    """An effect sink's journal: intents not yet settled (`failing`: of those, the ones
    whose last call failed, the first one's error in `last_error`), applied ones, and
    permanent failures (dead letters)."""

    name: str
    pending: int
    failing: int
    done: int
    dead: int
    last_error: str | None


@dataclass(frozen=True)
class AppStatus:
    name: str
    commits: int
    last_commit: float | None
    lag: int
    dead_letter_topic: str
    dead_letters: int
    partitions: list[PartitionStatus]
    steps: list[StepStatus]
    sinks: list[SinkStatus]
    effects: list[EffectStatus]


def app_names(store: SQLiteStore) -> list[str]:
    with store.lock:
        return [r[0] for r in store.conn.execute("SELECT app FROM apps ORDER BY app")]


def status(store: SQLiteStore, app: str | None = None) -> list[AppStatus]:
    """Every app of the store, or only `app` (refused by name when unknown)."""
    names = app_names(store)
    if app is not None:
        if app not in names:
            raise ConfigError(_unknown_app(store, app, names))
        names = [app]
    return [app_status(store, name) for name in names]


def app_status(store: SQLiteStore, app: str) -> AppStatus:
    with store.lock:
        row = store.conn.execute(
            "SELECT topology, commits, last_commit, config FROM apps WHERE app=?", (app,)
        ).fetchone()
    if row is None:
        raise ConfigError(_unknown_app(store, app, app_names(store)))
    topology, commits, last_commit, config_text = row
    config = json.loads(config_text)
    parts = source_partitions(store, app)
    dlq = config.get("dead_letter_topic", f"{app}.dead-letters")
    return AppStatus(
        name=app,
        commits=commits,
        last_commit=last_commit,
        lag=sum(p.lag for p in parts),
        dead_letter_topic=dlq,
        dead_letters=records_held(store, dlq),
        partitions=parts,
        steps=step_status(store, app, topology, config.get("retention", {})),
        sinks=sink_status(store, app),
        effects=effect_status(store, app),
    )


def source_partitions(store: SQLiteStore, app: str) -> list[PartitionStatus]:
    """Partitions the app leased or committed, with the log's end and the app's offset."""
    with store.lock:
        rows = store.conn.execute(
            "SELECT t.name, p.part, p.next_offset, g.next_offset, g.committed, "
            "l.epoch, l.owner, l.acquired "
            "FROM (SELECT topic_id, part FROM leases WHERE app=:app "
            "      UNION SELECT topic_id, part FROM group_offsets WHERE grp=:app) s "
            "JOIN topics t ON t.id=s.topic_id "
            "JOIN partitions p ON p.topic_id=s.topic_id AND p.part=s.part "
            "LEFT JOIN group_offsets g ON g.grp=:app AND g.topic_id=s.topic_id AND g.part=s.part "
            "LEFT JOIN leases l ON l.app=:app AND l.topic_id=s.topic_id AND l.part=s.part "
            "ORDER BY t.name, p.part",
            {"app": app},
        ).fetchall()
    return [
        PartitionStatus(
            topic=topic,
            partition=part,
            end_offset=end,
            committed_offset=committed,
            lag=end - (committed or 0),
            committed_at=committed_at,
            lease_epoch=epoch,
            lease_owner=owner,
            lease_acquired=acquired,
        )
        for topic, part, end, committed, committed_at, epoch, owner, acquired in rows
    ]


def retention_text(ttl: float | None, max_keys: int | None) -> str:
    parts = []
    if ttl is not None:
        parts.append(f"ttl {_duration(ttl)}")
    if max_keys is not None:
        parts.append(f"newest {max_keys:,}")
    return ", ".join(parts) or "-"


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def step_status(
    store: SQLiteStore,
    app: str,
    topology: str,
    retention: dict[str, dict[str, Any]] | None = None,
) -> list[StepStatus]:
    """The topology's stateful steps, plus any step that still holds rows without one."""
    declared = {s[0]: (s[1], s[2]) for s in json.loads(topology)}
    with store.lock:
        state = dict(
            store.conn.execute(
                "SELECT step, COUNT(*) FROM state WHERE app=? GROUP BY step", (app,)
            ).fetchall()
        )
        dedup = {
            r[0]: (r[1], r[2])
            for r in store.conn.execute(
                "SELECT step, COUNT(*), MIN(seen) FROM dedup WHERE app=? GROUP BY step", (app,)
            )
        }
    out = []
    for name in sorted(declared.keys() | state.keys() | dedup.keys()):
        kind, topic = declared.get(name, ("?", None))
        n_dedup, oldest = dedup.get(name, (0, None))
        kept = (retention or {}).get(name)
        ret = retention_text(kept["ttl"], kept["max_keys"]) if kept else None
        out.append(StepStatus(name, kind, topic, state.get(name, 0), n_dedup, oldest, ret))
    return out


def sink_status(store: SQLiteStore, app: str) -> list[SinkStatus]:
    with store.lock:
        pending = dict(
            store.conn.execute(
                "SELECT sink, COUNT(*) FROM outbox WHERE app=? GROUP BY sink", (app,)
            ).fetchall()
        )
        progress = {
            r[0]: (r[1], r[2])
            for r in store.conn.execute(
                "SELECT sink, flushed_seq, position FROM sink_progress WHERE app=?", (app,)
            )
        }
    out = []
    for name in sorted(pending.keys() | progress.keys()):
        flushed, position = progress.get(name, (-1, 0))
        out.append(SinkStatus(name, pending.get(name, 0), flushed + 1, position))
    return out


def effect_status(store: SQLiteStore, app: str) -> list[EffectStatus]:
    with store.lock:
        conn = store.conn
        # The journal's table is created by the first effect sink that opens.
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name='effects'").fetchone():
            return []
        counts = conn.execute(
            "SELECT sink, SUM(status='pending'), SUM(status='pending' AND attempts>0), "
            "SUM(status='done'), SUM(status='dead') FROM effects WHERE app=? "
            "GROUP BY sink ORDER BY sink",
            (app,),
        ).fetchall()
        # SQLite takes the bare column `error` from the row that has the MIN(seq).
        errors = {
            sink: error
            for sink, error, _ in conn.execute(
                "SELECT sink, error, MIN(seq) FROM effects WHERE app=? AND status='pending' "
                "AND attempts>0 GROUP BY sink",
                (app,),
            )
        }
    return [
        EffectStatus(sink, int(p), int(f), int(d), int(x), errors.get(sink))
        for sink, p, f, d, x in counts
    ]


def _unknown_app(store: SQLiteStore, app: str, names: list[str]) -> str:
    return f"no app named '{app}' in store '{store.path}' (apps: {', '.join(names) or 'none'})"


# -- reset ------------------------------------------------------------------------


def reset_plan(store: SQLiteStore, app: str) -> dict[str, int]:
    """How many rows `reset_app` would delete, per table."""
    with store.lock:
        counts = {
            table: store.conn.execute(
                f"SELECT COUNT(*) FROM {table} WHERE {column}=?", (app,)
            ).fetchone()[0]
            for table, column, _ in APP_TABLES
        }
    _require_rows(store, app, counts)
    return counts


def reset_app(store: SQLiteStore, app: str) -> dict[str, int]:
    """Delete everything the app owns in one transaction; returns rows deleted per table.

    A running exactly-once instance of the app loses its leases with the rest, so its
    next commit fails the fencing check instead of writing offsets over the reset.
    """
    deleted: dict[str, int] = {}
    with store.transaction() as conn:
        for table, column, _ in APP_TABLES:
            deleted[table] = conn.execute(f"DELETE FROM {table} WHERE {column}=?", (app,)).rowcount
        _require_rows(store, app, deleted)
    return deleted


def describe_rows(counts: dict[str, int]) -> str:
    """'3 committed offsets, 0 state keys, ...' for a `reset_plan`/`reset_app` result."""
    labels = {table: label for table, _, label in APP_TABLES}
    return ", ".join(f"{n} {labels[table]}" for table, n in counts.items())


def _require_rows(store: SQLiteStore, app: str, counts: dict[str, int]) -> None:
    # Nothing matched: most likely a typo in the app name, which must not look like a
    # successful reset.
    if not any(counts.values()):
        raise ConfigError(_unknown_app(store, app, app_names(store)))

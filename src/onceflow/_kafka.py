"""The Kafka backend: the same commit protocol on Kafka transactions (EOS v2).

One transactional producer per worker, with a stable transactional id per worker slot
(`App(worker=N)` or ONCEFLOW_WORKER), so a restarted worker fences its predecessor and
aborts its open transaction at once. Input offsets go into the transaction with the
consumer group metadata, so a worker that lost its partitions in a rebalance cannot
commit them either. Keyed state and dedup ids live in a local SQLite file per input
partition, plus a compacted changelog topic written in the same transaction; the local
file records the changelog offset it holds, so after a crash only the tail is replayed,
and a partition that moves to another worker is rebuilt from the changelog. The effect
journal of an `EffectSink` lives there too, beside the state of the partition whose
inputs produced the effects.

A worker stops (`FencedError`) only when another live process runs its slot. Outages,
pauses and starved CPUs produce the same client errors (a fenced static member, a
refused generation, a producer epoch bumped by the broker's timeout abort): then the
epoch is dropped, the dead client replaced, and the worker goes on by itself, saying
once that Kafka is unreachable and once that it is back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import msgspec

from ._backend import DedupRow, RebalanceListener, SessionOptions, StateRow
from ._crash import from_env
from ._dataflow import topology_problems
from ._errors import ConfigError, FencedError, StoreError, TopologyError, UnavailableError
from ._kafka_common import (
    CLIENT_LOG,
    KafkaURL,
    Waiting,
    decode_headers,
    decode_key,
    encode_headers,
    encode_key,
    is_outage,
    kafka_module,
    kafka_partition,
    transient,
)
from ._records import Columns, Record
from ._runtime import Batch

if TYPE_CHECKING:
    from ._backend import Backend, ConsumerClient, ProducerClient, Session, Transaction
    from ._effect_journal import Journal
    from ._sqlite import SQLiteStore

log = logging.getLogger("onceflow")

PartKey = tuple[int, str]
TP = tuple[str, int]
_STATE, _DEDUP, _EFFECT = b"s", b"d", b"e"
_msgpack_enc = msgspec.msgpack.Encoder()
_msgpack_dec = msgspec.msgpack.Decoder()

# Admin and transaction calls wait this long for the broker; past it the outcome is
# unknown and the producer is recreated (which fences the old one) rather than retried.
TXN_TIMEOUT_S = 30.0
# How long one request for stable offsets or watermarks may wait before the worker says
# in its log that it is waiting (and asks again, for as long as it takes).
_STABLE_WAIT_S = 2.0
# A restore that got nothing new for this long says so in the log (once).
_STALL_LOG_S = 5.0
# Kafka's default delete.retention.ms, for a changelog whose setting cannot be read.
_DEFAULT_TOMBSTONE_S = 86_400.0
# A held partition's local store with nothing new to apply is marked current again at
# most this often (one small write), so an idle partition is not rebuilt whole after a
# restart only because its last write is older than the changelog keeps tombstones.
_SYNC_REFRESH_S = 60.0
# The group session: a worker that stops heartbeating (a SIGKILL, a lost machine) hands
# its partitions on within this time. A broker outage longer than this ends every
# member's session; the workers rejoin when it is back (`KafkaSession._consumer_failed`).
SESSION_TIMEOUT_S = 10.0
# While Kafka cannot be reached, how often a worker asks whether it is back: it says so,
# and resumes, within this time of the broker answering again.
_PROBE_EVERY_S = 1.0
# The waits that cannot be skipped (an epoch whose commit is in doubt) back off from the
# first figure to the second: fast after a blip, without hammering a broker that is down.
_BACKOFF_S = (0.2, 5.0)


def _retrying(ck: Any, fn: Callable[[], Any], what: str) -> Any:
    """Retry a metadata call through the moments after a topic is created or a broker
    restarts, when partitions have no leader yet."""
    deadline = time.monotonic() + TXN_TIMEOUT_S
    while True:
        try:
            return fn()
        except ck.KafkaException as exc:
            if time.monotonic() > deadline or (
                not exc.args[0].retriable()
                and exc.args[0].code()
                not in (
                    ck.KafkaError.NOT_LEADER_FOR_PARTITION,
                    ck.KafkaError.LEADER_NOT_AVAILABLE,
                    ck.KafkaError.UNKNOWN_TOPIC_OR_PART,
                )
            ):
                raise StoreError(f"{what}: {exc.args[0]}") from exc
            time.sleep(0.2)


def _bounded(fn: Callable[[], Any], what: str) -> Any:
    """A transactional client call that returns within TXN_TIMEOUT_S, whatever happens.

    librdkafka's send_offsets_to_transaction can block far past its own timeout when the
    group coordinator went away mid-transaction (librdkafka#5456): seen here as a worker
    stuck for minutes after a broker restart, until the group evicted it. The call runs
    in a thread; one that does not return in time is abandoned and reported as a
    failure, and the caller's recovery (abort, or a new producer, which fences the old
    one) takes over: the transaction cannot commit behind the new producer's back."""
    box: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            box.append((True, fn()))
        except BaseException as exc:
            box.append((False, exc))

    t = threading.Thread(target=run, name=f"onceflow-{what}", daemon=True)
    t.start()
    t.join(TXN_TIMEOUT_S + 1.0)
    if not box:
        raise StoreError(
            f"{what} did not return within {TXN_TIMEOUT_S:.0f}s (the broker or its "
            "coordinator does not answer); the transaction is abandoned"
        )
    ok, value = box[0]
    if ok:
        return value
    raise value


def transaction_timeout_ms(commit_interval: float) -> int:
    """The broker aborts a transaction open longer than this. A crashed worker's open
    transaction is aborted sooner, when its slot restarts; this bounds how long readers
    wait when a worker dies for good. 20 commit intervals, at least 10 s, at most 15 min."""
    return int(min(900_000, max(10_000, commit_interval * 20_000)))


# The layout of a local store. A store of another layout is dropped and rebuilt from
# the changelog (the source of truth): 2 keeps keys and ids as the bytes Kafka has.
_STORE_FORMAT = 2


class LocalStore:
    """The state and dedup ids of one input partition, on disk, the changelog offset up
    to which they are current, and when they were last known current (`synced`)."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v INTEGER)")
        if self._meta("format") not in (None, _STORE_FORMAT) or (
            self._meta("format") is None and self._meta("changelog_next") is not None
        ):
            self.conn.execute("BEGIN")
            for table in ("state", "dedup", "meta", "effects"):
                self.conn.execute(f"DROP TABLE IF EXISTS {table}")
            self.conn.execute("CREATE TABLE meta(k TEXT PRIMARY KEY, v INTEGER)")
            self.conn.execute("COMMIT")
        for stmt in (
            "CREATE TABLE IF NOT EXISTS state(step TEXT, key BLOB, value BLOB, "
            "PRIMARY KEY(step, key)) WITHOUT ROWID",
            "CREATE TABLE IF NOT EXISTS dedup(step TEXT, id BLOB, seen REAL, outcome BLOB, "
            "PRIMARY KEY(step, id)) WITHOUT ROWID",
            "CREATE TABLE IF NOT EXISTS effects(sink TEXT, key TEXT, off INTEGER, idx INTEGER, "
            "payload BLOB, status TEXT, response BLOB, error TEXT, PRIMARY KEY(sink, key)) "
            "WITHOUT ROWID",
            f"INSERT OR IGNORE INTO meta(k, v) VALUES('format', {_STORE_FORMAT})",
        ):
            self.conn.execute(stmt)
        self.synced = (self._meta("synced_ms") or 0) / 1000.0
        # The changelog offset this process last found or left the copy at. Two
        # processes of one worker slot (a paused one that resumed, and its successor)
        # share the copy's file: every write is a compare-and-set on it, so that a late
        # write of the one that lost the slot never rolls back what the other applied.
        self.known = self.next_offset

    def _meta(self, k: str) -> int | None:
        row = self.conn.execute("SELECT v FROM meta WHERE k=?", (k,)).fetchone()
        return None if row is None else int(row[0])

    @property
    def next_offset(self) -> int:
        return self._meta("changelog_next") or 0

    def close(self) -> None:
        self.conn.close()

    def claim(self) -> int:
        """Take the copy as it is now (a restore starts here); its changelog offset."""
        self.known = self.next_offset
        return self.known

    def _begin(self) -> None:
        """Open a write that holds only if the copy is where this process left it."""
        self.conn.execute("BEGIN IMMEDIATE")
        now = self.next_offset
        if now != self.known:
            self.conn.execute("ROLLBACK")
            raise StoreError(
                f"the local state copy {self.path} was moved to changelog offset {now} by "
                f"another process of this worker slot (this one had it at {self.known}); "
                "this process takes its partitions over again from the changelog"
            )

    def wipe(self) -> None:
        self._begin()
        for table in ("state", "dedup", "effects"):
            self.conn.execute(f"DELETE FROM {table}")
        self.conn.execute("DELETE FROM meta WHERE k<>'format'")
        self.conn.execute("COMMIT")
        self.known = 0
        self.synced = 0.0

    def load(self, table: str, step: str, keys: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        col = "key" if table == "state" else "id"
        for i in range(0, len(keys), 500):
            chunk = [encode_key(k) for k in keys[i : i + 500]]
            marks = ",".join("?" * len(chunk))
            if table == "state":
                for key, value in self.conn.execute(
                    f"SELECT key, value FROM state WHERE step=? AND key IN ({marks})",
                    (step, *chunk),
                ):
                    out[decode_key(key) or ""] = _msgpack_dec.decode(value)
            else:
                for bid, seen, outcome in self.conn.execute(
                    f"SELECT {col}, seen, outcome FROM dedup WHERE step=? AND id IN ({marks})",
                    (step, *chunk),
                ):
                    out[decode_key(bid) or ""] = (seen, outcome)
        return out

    def apply(self, records: Iterable[tuple[bytes, bytes | None]], next_offset: int) -> int:
        """Apply changelog records (key, value or None) and record the offset reached:
        the store is current up to there, as of now."""
        # The last record of a key wins, as in the compacted topic; grouped, each kind
        # is one executemany (a restore applies hundreds of thousands of records).
        state: dict[tuple[str, bytes], bytes | None] = {}
        dedup: dict[tuple[str, bytes], bytes | None] = {}
        effects: dict[tuple[str, str], bytes] = {}
        n = 0
        for key, value in records:
            n += 1
            kind, _, rest = key.partition(b"\x00")
            step_b, _, k = rest.partition(b"\x00")
            step = step_b.decode()
            if kind == _STATE:
                state[(step, k)] = value
            elif kind == _DEDUP:
                dedup[(step, k)] = value
            elif kind == _EFFECT and value is not None:
                effects[(step, k.decode("utf-8", "surrogateescape"))] = value
        self._begin()
        self.conn.executemany(
            "INSERT OR REPLACE INTO state(step, key, value) VALUES(?,?,?)",
            [(step, k, v) for (step, k), v in state.items() if v is not None],
        )
        self.conn.executemany(
            "DELETE FROM state WHERE step=? AND key=?",
            [sk for sk, v in state.items() if v is None],
        )
        self.conn.executemany(
            "INSERT OR REPLACE INTO dedup(step, id, seen, outcome) VALUES(?,?,?,?)",
            [(step, k, *_msgpack_dec.decode(v)) for (step, k), v in dedup.items() if v is not None],
        )
        self.conn.executemany(
            "DELETE FROM dedup WHERE step=? AND id=?",
            [sk for sk, v in dedup.items() if v is None],
        )
        self.conn.executemany(
            "INSERT OR REPLACE INTO effects(sink, key, off, idx, payload, status, "
            "response, error) VALUES(?,?,?,?,?,?,?,?)",
            [(sink, k, *_msgpack_dec.decode(v)) for (sink, k), v in effects.items()],
        )
        self._mark(next_offset)
        self.conn.execute("COMMIT")
        return n

    def touch(self) -> None:
        """Nothing new in the changelog: the store is still current, as of now."""
        self._begin()
        self._mark(self.known)
        self.conn.execute("COMMIT")

    def _mark(self, next_offset: int) -> None:
        now = time.time()
        self.conn.executemany(
            "INSERT OR REPLACE INTO meta(k, v) VALUES(?, ?)",
            [("changelog_next", next_offset), ("synced_ms", int(now * 1000))],
        )
        self.known = next_offset
        self.synced = now

    def pending_effects(self, sink: str) -> list[tuple[str, int, int, bytes]]:
        """(key, input offset, output index, payload) of each pending intent, in order."""
        return [
            (key, int(off), int(idx), payload)
            for key, off, idx, payload in self.conn.execute(
                "SELECT key, off, idx, payload FROM effects WHERE sink=? AND status='pending' "
                "ORDER BY off, idx",
                (sink,),
            )
        ]

    def purge_dedup(
        self, step: str, ttl: float | None, max_keys: int | None, limit: int = 50_000
    ) -> list[str]:
        """The ids that a dedupe step's retention forgets now. Nothing is deleted here:
        the caller writes their tombstones into the epoch's transaction, and they are
        applied once it commits. At most `limit`, the rest at the next purge: the first
        purge after a long pause (a ttl that expired millions of ids) must not put them
        all into one transaction."""
        cut = None if ttl is None else time.time() - ttl
        if max_keys is not None:
            row = self.conn.execute(
                "SELECT seen FROM dedup WHERE step=? ORDER BY seen DESC LIMIT 1 OFFSET ?",
                (step, max_keys - 1),
            ).fetchone()
            if row is not None:
                cut = row[0] if cut is None else max(cut, row[0])
        if cut is None:
            return []
        return [
            decode_key(bid) or ""
            for (bid,) in self.conn.execute(
                "SELECT id FROM dedup WHERE step=? AND seen<? LIMIT ?", (step, cut, limit)
            )
        ]

    def counts(self) -> tuple[int, int]:
        (s,) = self.conn.execute("SELECT COUNT(*) FROM state").fetchone()
        (d,) = self.conn.execute("SELECT COUNT(*) FROM dedup").fetchone()
        return int(s), int(d)


def changelog_key(kind: bytes, step: str, key: str) -> bytes:
    return kind + b"\x00" + step.encode() + b"\x00" + encode_key(key)


class _Outage:
    """Says once that Kafka cannot be reached and once that it is back.

    Every client of a worker notices an outage on its own, many times a second, and
    some of it late (an error queued while the worker waited in a call, a coordinator
    still loading after a restart): so an error only starts an outage once a metadata
    request (`probe`) fails too, and a probe that answers ends it. The operator gets two
    lines: since when the worker waits, and when it resumed."""

    def __init__(self, bootstrap: str, worker: int, probe: Callable[[], bool]) -> None:
        self.bootstrap = bootstrap
        self.worker = worker
        self.probe = probe
        self.since: float | None = None
        self._last_probe = -_PROBE_EVERY_S
        self._lock = threading.Lock()

    def _probe_due(self) -> bool:
        now = time.monotonic()
        if now - self._last_probe < _PROBE_EVERY_S:
            return False
        self._last_probe = now
        return True

    def down(self, reason: str) -> None:
        """A client error that an outage would explain."""
        if self.since is not None or not self._probe_due() or self.probe():
            return
        with self._lock:
            if self.since is not None:
                return
            self.since = time.monotonic()
        log.warning(
            "Kafka at %s is unreachable (%s); worker %d waits and resumes by itself, "
            "nothing is lost",
            self.bootstrap,
            reason,
            self.worker,
        )

    def check(self) -> None:
        """While down, at most once a second: is Kafka back?"""
        if self.since is not None and self._probe_due() and self.probe():
            self.up()

    def up(self) -> None:
        """Kafka answered."""
        with self._lock:
            if self.since is None:
                return
            took, self.since = time.monotonic() - self.since, None
        log.warning(
            "Kafka at %s is reachable again after %.0fs; worker %d resumes",
            self.bootstrap,
            took,
            self.worker,
        )


class KafkaSession:
    """One worker process's hold on Kafka: consumer, transactional producer, stores."""

    # No SQL tables: sinks that write into them are refused on Kafka (`App.build`).
    sql_store: SQLiteStore | None = None

    def __init__(
        self,
        url: KafkaURL,
        app: str,
        *,
        worker: int,
        state_dir: str,
        commit_interval: float,
        step_topics: dict[str, str],
        topic_partitions: int,
    ) -> None:
        self.ck = kafka_module()
        self.url = url
        self.app = app
        self.worker = worker
        self.state_dir = state_dir
        self.step_topics = step_topics
        self.default_partitions = topic_partitions
        self.commit_interval = commit_interval
        self._outage = _Outage(url.bootstrap, worker, self._reachable)
        # The worker slot: the transactional id and the static group member id.
        self._slot_id = url.topic(f"onceflow-{app}-{worker}")
        # Named per process in the broker's logs and in `kafka-consumer-groups`.
        self._client_id = f"{self._slot_id}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        # Every group member id this process's consumers had: the group holding the
        # slot's static member under any other id means another process took the slot
        # (see `_replaced`).
        self._member_ids: set[str] = set()
        # No error_cb here: an admin client serves it on a thread of its own, which the
        # outage's probe (a call of this same client) must not run on.
        self.admin = self.ck.admin.AdminClient(self._conf())
        self.producer: Any = None
        self.consumer: Any = None
        # A transactional call failed, so the producer may still have a request in flight
        # that could land on a later transaction (librdkafka has no KIP-890 client,
        # librdkafka#5423): it is replaced, which fences it, before anything else is sent.
        self._producer_ok = False
        # The producer has a transaction open (rollback aborts only that).
        self._in_txn = False
        # Its init_transactions has not finished: the next attempt resumes it.
        self._init_pending = False
        # The producer was fenced while it was not known whether another process took
        # the slot (the broker was unreachable): found out before a new one is made.
        self._fence_unresolved = False
        # The consumer died (the group fenced its static member id): why.
        self._consumer_dead: str | None = None
        # rewind() could not read the committed offsets: poll does it first.
        self._rewind_pending = False
        # The producer was fenced: poll takes the partitions over again first.
        self._retake = False
        # Partitions the group gave this worker whose takeover (`_on_assign`) failed:
        # nothing of them is read until poll has taken them over.
        self._untaken: list[Any] = []
        self.local: dict[tuple[str, int], LocalStore] = {}
        self.assigned: list[tuple[str, int]] = []
        self._partitions: dict[str, int] = {}
        self._pending: dict[tuple[str, int], list[tuple[bytes, bytes | None]]] = {}
        self._produced: dict[tuple[str, int], int] = {}
        self._eof: set[tuple[str, int]] = set()
        self._wrote_inputs: set[tuple[str, int]] = set()
        self._sources: list[str] = []
        # Given by the App in `acquire`: commit the epoch in flight before partitions are
        # taken away, drop it when they are lost, let sinks recover on partitions this
        # worker gets (and say where PostgreSQL's recorded offsets are ahead of the
        # group's), and forget caches and sinks' partitions after they went.
        self.listener: RebalanceListener = _NO_LISTENER
        # Per partition, the offset an external sink recorded as done: never read below.
        self.floors: dict[TP, int] = {}
        # The highest offset per partition this session saw committed (read, or written
        # by a transaction that committed), and those the open transaction sends.
        self._known: dict[TP, int] = {}
        self._sending: dict[TP, int] = {}
        self.fenced = False
        self._sent_offsets = False
        self._closing = False
        # Per input topic, how long its changelog keeps tombstones (read at start).
        self._tombstone_s: dict[str, float] = {}
        # Faults at the restore's steps (ONCEFLOW_CRASH_AT / ONCEFLOW_PAUSE_AT).
        self.crash = from_env()

    # -- names ----------------------------------------------------------------------

    def changelog(self, topic: str) -> str:
        return f"{self.app}.{topic}.changelog"

    def _meta_topic(self) -> str:
        return f"{self.app}.meta"

    # -- start ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _starting(self, what: str) -> Iterator[None]:
        """A start step that needs the broker. The App waits only for UnavailableError
        before a session ran (any other failure to start is a configuration's), so a
        client error while no broker answers becomes one: a worker started during an
        outage waits for the broker instead of exiting."""
        try:
            yield
        except (self.ck.KafkaException, StoreError) as exc:
            if isinstance(exc, FencedError) or self._reachable():
                raise
            self._outage.down(f"{what}: {exc}")
            raise UnavailableError(
                f"worker {self.worker} cannot {what} on Kafka at {self.url.bootstrap} "
                f"({exc}); it retries once the broker answers"
            ) from exc

    def ensure_topics(self, topics: dict[str, int]) -> None:
        with self._starting("create its topics"):
            self._ensure_topics(topics)

    def _ensure_topics(self, topics: dict[str, int]) -> None:
        """Create missing topics: inputs, outputs, dead letters, then the changelogs with
        as many partitions as their input has (which may predate the App)."""
        self._create({name: (parts, {}) for name, parts in topics.items()})
        compact = {"cleanup.policy": "compact"}
        self._create(
            {
                self.changelog(topic): (self.partitions_of(topic), compact)
                for topic in set(self.step_topics.values())
            }
            | {self._meta_topic(): (1, compact)}
        )
        for topic in set(self.step_topics.values()):
            if self.partitions_of(self.changelog(topic)) != self.partitions_of(topic):
                raise TopologyError(
                    f"changelog '{self.changelog(topic)}' has "
                    f"{self.partitions_of(self.changelog(topic))} partitions but '{topic}' has "
                    f"{self.partitions_of(topic)}: they must be co-partitioned. Operator "
                    "action: recreate the changelog with the input's partition count"
                )
        self._read_tombstone_retention()

    def _read_tombstone_retention(self) -> None:
        """delete.retention.ms of each changelog, as the broker applies it (the topic's
        own setting or the cluster's default), for `_restore_from`."""
        admin = self.ck.admin
        topics = {self.url.topic(self.changelog(t)): t for t in set(self.step_topics.values())}
        if not topics:
            return
        futures = self.admin.describe_configs(
            [admin.ConfigResource(admin.ResourceType.TOPIC, name) for name in topics],
            request_timeout=TXN_TIMEOUT_S,
        )
        for resource, fut in futures.items():
            try:
                entry = fut.result().get("delete.retention.ms")
            except self.ck.KafkaException as exc:
                raise StoreError(f"cannot read the config of '{resource.name}': {exc}") from exc
            if entry is not None and entry.value is not None:
                self._tombstone_s[topics[resource.name]] = int(entry.value) / 1000.0

    def _create(self, wanted: dict[str, tuple[int, dict[str, str]]]) -> None:
        md = self.admin.list_topics(timeout=TXN_TIMEOUT_S)
        missing = [
            self.ck.admin.NewTopic(self.url.topic(name), num_partitions=parts, config=cfg)
            for name, (parts, cfg) in wanted.items()
            if self.url.topic(name) not in md.topics
        ]
        if missing:
            futures = self.admin.create_topics(missing, request_timeout=TXN_TIMEOUT_S)
            for name, fut in futures.items():
                try:
                    fut.result()
                except self.ck.KafkaException as exc:
                    if exc.args[0].code() != self.ck.KafkaError.TOPIC_ALREADY_EXISTS:
                        raise StoreError(f"cannot create topic '{name}': {exc}") from exc
        self._refresh_metadata(list(wanted))

    def _refresh_metadata(self, names: list[str]) -> None:
        deadline = time.monotonic() + TXN_TIMEOUT_S
        while True:
            md = self.admin.list_topics(timeout=TXN_TIMEOUT_S)
            ok = True
            for name in names:
                t = md.topics.get(self.url.topic(name))
                if t is None or t.error is not None or not t.partitions:
                    ok = False
                    continue
                self._partitions[name] = len(t.partitions)
            if ok or time.monotonic() > deadline:
                return
            time.sleep(0.2)

    def partitions_of(self, topic: str) -> int:
        n = self._partitions.get(topic)
        if n is None:
            self._refresh_metadata([topic])
            n = self._partitions.get(topic)
            if n is None:
                raise StoreError(f"topic '{topic}' does not exist on {self.url.bootstrap}")
        return n

    def check_topology(self, sig: list[list[str]], reset_hint: str, config: dict[str, Any]) -> None:
        with self._starting("read its topology"):
            self._check_topology(sig, config)

    def _check_topology(self, sig: list[list[str]], config: dict[str, Any]) -> None:
        """The last topology written to the app's meta topic must match this one."""
        meta = self.url.topic(self._meta_topic())
        c = self.ck.Consumer(
            self._conf(
                **{
                    "group.id": f"onceflow-meta-{os.getpid()}",
                    "isolation.level": "read_committed",
                    "enable.auto.commit": False,
                }
            )
        )
        stored = None
        try:
            tp = self.ck.TopicPartition(meta, 0, self.ck.OFFSET_BEGINNING)
            _, high = _retrying(
                self.ck,
                lambda: c.get_watermark_offsets(tp, timeout=TXN_TIMEOUT_S, cached=False),
                f"reading {meta}",
            )
            c.assign([tp])
            while high > 0:
                msg = c.poll(1.0)
                if msg is None or msg.error():
                    if c.position([tp])[0].offset >= high:
                        break
                    continue
                if msg.key() == b"topology":
                    stored = msg.value()
                if msg.offset() >= high - 1:
                    break
        finally:
            c.close()
        text = json.dumps(sig)
        if stored is not None and stored.decode() != text:
            raise TopologyError(
                f"app '{self.app}' changed its stateful steps over existing state: "
                + "; ".join(topology_problems(json.loads(stored), sig))
                + ". Operator action: restore the previous pipeline, or use a new app name "
                "(or store namespace) to start from empty state"
            )
        # The config (commit interval, topics, retention) may change between runs; it is
        # written every start so that `onceflow status` shows the current one.
        p = self.ck.Producer(self._conf(acks="all"))
        if stored is None:
            p.produce(meta, key=b"topology", value=text.encode())
        p.produce(meta, key=b"config", value=json.dumps(config).encode())
        p.flush(TXN_TIMEOUT_S)

    def _conf(self, **extra: Any) -> dict[str, Any]:
        """Client settings: librdkafka's own log lines go through `logging`, held back
        when they repeat (`CLIENT_LOG`), never straight to stderr."""
        return {"bootstrap.servers": self.url.bootstrap, "logger": CLIENT_LOG, **extra}

    def acquire(self, sources: Iterable[str], listener: RebalanceListener) -> None:
        self._sources = list(sources)
        self.listener = listener
        self._new_producer(first=True)
        self._new_consumer()

    def _new_consumer(self) -> None:
        """(Re)create the group consumer of this worker slot and subscribe it."""
        old, self.consumer = self.consumer, None
        if old is not None:
            # A dead consumer's partitions are lost, not revoked: nothing may commit for
            # them, and its close must not run the App's callbacks (they check `consumer`).
            lost = list(self.assigned)
            if lost:
                self.listener.lost(lost)
                self._drop([self.ck.TopicPartition(self.url.topic(t), p) for t, p in lost])
            with contextlib.suppress(Exception):
                old.close()
        consumer = self.ck.Consumer(
            self._conf(
                **{
                    "group.id": self.url.topic(self.app),
                    "client.id": self._client_id,
                    "error_cb": self._client_error,
                    "isolation.level": "read_committed",
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "auto.offset.reset": "earliest",
                    "partition.assignment.strategy": "range",
                    # Static membership: a restarted worker slot gets its partitions back
                    # at once instead of after the dead member's session times out.
                    "group.instance.id": self._slot_id,
                    # A dead worker's partitions move on within this time.
                    "session.timeout.ms": int(SESSION_TIMEOUT_S * 1000),
                    "heartbeat.interval.ms": 1_000,
                    "fetch.wait.max.ms": 20,
                    # The end of a partition is known from the fetcher, which steps over
                    # transaction markers; the consumer's position does not.
                    "enable.partition.eof": True,
                }
            )
        )
        consumer.subscribe(
            [self.url.topic(t) for t in self._sources],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self.consumer = consumer
        self._consumer_dead = None
        self._untaken = []

    def _new_producer(self, *, first: bool = False) -> None:
        """(Re)create the transactional producer; init_transactions fences every older
        producer of this worker slot and settles its open transaction (commits one whose
        commit the coordinator already has, aborts any other).

        The first one refuses a broker that answers but cannot run transactions; later,
        a producer that cannot be made means Kafka is unreachable, and the App waits.

        A producer whose init_transactions timed out is resumed, never replaced: its
        InitProducerId may still reach the coordinator after a newer producer's, and would
        fence that one. Nor is a replaced producer called again: an abort from it would
        ask for an epoch bump with its own id and epoch (KIP-360), which the coordinator
        grants to the epoch just before the current one, fencing the new producer."""
        self._producer_ok = self._in_txn = False
        if self._init_pending and self.producer is not None:
            producer = self.producer
        else:
            if self.producer is not None:
                with contextlib.suppress(Exception):
                    self.producer.flush(0)
            producer = self.producer = self._make_producer()
        self._init_pending = True
        try:
            _bounded(lambda: producer.init_transactions(TXN_TIMEOUT_S), "init_transactions")
        except Exception as exc:
            reason = exc.args[0] if isinstance(exc, self.ck.KafkaException) else exc
            if isinstance(exc, self.ck.KafkaException) and exc.args[0].fatal():
                self._init_pending = False  # dead: the next attempt makes a new one
            if first and self._reachable(5.0):
                raise ConfigError(
                    f"Kafka at {self.url.bootstrap} cannot run transactions ({reason}). "
                    "Operator action: the broker needs transaction.state.log.replication."
                    "factor and transaction.state.log.min.isr no larger than the number of "
                    "brokers"
                ) from exc
            self._outage.down(f"init_transactions: {reason}")
            raise UnavailableError(
                f"worker {self.worker} cannot make a transactional producer on Kafka at "
                f"{self.url.bootstrap} ({reason}); it retries once the broker answers"
            ) from exc
        self._init_pending = False
        self._producer_ok = True
        self._outage.up()

    def _make_producer(self) -> Any:
        return self.ck.Producer(
            self._conf(
                **{
                    "transactional.id": self._slot_id,
                    "error_cb": self._client_error,
                    "enable.idempotence": True,
                    "transaction.timeout.ms": transaction_timeout_ms(self.commit_interval),
                    "linger.ms": 2,
                    # The coordinator answers CONCURRENT_TRANSACTIONS right after a
                    # commit; the default 100 ms backoff would then delay every next epoch.
                    "retry.backoff.ms": 10,
                    "batch.num.messages": 10_000,
                    "queue.buffering.max.messages": 2_000_000,
                    "queue.buffering.max.kbytes": 1_048_576,
                }
            )
        )

    # -- outages and fencing ----------------------------------------------------------

    def _client_error(self, err: Any) -> None:
        """librdkafka's error_cb. Errors it retries by itself are reported here, not
        raised: all brokers down is the start of an outage."""
        if err.code() == self.ck.KafkaError._ALL_BROKERS_DOWN:
            self._outage.down(err.str())

    def _unreachable(self, err: Any) -> bool:
        """An error that a broker coming back clears: the worker waits, it does not stop."""
        e = self.ck.KafkaError
        return bool(err.retriable()) or err.code() in (
            e._TRANSPORT,
            e._ALL_BROKERS_DOWN,
            e._RESOLVE,
            e._TIMED_OUT,
            e._TIMED_OUT_QUEUE,
            e._MSG_TIMED_OUT,
            e._WAIT_COORD,
            e.REQUEST_TIMED_OUT,
            e.NETWORK_EXCEPTION,
            e.NOT_COORDINATOR,
            e.COORDINATOR_NOT_AVAILABLE,
            e.COORDINATOR_LOAD_IN_PROGRESS,
            e.LEADER_NOT_AVAILABLE,
            e.NOT_LEADER_FOR_PARTITION,
            e.UNKNOWN_TOPIC_OR_PART,
            e._UNKNOWN_PARTITION,
        )

    def _reachable(self, timeout: float = _PROBE_EVERY_S) -> bool:
        """Whether a broker answers a metadata request."""
        try:
            self.admin.list_topics(timeout=timeout)
        except self.ck.KafkaException:
            return False
        return True

    def _replaced(self) -> bool | None:
        """Whether another live process holds this worker slot: True, False, or None when
        Kafka cannot tell now.

        A producer of the slot is fenced by a newer one (another process started on the
        slot) but also by the broker itself, which bumps the epoch when it aborts a
        transaction that outlived transaction.timeout.ms (an outage, a paused or starved
        worker). And the group fences a static member that rejoined under a new member id
        after its session ran out. Only the first is a reason to stop; it is the one where
        the group holds the slot's static member under a member id that none of this
        process's consumers ever had. (Not told by client id: a static member that
        replaces another keeps the replaced one's client id in the group.)"""
        self._note_member_id()
        group = self.url.topic(self.app)
        if not self._coordinator_answers():
            self._outage.down(f"describing group {group}: no broker answers")
            return None
        try:
            futures = self.admin.describe_consumer_groups([group], request_timeout=10.0)
            desc = futures[group].result()
        except self.ck.KafkaException as exc:
            self._outage.down(f"describing group {group}: {exc.args[0]}")
            return None
        return any(
            m.group_instance_id == self._slot_id and m.member_id not in self._member_ids
            for m in desc.members
        )

    def _coordinator_answers(self) -> bool:
        """Before a request to the group coordinator through the admin client: whether a
        broker answers now. librdkafka 2.16 aborts the whole process when such a request
        times out or loses its connection (librdkafka#4605, fix pending in #5397), so
        none is sent while Kafka is unreachable; the window left is a broker dying in the
        milliseconds the request takes."""
        return self._reachable(2.0)

    def _note_member_id(self) -> None:
        """Remember the consumer's group member id (it changes when it rejoins)."""
        if self.consumer is None:
            return
        try:
            member = self.consumer.memberid()
        except (RuntimeError, self.ck.KafkaException):
            return
        if member:
            self._member_ids.add(member)

    def _fenced_error(self, why: str) -> FencedError:
        self.fenced = True
        return FencedError(
            f"app '{self.app}' worker {self.worker} was fenced ({why}): another process "
            "took over this worker slot and runs it; this one stops without committing. "
            "Operator action: run each worker slot (ONCEFLOW_WORKER) in one process only"
        )

    def _producer_failed(self, exc: BaseException) -> BaseException:
        """After any failed transactional call: the producer is replaced before the next
        transaction. A fenced one stops the worker only if another process took the
        slot. Returns the exception to raise."""
        self._producer_ok = False
        original = exc
        if not isinstance(exc, self.ck.KafkaException):
            return original
        err = exc.args[0]
        if not (err.fatal() or err.code() in self._fence_codes()):
            if self._unreachable(err):
                self._outage.down(err.str())
            return original
        replaced = self._replaced()
        if replaced:
            return self._fenced_error(err.str())
        self._fence_unresolved = replaced is None
        # Whoever fenced it (the broker, or another process of the slot that has not
        # joined the group yet) may have committed on these partitions meanwhile, and
        # the local copies (shared by the slot's processes) may lag those commits: the
        # partitions are taken over again from scratch before anything else is read.
        self._retake = True
        return StoreError(
            f"worker {self.worker}'s producer was fenced ({err.str()}) by the broker, not by "
            "another process (a transaction that outlived its timeout in an outage or a "
            "pause is aborted so); the epoch is dropped and a new producer takes over"
        )

    def _fence_codes(self) -> tuple[int, ...]:
        e = self.ck.KafkaError
        return (e._FENCED, e._FATAL, e.PRODUCER_FENCED, e.INVALID_PRODUCER_EPOCH)

    def _txn_call(self, fn: Callable[[Any], Any], what: str, *, local: bool = False) -> Any:
        """A call of the transactional producer, bounded (`_bounded`) unless it is
        `local` (it sends nothing, and a thread per epoch is not free)."""
        producer = self.producer
        try:
            return fn(producer) if local else _bounded(lambda: fn(producer), what)
        except Exception as exc:
            failed = self._producer_failed(exc)
            if failed is exc:
                raise
            raise failed from exc

    def _ensure_producer(self, wait: float = 0.0) -> None:
        """Before a transaction: a producer that no late request of a failed one can
        reach. Tries for `wait` seconds (a coordinator still loading after a restart or
        a pause), then raises UnavailableError while Kafka cannot make one."""
        deadline = time.monotonic() + wait
        backoff = _BACKOFF_S[0]
        while True:
            try:
                self._ensure_producer_once()
                return
            except UnavailableError:
                if time.monotonic() + backoff > deadline:
                    raise
                time.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_S[1])

    def _ensure_producer_once(self) -> None:
        if self.fenced:
            raise self._fenced_error("found before")
        if self._producer_ok:
            return
        if self._fence_unresolved:
            replaced = self._replaced()
            if replaced is None:
                raise UnavailableError(
                    f"worker {self.worker} cannot reach Kafka at {self.url.bootstrap} to "
                    "learn whether another process took its slot; it retries"
                )
            if replaced:
                raise self._fenced_error("its producer was fenced by a newer one")
            self._fence_unresolved = False
        self._new_producer()

    # -- rebalances -----------------------------------------------------------------

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        """Take partitions over, in this order (each step needs the one before):

        1. read their committed offsets once they are stable: with read_committed the
           broker holds the answer while a transaction that sent offsets for them is
           open (KIP-447), here a paused previous owner's, until it commits, aborts or
           times out; no offset can be committed for them after that, since the group
           generation fences every other member;
        2. bring their local stores to the changelog's end as of then (`_restore`): the
           state of exactly those offsets;
        3. let sinks resolve what is in doubt, then read the inputs from exactly those
           offsets (or where a sink recorded it is done, if that is further).

        Restoring first and letting the consumer fetch the offsets after, as before,
        lets a previous owner's paused transaction commit in between: newer offsets
        with older state."""
        if self._closing or not partitions:
            return
        self._take_over(consumer, partitions)

    def _take_over(self, consumer: Any, partitions: list[Any]) -> None:
        """`_on_assign`'s steps; if one fails, the partitions are not read at all.

        confluent-kafka assigns the partitions itself, from the group's offsets, when
        the callback raises before it called assign: the worker then read them on local
        stores that were never restored (counts from zero, re-sent ids taken as new).
        Instead nothing is assigned, the error goes to the App (an outage is waited
        out), and the next poll tries the takeover again."""
        self._untaken = []
        try:
            self._take_over_steps(consumer, partitions)
        except BaseException:
            with contextlib.suppress(Exception):
                consumer.assign([])
            self._untaken = list(partitions)
            self._drop(partitions)
            raise

    def _take_over_steps(self, consumer: Any, partitions: list[Any]) -> None:
        t0 = time.monotonic()
        keys = [(self.url.strip(tp.topic), tp.partition) for tp in partitions]
        for key in keys:
            self._eof.discard(key)
            if key not in self.assigned:
                self.assigned.append(key)
        offsets = self._stable_offsets(keys)
        stateful = set(self.step_topics.values())
        restored = self._restore([tp for tp in keys if tp[0] in stateful])
        # Caches are not touched here: partitions held before are still held, and the
        # state of new ones was never cached (a revoke drops caches in `_drop`).
        self.floors.update(self.listener.assigned(keys))
        ahead = {tp: off for tp, off in self.floors.items() if tp in offsets and off > offsets[tp]}
        if ahead:
            log.warning("resuming %s from offsets recorded by a sink (ahead of the group)", ahead)
        offsets.update(ahead)
        consumer.assign(
            [
                self.ck.TopicPartition(
                    self.url.topic(t), p, off if off >= 0 else self.ck.OFFSET_BEGINNING
                )
                for (t, p), off in offsets.items()
            ]
        )
        log.info(
            "worker %d assigned %s; restored %d changelog records in %.2fs",
            self.worker,
            ", ".join(f"{t}[{p}]" for t, p in keys),
            restored,
            time.monotonic() - t0,
        )

    def _stable_offsets(self, keys: list[TP]) -> dict[TP, int]:
        """The group's committed offsets of `keys` (negative where none), once no
        transaction that sent offsets for them is open. librdkafka asks with
        require_stable under read_committed and retries the broker's
        UNSTABLE_OFFSET_COMMIT until its timeout; here the wait has no bound, since
        taking the partitions over before the transaction ends is never safe."""
        tps = [self.ck.TopicPartition(self.url.topic(t), p) for t, p in keys]
        names = ", ".join(f"{t}[{p}]" for t, p in keys)
        waiting = Waiting(log)
        while True:
            try:
                got = self.consumer.committed(tps, timeout=_STABLE_WAIT_S)
                err = next((tp.error for tp in got if tp.error is not None), None)
            except self.ck.KafkaException as exc:
                err = exc.args[0]
            if err is None:
                waiting.over(f"worker {self.worker}: committed offsets of {names} are stable")
                return {(self.url.strip(tp.topic), tp.partition): tp.offset for tp in got}
            if not transient(self.ck, err):
                raise StoreError(f"cannot read the committed offsets of {names}: {err}")
            waiting(
                f"worker {self.worker}: committed offsets of {names} are not stable yet "
                f"({err.str()}): a previous owner's transaction on them is still open (it "
                "ends when that owner commits or aborts, or when it times out), or the "
                "broker is unreachable"
            )

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        if consumer is not self.consumer:
            return  # a dead consumer closing: `_new_consumer` dropped its partitions
        self._untaken = []
        self.listener.revoking(self._keys(partitions))
        self._drop(partitions)

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        if consumer is not self.consumer:
            return
        self._untaken = []
        self.listener.lost(self._keys(partitions))
        self._drop(partitions)

    def _keys(self, partitions: list[Any]) -> list[TP]:
        return [(self.url.strip(tp.topic), tp.partition) for tp in partitions]

    def _drop(self, partitions: list[Any]) -> None:
        keys = self._keys(partitions)
        for key in keys:
            if key in self.assigned:
                self.assigned.remove(key)
            self.floors.pop(key, None)
            store = self.local.pop(key, None)
            if store is not None:
                store.close()
        self.listener.revoked(keys)

    def _restore(self, parts: list[TP]) -> int:
        """Bring the local stores of `parts` to their changelogs' end as of now, all
        together. The end is the high watermark read now (after the offsets became
        stable), reached when read_committed fetching gets there: the end of partition
        the fetcher reports is the last stable offset, so a transaction still open below
        the high watermark is waited for, never stepped over. Whatever committed before
        the offsets were read is below that watermark, so the stores then hold the state
        of exactly those offsets. There is no "idle for a while, so done": on a loaded
        machine an empty poll says nothing."""
        if not parts:
            return 0
        for topic, part in parts:
            if (topic, part) not in self.local:
                path = os.path.join(self.state_dir, f"{topic}-{part}.db")
                self.local[(topic, part)] = LocalStore(path)
        todo: dict[TP, tuple[int, int]] = {}
        for tp, (low, high) in self._changelog_ends(parts).items():
            start = self._restore_from(tp, low, high)
            if start < high:
                todo[tp] = (start, high)
        if not todo:
            return 0
        self.crash("restoring")
        # Client-level errors (the broker is unreachable) come to error_cb, not to
        # consume(): the restore reads them between batches.
        errors: list[Any] = []
        c = self.ck.Consumer(
            {
                "bootstrap.servers": self.url.bootstrap,
                "logger": CLIENT_LOG,
                # Not a line per failed connection attempt (dozens a second while the
                # broker is down): the restore says once that it waits.
                "log_level": 2,
                "error_cb": errors.append,
                "group.id": f"onceflow-restore-{os.getpid()}",
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                # The end of a changelog is known from a fetch that returns nothing; the
                # default 500 ms wait for data would be spent on every restore.
                "fetch.wait.max.ms": 10,
            }
        )
        try:
            return self._read_changelogs(c, todo, errors)
        finally:
            c.close()

    def _restore_from(self, tp: TP, low: int, high: int) -> int:
        """Where the restore of `tp` starts, its changelog being [low, high) now."""
        topic, part = tp
        store = self.local[tp]
        start = store.claim()
        stale = None
        if start == 0:
            start = low  # a new copy
        elif start > high:
            stale = (
                "the changelog is shorter than the local copy (recreated, or the copy "
                "belongs elsewhere)"
            )
        elif start < low:
            stale = "the changelog's start moved past the local copy"
        elif start < high and time.time() - store.synced > self._tombstones_kept(topic) / 2:
            # Compaction drops a tombstone delete.retention.ms after it cleaned it: a
            # copy last current longer ago than that, replayed from where it stopped,
            # may miss deletes, and the deleted keys would come back. Half of it: the
            # broker's clock is not ours. (A copy with nothing to replay is current.)
            stale = "the local copy is older than the changelog keeps tombstones"
        if stale is not None:
            log.info("%s[%d]: %s; rebuilding it from the changelog", topic, part, stale)
            store.wipe()
            start = low
        if start >= high:
            store.touch()
        return start

    def _changelog_ends(self, parts: list[TP]) -> dict[TP, tuple[int, int]]:
        """(log start, high watermark) of the changelog partition of each of `parts`.
        Asked read_uncommitted: under read_committed, ListOffsets answers the last
        stable offset, which stops at an open transaction, and commits after it would
        be left out of the restore."""
        admin = self.ck.admin
        names = {self.url.topic(self.changelog(t)): t for t, _ in parts}
        tps = [self.ck.TopicPartition(self.url.topic(self.changelog(t)), p) for t, p in parts]
        waiting = Waiting(log)
        while True:
            try:
                asked = [
                    self.admin.list_offsets(
                        {tp: spec for tp in tps},
                        isolation_level=self.ck.IsolationLevel.READ_UNCOMMITTED,
                        request_timeout=_STABLE_WAIT_S,
                    )
                    for spec in (admin.OffsetSpec.earliest(), admin.OffsetSpec.latest())
                ]
                low, high = (
                    {(names[tp.topic], tp.partition): int(f.result().offset) for tp, f in a.items()}
                    for a in asked
                )
                waiting.over("restoring state: the changelogs' ends are known")
                return {tp: (low[tp], high[tp]) for tp in parts}
            except self.ck.KafkaException as exc:
                err = exc.args[0]
                stale = err.code() in self._stale_leader_codes()
                if not (stale or transient(self.ck, err)):
                    raise StoreError(
                        f"restoring state: reading the changelogs' ends: {exc}"
                    ) from exc
                if stale:
                    # The admin client asks with the leader epochs it cached before a
                    # broker restart or a leader change, which the broker refuses; for
                    # this request librdkafka does not refresh them by itself (measured:
                    # still refused 40 s after a restart), a metadata request does.
                    for name in names:
                        with contextlib.suppress(self.ck.KafkaException):
                            self.admin.list_topics(topic=name, timeout=_STABLE_WAIT_S)
                waiting(f"restoring state: cannot read the changelogs' ends ({err})")

    def _stale_leader_codes(self) -> tuple[int, ...]:
        """ListOffsets errors that mean the client's partition leaders are out of date
        (or none known while the broker is away), not that the request is wrong."""
        e = self.ck.KafkaError
        return (e.FENCED_LEADER_EPOCH, e.UNKNOWN_LEADER_EPOCH, e._NOENT)

    def _read_changelogs(self, c: Any, todo: dict[TP, tuple[int, int]], errors: list[Any]) -> int:
        """Apply the changelog records of every partition in `todo` from its start until
        the fetcher's end of partition reaches its high watermark."""
        by_name = {self.url.topic(self.changelog(t)): t for t, _ in todo}
        c.assign(
            [
                self.ck.TopicPartition(self.url.topic(self.changelog(t)), p, start)
                for (t, p), (start, _) in todo.items()
            ]
        )
        t0 = progress = time.monotonic()
        n = 0
        # One wait at a time is logged: an outage also stalls the restore.
        waiting = Waiting(log)
        held: set[TP] = set()
        left = dict(todo)
        while left:
            recs: dict[TP, list[tuple[bytes, bytes | None]]] = {}
            last: dict[TP, int] = {}
            ends: dict[TP, int] = {}
            # consume() returns when it has the batch or after its timeout: a short one,
            # so that the end of the last partition is noticed at once.
            for m in c.consume(10_000, 0.02):
                err = m.error()
                if err is None:
                    tp = (by_name[m.topic()], m.partition())
                    recs.setdefault(tp, []).append((m.key(), m.value()))
                    last[tp] = m.offset()
                elif err.code() == self.ck.KafkaError._PARTITION_EOF:
                    ends[(by_name[m.topic()], m.partition())] = m.offset()
                else:
                    errors.append(err)
            for err in errors:
                if err.fatal() or not transient(self.ck, err):
                    raise StoreError(f"restoring state: Kafka consumer error: {err}")
                # The client reconnects by itself; the restore goes on from where it
                # was when the broker is back.
                waiting(f"restoring state: the broker is unreachable ({err})", sleep=False)
            errors.clear()
            if recs or ends:
                progress = time.monotonic()
                waiting.over("restoring state: the changelogs are readable again")
            elif time.monotonic() - progress > _STALL_LOG_S:
                waiting(
                    "restoring state: nothing new from "
                    + ", ".join(f"{t}[{p}]" for t, p in left)
                    + f" for {_STALL_LOG_S:.0f}s, short of the end: a transaction there is "
                    "still open, or the broker is slow or unreachable",
                    sleep=False,
                )
            for tp, batch in recs.items():
                n += self.local[tp].apply(batch, last[tp] + 1)
                if n // 100_000 != (n - len(batch)) // 100_000:
                    log.info("restoring: %d changelog records so far", n)
            for tp, end in ends.items():
                if tp not in left:
                    continue
                if end >= left[tp][1]:
                    self.local[tp].apply([], end)
                    del left[tp]
                elif tp not in held:
                    held.add(tp)
                    log.warning(
                        "restoring %s[%d]: its changelog is readable up to offset %d of %d: "
                        "a transaction there is still open (a previous owner's; it ends when "
                        "that owner commits or aborts, or when it times out); waiting for it",
                        *tp,
                        end,
                        left[tp][1],
                    )
        log.info("restored %d changelog records in %.2fs", n, time.monotonic() - t0)
        return n

    def _tombstones_kept(self, topic: str) -> float:
        """Seconds the changelog of `topic` keeps a tombstone after compaction saw it."""
        return self._tombstone_s.get(topic, _DEFAULT_TOMBSTONE_S)

    # -- reading --------------------------------------------------------------------

    def committed_positions(self) -> dict[tuple[str, int], int]:
        if not self.assigned or self.consumer is None:
            return {}
        committed = self.committed_of(self.assigned)
        return {tp: max(off, self.floors.get(tp, 0)) for tp, off in committed.items()}

    def committed_of(self, parts: Iterable[TP]) -> dict[TP, int]:
        """The group's committed offsets of any partitions, negative where none. With
        read_committed the broker answers only once no transaction of ours is in flight
        on them (KIP-447), so the answer is final for what committed before."""
        tps = [self.ck.TopicPartition(self.url.topic(t), p) for t, p in parts]
        if not tps:
            return {}
        got = self.consumer.committed(tps, timeout=TXN_TIMEOUT_S)
        for tp in got:
            # A partition-level error comes with no offset: read as "none committed", it
            # would rewind the partition to its start.
            if tp.error is not None:
                raise StoreError(
                    f"cannot read the committed offset of {tp.topic}[{tp.partition}]: {tp.error}"
                )
        out = {(self.url.strip(tp.topic), tp.partition): tp.offset for tp in got}
        self._saw_committed(out)
        return out

    def _saw_committed(self, offsets: dict[TP, int]) -> None:
        for tp, off in offsets.items():
            if off > self._known.get(tp, -1):
                self._known[tp] = off

    def rewind(self) -> dict[tuple[str, int], int]:
        """Back to the last commit: seek every held partition to its committed offset,
        or to where an external sink recorded it is done, if that is further. While
        Kafka cannot say, nothing is read until it can (`poll` rewinds first)."""
        self._eof.clear()
        try:
            found = self.committed_positions()
        except self.ck.KafkaException as exc:
            self._outage.down(f"reading committed offsets: {exc.args[0]}")
            self._rewind_pending = True
            return {}
        self._rewind_pending = False
        committed = {tp: max(off, self.floors.get(tp, 0)) for tp, off in found.items()}
        for (topic, part), off in committed.items():
            # A partition not fetching yet starts from the committed offset anyway.
            with contextlib.suppress(self.ck.KafkaException):
                self.consumer.seek(self.ck.TopicPartition(self.url.topic(topic), part, off))
        return committed

    def poll(self, positions: dict[tuple[str, int], int], max_records: int) -> list[Batch]:
        if self.fenced:
            raise self._fenced_error("found before")
        self._outage.check()
        if self._consumer_dead is not None and not self._consumer_failed():
            time.sleep(0.05)
            return []
        if self._retake:
            # A new group member: the partitions come back through `_on_assign`, from
            # stable offsets and the changelogs' end, as at any takeover.
            self._retake = False
            log.warning(
                "worker %d takes its partitions over again after its producer was fenced",
                self.worker,
            )
            self._new_consumer()
            return []
        if self._untaken:
            self._take_over(self.consumer, self._untaken)
        if self._rewind_pending:
            self.rewind()
            if self._rewind_pending:
                time.sleep(0.05)
                return []
        try:
            # A short wait: under steady input a long one would hold every epoch back.
            msgs = self.consumer.consume(max_records, 0.01)
        except self.ck.KafkaException as exc:
            self._consumer_error(exc.args[0])
            return []
        # Each poll: a rejoin hands the consumer a new member id at any time.
        self._note_member_id()
        by_topic: dict[str, Batch] = {}
        for m in msgs:
            if m.error():
                if m.error().code() == self.ck.KafkaError._PARTITION_EOF:
                    self._eof.add((self.url.strip(m.topic()), m.partition()))
                    self._outage.up()
                elif self._consumer_error(m.error()):
                    # The consumer died with its partitions: nothing it read counts.
                    return []
                continue
            topic = self.url.strip(m.topic())
            self._eof.discard((topic, m.partition()))
            b = by_topic.get(topic)
            if b is None:
                b = by_topic[topic] = Batch(topic, [], [], [], [], [], [])
            _headers, eid = decode_headers(m.headers())
            b.parts.append(m.partition())
            b.offs.append(m.offset())
            b.keys.append(decode_key(m.key()))
            b.raws.append(m.value() or b"")
            b.tss.append(m.timestamp()[1] / 1000.0)
            b.ids.append(eid)
        if by_topic:
            self._outage.up()
        return list(by_topic.values())

    def _consumer_error(self, err: Any) -> bool:
        """An error the consumer reported; True if it killed the consumer. It retries
        transport and leadership errors itself; one that killed it (the group fenced its
        static member id, which an outage longer than the session does) means a new
        consumer, unless another process took the slot. Anything else needs the operator."""
        if err.fatal() or err.code() == self.ck.KafkaError._FATAL:
            self._consumer_dead = err.str()
            self._consumer_failed()
            return True
        if self._unreachable(err):
            self._outage.down(err.str())
        elif err.code() == self.ck.KafkaError._MAX_POLL_EXCEEDED:
            # The worker was away longer than max.poll.interval.ms (a long wait on
            # Kafka): the consumer left the group and rejoins on this poll by itself.
            log.warning("worker %d rejoins its group: %s", self.worker, err.str())
        else:
            raise StoreError(
                f"Kafka consumer error: {err.str()}. Operator action: check the topics and "
                f"the app's access to them on {self.url.bootstrap}"
            )
        return False

    def _consumer_failed(self) -> bool:
        """Replace the dead consumer. True once done; False while Kafka cannot tell
        whether another process took the slot (then the next poll tries again)."""
        replaced = self._replaced()
        if replaced is None:
            return False
        if replaced:
            raise self._fenced_error(self._consumer_dead or "its group member was taken")
        log.warning(
            "worker %d's group member was fenced (%s) after its session ran out; it rejoins "
            "with a new consumer",
            self.worker,
            self._consumer_dead,
        )
        self._new_consumer()
        return True

    def wait_for_data(self, timeout: float, stop: threading.Event) -> None:
        """`poll` already waits in the consumer."""

    def idle(self) -> bool:
        """Caught up: the fetcher reached the end of every held partition."""
        return bool(self.assigned) and all(tp in self._eof for tp in self.assigned)

    def load_state(self, step: str, pks: list[PartKey]) -> dict[PartKey, Any]:
        return self._load("state", step, pks)

    def load_dedup(self, step: str, pks: list[PartKey]) -> dict[PartKey, Any]:
        return self._load("dedup", step, pks)

    def _load(self, table: str, step: str, pks: list[PartKey]) -> dict[PartKey, Any]:
        topic = self.step_topics[step]
        by_part: dict[int, list[str]] = {}
        for part, key in pks:
            by_part.setdefault(part, []).append(key)
        out: dict[PartKey, Any] = {}
        for part, keys in by_part.items():
            store = self.local.get((topic, part))
            if store is None:
                continue
            for k, v in store.load(table, step, keys).items():
                out[(part, k)] = v
        return out

    # -- the commit's operations (called by Checkpoint, in its order) ---------------

    def transaction(self) -> KafkaTransaction:
        self.begin()
        return KafkaTransaction(self)

    def begin(self) -> Any:
        self._pending = {}
        self._produced = {}
        self._sent_offsets = False
        self._sending = {}
        self._ensure_producer(wait=TXN_TIMEOUT_S)
        self._txn_call(lambda p: p.begin_transaction(), "begin_transaction", local=True)
        self._in_txn = True
        return self

    def check_fence(self, txn: Any) -> None:
        """Zombies are fenced by the broker: by the producer epoch of this worker slot,
        and by the group generation sent with the offsets, both checked at commit."""

    def _produce(
        self,
        topic: str,
        part: int,
        key: bytes | None,
        value: bytes | None,
        headers: Any = None,
        ts: float | None = None,
        on_delivery: Any = None,
    ) -> None:
        while True:
            try:
                self.producer.produce(
                    self.url.topic(topic),
                    value=value,
                    key=key,
                    partition=part,
                    headers=headers,
                    timestamp=int(ts * 1000) if ts else 0,
                    on_delivery=on_delivery,
                )
                return
            except BufferError:
                self.producer.poll(0.05)
            except self.ck.KafkaException as exc:
                # A fenced (fatal) producer refuses records at once.
                failed = self._producer_failed(exc)
                if failed is exc:
                    raise
                raise failed from exc

    def write_outputs(self, txn: Any, outputs: dict[tuple[str, int], Columns]) -> None:
        # Writing to one of our own inputs (a `through` topic) makes its end-of-partition
        # flags stale once committed: the App is not idle until it read what it wrote.
        self._wrote_inputs = {tp for tp, cols in outputs.items() if tp[0] in self._sources}
        for (topic, part), cols in outputs.items():
            hdrs = cols.headers
            for i in range(len(cols)):
                key = cols.keys[i]
                self._produce(
                    topic,
                    part,
                    None if key is None else encode_key(key),
                    cols.values[i],
                    encode_headers(None if hdrs is None else hdrs[i], cols.ids[i]),
                    cols.tss[i],
                )
            self.producer.poll(0)

    def _changelog_write(self, step: str, part: int, key: bytes, value: bytes | None) -> None:
        self._changelog_write_to(self.step_topics[step], part, key, value)

    def _changelog_write_to(self, topic: str, part: int, key: bytes, value: bytes | None) -> None:
        cl = self.changelog(topic)

        def delivered(err: Any, msg: Any) -> None:
            if err is None:
                k = (topic, msg.partition())
                self._produced[k] = max(self._produced.get(k, -1), msg.offset())

        self._pending.setdefault((topic, part), []).append((key, value))
        self._produce(cl, part, key, value, on_delivery=delivered)

    def write_state(self, txn: Any, step: str, rows: list[tuple[int, str, bytes | None]]) -> None:
        for part, key, value in rows:
            self._changelog_write(step, part, changelog_key(_STATE, step, key), value)

    def write_dedup(
        self, txn: Any, step: str, rows: list[tuple[int, str, float, bytes | None]]
    ) -> None:
        for part, bid, seen, outcome in rows:
            value = _msgpack_enc.encode([seen, outcome])
            self._changelog_write(step, part, changelog_key(_DEDUP, step, bid), value)

    def write_effect(
        self, topic: str, part: int, sink: str, key: str, intent: tuple[int, int, bytes]
    ) -> None:
        """Inside the epoch's transaction: a pending effect, beside its input's state."""
        off, idx, payload = intent
        value = _msgpack_enc.encode([off, idx, payload, "pending", None, None])
        self._changelog_write_to(topic, part, changelog_key(_EFFECT, sink, key), value)

    def pending_effects(self, sink: str) -> list[tuple[tuple[str, int, int, int], str, bytes]]:
        """The sink's pending intents on the partitions held, by input position."""
        out = []
        for (topic, part), store in sorted(self.local.items()):
            for key, off, idx, payload in store.pending_effects(sink):
                out.append(((topic, part, off, idx), key, payload))
        return out

    def settle_effects(
        self,
        sink: str,
        outcomes: list[tuple[tuple[str, int, int, int], str, str, bytes | None, str | None]],
        dead_letter_topic: str,
        dead: list[tuple[bytes, str, dict[str, str]]],
    ) -> None:
        """Journal effect outcomes, with their dead letters, in a transaction of their own.
        The held partitions' offsets go with it unchanged: the group generation then
        refuses the transaction of a worker that lost them."""
        offsets = {
            tp: off
            for tp, off in self.committed_of({(t, p) for (t, p, _, _), *_ in outcomes}).items()
            if off >= 0
        }
        self.begin()
        try:
            for (topic, part, off, idx), key, status, response, error in outcomes:
                # Settled, the payload is not needed again; the response is the record.
                value = _msgpack_enc.encode([off, idx, b"", status, response, error])
                self._changelog_write_to(topic, part, changelog_key(_EFFECT, sink, key), value)
            if dead:
                cols = Columns(
                    [None] * len(dead),
                    [payload for payload, _, _ in dead],
                    [headers for _, _, headers in dead],
                    [time.time()] * len(dead),
                    [key for _, key, _ in dead],
                )
                self.write_outputs(self, {(dead_letter_topic, 0): cols})
            if offsets:
                self.write_positions(self, offsets)
            self.commit(self)
        except BaseException:
            self.rollback(self)
            raise
        self.after_commit()

    def fence_token(self) -> int:
        """External sinks are fenced per input partition on Kafka (`_sink_fences.py`)."""
        return 0

    def purge_dedup(self, txn: Any, step: str, ttl: float | None, max_keys: int | None) -> int:
        """Apply a dedupe step's retention in the epoch's transaction: a tombstone in the
        changelog per forgotten id. A partition restored elsewhere (or here, from the
        changelog) then forgets the same ids, and compaction can drop them for good;
        the local stores drop them once the transaction committed. Returns how many."""
        topic = self.step_topics[step]
        n = 0
        for (t, part), store in self.local.items():
            if t == topic:
                for bid in store.purge_dedup(step, ttl, max_keys):
                    self._changelog_write(step, part, changelog_key(_DEDUP, step, bid), None)
                    n += 1
        return n

    def write_positions(self, txn: Any, positions: dict[tuple[str, int], int]) -> None:
        """The offsets join the transaction with the group generation: a worker whose
        partitions moved on (a rebalance, or a session that ran out in an outage) is
        refused here (ILLEGAL_GENERATION, UNKNOWN_MEMBER_ID, FENCED_INSTANCE_ID), its
        epoch dropped; it rejoins and goes on. The group takes offsets that move back;
        this session refuses them below any it saw committed, as the embedded store does
        (the checkpoint checks that first: this is the seam's own promise)."""
        for tp, off in positions.items():
            if off < self._known.get(tp, -1):
                raise StoreError(
                    f"worker {self.worker} would move {tp[0]}[{tp[1]}] back from "
                    f"{self._known[tp]} to {off}; refusing"
                )
        tps = [
            self.ck.TopicPartition(self.url.topic(t), p, off) for (t, p), off in positions.items()
        ]
        meta = self.consumer.consumer_group_metadata()
        self._txn_call(
            lambda p: p.send_offsets_to_transaction(tps, meta, TXN_TIMEOUT_S),
            "send_offsets_to_transaction",
        )
        self._sent_offsets = True
        self._sending = dict(positions)

    def commit_offsets(self, positions: dict[tuple[str, int], int]) -> None:
        """At-least-once: offsets through the group, after the outputs' transaction."""
        self.consumer.commit(
            offsets=[
                self.ck.TopicPartition(self.url.topic(t), p, off)
                for (t, p), off in positions.items()
            ],
            asynchronous=False,
        )

    def commit(self, txn: Any) -> None:
        self._txn_call(lambda p: p.commit_transaction(TXN_TIMEOUT_S), "commit_transaction")
        self._in_txn = False
        self._saw_committed(self._sending)
        self._sending = {}

    def rollback(self, txn: Any) -> None:
        """Abort the open transaction. After a failed transactional call the producer is
        replaced instead (its abort could be as late as the call was), which aborts it on
        the coordinator; while Kafka is down that waits for the next `begin`."""
        self._pending = {}
        if self.fenced:
            return
        if self._producer_ok and not self._in_txn:
            return  # nothing open (a new producer settled the failed one's transaction)
        if self._producer_ok:
            try:
                self._txn_call(lambda p: p.abort_transaction(TXN_TIMEOUT_S), "abort_transaction")
                self._in_txn = False
                return
            except FencedError:
                return
            except Exception as exc:
                log.warning("abort failed (%s); replacing the producer", exc)
        if self._outage.since is None and not self._fence_unresolved:
            try:
                self._new_producer()
            except UnavailableError as exc:
                log.debug("%s", exc)

    def outcome_of(self, positions: dict[tuple[str, int], int]) -> bool:
        """After a commit that raised: did it land? The answer must be found, not
        guessed (a guess either loses the epoch's state or doubles its outputs), so
        this waits for Kafka as long as it takes.

        First a new producer of the slot fences the old one: its transaction is then
        settled (a commit the coordinator had is completed, anything else aborted), and
        no late request of it can land on a later transaction. Then the group's stable
        offsets say whether the epoch committed."""
        backoff = _BACKOFF_S[0]
        while not self.fenced:
            try:
                self._ensure_producer()
                committed = self._group_offsets(list(positions))
            except (UnavailableError, StoreError) as exc:
                if isinstance(exc, FencedError):
                    raise
                if backoff == _BACKOFF_S[0]:
                    log.warning(
                        "worker %d waits for Kafka to say whether its last commit landed "
                        "(%s); nothing else is sent meanwhile",
                        self.worker,
                        exc,
                    )
                time.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_S[1])
                continue
            self._outage.up()
            return all(committed.get(tp) == off for tp, off in positions.items())
        return False

    def _group_offsets(self, parts: list[TP]) -> dict[TP, int]:
        """The group's committed offsets, asked of the coordinator through the admin
        client (the consumer may be dead after an outage): only once no transaction is
        pending on them (require_stable, KIP-447). Raises UnavailableError until then."""
        group = self.url.topic(self.app)
        req = self.ck.ConsumerGroupTopicPartitions(
            group, [self.ck.TopicPartition(self.url.topic(t), p) for t, p in parts]
        )
        if not self._coordinator_answers():
            self._outage.down(f"reading the offsets of group {group}: no broker answers")
            raise UnavailableError(f"cannot read the offsets of group {group}: no broker answers")
        try:
            futures = self.admin.list_consumer_group_offsets(
                [req], require_stable=True, request_timeout=TXN_TIMEOUT_S
            )
            result = futures[group].result()
        except self.ck.KafkaException as exc:
            self._outage.down(f"reading the offsets of group {group}: {exc.args[0]}")
            raise UnavailableError(f"cannot read the offsets of group {group}: {exc}") from exc
        out: dict[TP, int] = {}
        for tp in result.topic_partitions or []:
            if tp.error is not None:
                raise UnavailableError(f"offset of {tp.topic}[{tp.partition}]: {tp.error}")
            out[(self.url.strip(tp.topic), tp.partition)] = tp.offset
        return out

    def after_commit(self) -> None:
        """The epoch is durable in Kafka: bring the local stores up to it."""
        if self._wrote_inputs:
            # Only partitions that got records: the others' end did not move, and their
            # end-of-partition event would not come again.
            self._eof -= self._wrote_inputs
            self._wrote_inputs = set()
        self._outage.up()
        self.producer.poll(0)
        for (topic, part), records in self._pending.items():
            store = self.local.get((topic, part))
            if store is None:
                continue
            last = self._produced.get((topic, part))
            # Transaction markers take an offset after the last record.
            nxt = store.known if last is None else last + 1
            store.apply(records, nxt)
        # A commit with offsets, which the group accepts only from a member of the
        # current generation, shows that no one else wrote to the held partitions'
        # changelogs since they were restored: their stores are current.
        now = time.time()
        for tp, store in self.local.items():
            if (
                self._sent_offsets
                and tp not in self._pending
                and now - store.synced > _SYNC_REFRESH_S
            ):
                store.touch()
        self._pending = {}

    def close(self) -> None:
        # Whatever is in flight was committed by the App or must die with it, as after a
        # kill: leaving the group must not commit from a revoke callback, nor an
        # assignment arriving while the consumer closes restore anything.
        self._closing = True
        # An assignment arriving while the consumer closes must not ask the group for
        # offsets either (it fails with _DESTROY and turns a clean stop into an error).
        self.listener = _NO_LISTENER
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                self.consumer.close()
        for store in self.local.values():
            store.close()
        self.local.clear()
        if self.producer is not None:
            # A fenced producer raises on flush; closing must not hide why it stopped.
            with contextlib.suppress(Exception):
                self.producer.flush(5)

    def partition_for(self, key: str | None, partitions: int, fallback: int) -> int:
        return kafka_partition(key, partitions, fallback)

    def is_transient(self, exc: BaseException) -> bool:
        """Which client errors are the cluster's passing state (step 5b)."""
        return is_outage(exc)

    def effect_journal(
        self,
        app: str,
        sink: str,
        dead_letter_topic: str,
        fenced: Callable[[str], AbstractContextManager[sqlite3.Connection]],
    ) -> Journal:
        """In the input partitions' local stores and changelogs: outcomes settle in
        transactions of their own (`settle_effects`), not through `fenced`."""
        from ._effect_journal import KafkaJournal

        return KafkaJournal(self, app, sink, dead_letter_topic)


class KafkaTransaction:
    """The worker's open Kafka transaction. A zombie is fenced at `commit`: by the
    producer epoch of its worker slot and by the group generation sent with the
    offsets."""

    sql: sqlite3.Connection | None = None

    def __init__(self, session: KafkaSession) -> None:
        self.session = session

    def check_fence(self) -> None:
        self.session.check_fence(self)

    def write_outputs(self, outputs: dict[TP, Columns]) -> None:
        self.session.write_outputs(self, outputs)

    def write_state(self, step: str, rows: list[StateRow]) -> None:
        self.session.write_state(self, step, rows)

    def write_dedup(self, step: str, rows: list[DedupRow]) -> None:
        self.session.write_dedup(self, step, rows)

    def purge_dedup(self, step: str, ttl: float | None, max_keys: int | None) -> int:
        return self.session.purge_dedup(self, step, ttl, max_keys)

    def write_positions(self, positions: dict[TP, int]) -> None:
        self.session.write_positions(self, positions)

    def commit(self) -> None:
        self.session.commit(self)

    def rollback(self) -> None:
        self.session.rollback(self)


class _NoListener:
    """Before `acquire` and after `close`: no rebalance reaches the App."""

    def assigned(self, parts: list[TP]) -> dict[TP, int]:
        return {}

    def revoking(self, parts: list[TP]) -> None:
        pass

    def lost(self, parts: list[TP]) -> None:
        pass

    def revoked(self, parts: list[TP]) -> None:
        pass


_NO_LISTENER = _NoListener()


class KafkaBackend:
    """A Kafka cluster (`kafka://HOST:PORT[/NAMESPACE]`): worker processes share the
    partitions through a consumer group."""

    name = "kafka"
    has_sql_store = False
    several_workers = True

    def __init__(self, url: str) -> None:
        self.url = url
        self.parsed = KafkaURL.parse(url)

    def session(self, options: SessionOptions) -> KafkaSession:
        return KafkaSession(
            self.parsed,
            options.app,
            worker=options.worker,
            # Per namespace: two namespaces' apps of one name must not share stores.
            state_dir=os.path.join(
                options.state_dir,
                self.parsed.namespace or "_",
                options.app,
                f"worker-{options.worker}",
            ),
            commit_interval=options.commit_interval,
            step_topics=options.step_topics,
            topic_partitions=options.topic_partitions,
        )

    def producer(self, producer_id: str, partitions: int) -> ProducerClient:
        from ._kafka_clients import KafkaProducerImpl

        return KafkaProducerImpl(self.url, producer_id, partitions)

    def consumer(self, group: str, topics: Sequence[str], start: str) -> ConsumerClient:
        from ._kafka_clients import KafkaConsumerImpl

        return KafkaConsumerImpl(self.url, group, topics, start)

    def committed_records(self, topic: str) -> list[Record]:
        from ._kafka_clients import read_committed

        return read_committed(self.url, topic)

    def committed_state(
        self, app: str, step_topics: dict[str, str]
    ) -> tuple[dict[tuple[str, int, str], bytes], set[tuple[str, int, str]]]:
        """The fold of the changelog topics: the committed state rows and dedup ids."""
        state: dict[tuple[str, int, str], bytes] = {}
        ids: set[tuple[str, int, str]] = set()
        for source in sorted(set(step_topics.values())):
            latest: dict[tuple[int, str], bytes] = {}
            for rec in self.committed_records(f"{app}.{source}.changelog"):
                latest[(rec.partition, rec.key or "")] = rec.value
            for (part, raw_key), value in latest.items():
                kind, _, rest = raw_key.partition("\x00")
                step, _, key = rest.partition("\x00")
                if not value:
                    continue  # a tombstone
                if kind == "s":
                    state[(step, part, key)] = value
                elif kind == "d":
                    ids.add((step, part, key))
        return state, ids


if TYPE_CHECKING:
    # The seam, checked by mypy: each class is what the App and the sinks ask for.
    _b: Backend = KafkaBackend("")
    _s: Session = KafkaSession.__new__(KafkaSession)
    _t: Transaction = KafkaTransaction.__new__(KafkaTransaction)
    _l: RebalanceListener = _NO_LISTENER

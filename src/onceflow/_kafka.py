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
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from ._crash import from_env
from ._dataflow import topology_problems
from ._errors import ConfigError, FencedError, StoreError, TopologyError
from ._kafka_common import (
    CLIENT_LOG,
    KafkaURL,
    Waiting,
    decode_headers,
    decode_key,
    encode_headers,
    encode_key,
    kafka_module,
    kafka_partition,
    transient,
)
from ._records import Columns
from ._runtime import Batch

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
            "coordinator is unreachable); the transaction is abandoned"
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

    def _meta(self, k: str) -> int | None:
        row = self.conn.execute("SELECT v FROM meta WHERE k=?", (k,)).fetchone()
        return None if row is None else int(row[0])

    @property
    def next_offset(self) -> int:
        return self._meta("changelog_next") or 0

    def close(self) -> None:
        self.conn.close()

    def wipe(self) -> None:
        self.conn.execute("BEGIN")
        for table in ("state", "dedup", "effects"):
            self.conn.execute(f"DELETE FROM {table}")
        self.conn.execute("DELETE FROM meta WHERE k<>'format'")
        self.conn.execute("COMMIT")
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
        self.conn.execute("BEGIN")
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
        self.conn.execute("BEGIN")
        self._mark(self.next_offset)
        self.conn.execute("COMMIT")

    def _mark(self, next_offset: int) -> None:
        now = time.time()
        self.conn.executemany(
            "INSERT OR REPLACE INTO meta(k, v) VALUES(?, ?)",
            [("changelog_next", next_offset), ("synced_ms", int(now * 1000))],
        )
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


class KafkaSession:
    """One worker process's hold on Kafka: consumer, transactional producer, stores."""

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
        self.admin = self.ck.admin.AdminClient({"bootstrap.servers": url.bootstrap})
        self.producer: Any = None
        self.consumer: Any = None
        self.local: dict[tuple[str, int], LocalStore] = {}
        self.assigned: list[tuple[str, int]] = []
        self._partitions: dict[str, int] = {}
        self._pending: dict[tuple[str, int], list[tuple[bytes, bytes | None]]] = {}
        self._produced: dict[tuple[str, int], int] = {}
        self._eof: set[tuple[str, int]] = set()
        self._wrote_inputs: set[tuple[str, int]] = set()
        self._sources: list[str] = []
        # Set by the App: commit the epoch in flight before partitions are taken away,
        # forget caches after assignment changes, drop the epoch when partitions are lost.
        self.before_revoke: Callable[[], None] = lambda: None
        self.assignment_changed: Callable[[], None] = lambda: None
        self.partitions_lost: Callable[[], None] = lambda: None
        # Set by the App: external sinks recover on partitions this worker gets (and say
        # where PostgreSQL's recorded offsets are ahead of the group's), and forget the
        # ones it loses.
        self.sinks_assigned: Callable[[list[TP]], dict[TP, int]] = lambda parts: {}
        self.sinks_revoked: Callable[[list[TP]], None] = lambda parts: None
        # Per partition, the offset an external sink recorded as done: never read below.
        self.floors: dict[TP, int] = {}
        self.fenced = False
        # Fenced by the group only (its generation moved on): the producer still works,
        # and aborts its transaction rather than leave it open until it times out.
        self._group_fenced = False
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

    def ensure_topics(self, topics: dict[str, int]) -> None:
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
        """The last topology written to the app's meta topic must match this one."""
        meta = self.url.topic(self._meta_topic())
        c = self.ck.Consumer(
            {
                "bootstrap.servers": self.url.bootstrap,
                "group.id": f"onceflow-meta-{os.getpid()}",
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
            }
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
        p = self.ck.Producer({"bootstrap.servers": self.url.bootstrap, "acks": "all"})
        if stored is None:
            p.produce(meta, key=b"topology", value=text.encode())
        p.produce(meta, key=b"config", value=json.dumps(config).encode())
        p.flush(TXN_TIMEOUT_S)

    def acquire(self, sources: Iterable[str]) -> None:
        self._sources = list(sources)
        self._new_producer()
        self.consumer = self.ck.Consumer(
            {
                "bootstrap.servers": self.url.bootstrap,
                "group.id": self.url.topic(self.app),
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "partition.assignment.strategy": "range",
                # Static membership: a restarted worker slot gets its partitions back at
                # once instead of after the dead member's session times out.
                "group.instance.id": self.url.topic(f"onceflow-{self.app}-{self.worker}"),
                # A dead worker's partitions move on within this time.
                "session.timeout.ms": 10_000,
                "heartbeat.interval.ms": 1_000,
                "fetch.wait.max.ms": 20,
                # The end of a partition is known from the fetcher, which steps over
                # transaction markers; the consumer's position does not.
                "enable.partition.eof": True,
            }
        )
        self.consumer.subscribe(
            [self.url.topic(t) for t in self._sources],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    def _new_producer(self) -> None:
        """(Re)create the transactional producer; init_transactions fences every older
        producer of this worker slot and aborts its open transaction."""
        if self.producer is not None:
            with contextlib.suppress(Exception):
                self.producer.flush(0)
        txn_id = self.url.topic(f"onceflow-{self.app}-{self.worker}")
        self.producer = self.ck.Producer(
            {
                "bootstrap.servers": self.url.bootstrap,
                "transactional.id": txn_id,
                "enable.idempotence": True,
                "transaction.timeout.ms": transaction_timeout_ms(self.commit_interval),
                "linger.ms": 2,
                # The coordinator answers CONCURRENT_TRANSACTIONS right after a commit;
                # the default 100 ms backoff would then delay every next epoch.
                "retry.backoff.ms": 10,
                "batch.num.messages": 10_000,
                "queue.buffering.max.messages": 2_000_000,
                "queue.buffering.max.kbytes": 1_048_576,
            }
        )
        try:
            self.producer.init_transactions(TXN_TIMEOUT_S)
        except self.ck.KafkaException as exc:
            raise ConfigError(
                f"Kafka at {self.url.bootstrap} cannot run transactions ({exc.args[0]}). "
                "Operator action: the broker needs transaction.state.log.replication.factor "
                "and transaction.state.log.min.isr no larger than the number of brokers"
            ) from exc

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
        self.floors.update(self.sinks_assigned(keys))
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
        self.before_revoke()
        self._drop(partitions)

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        self.partitions_lost()
        self._drop(partitions)

    def _drop(self, partitions: list[Any]) -> None:
        keys = [(self.url.strip(tp.topic), tp.partition) for tp in partitions]
        for key in keys:
            if key in self.assigned:
                self.assigned.remove(key)
            self.floors.pop(key, None)
            store = self.local.pop(key, None)
            if store is not None:
                store.close()
        self.sinks_revoked(keys)
        self.assignment_changed()

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
        start = store.next_offset
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
                if not transient(self.ck, exc.args[0]):
                    raise StoreError(
                        f"restoring state: reading the changelogs' ends: {exc}"
                    ) from exc
                waiting(f"restoring state: cannot read the changelogs' ends ({exc.args[0]})")

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
        return {tp: max(off, 0) for tp, off in self.committed_of(self.assigned).items()}

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
        return {(self.url.strip(tp.topic), tp.partition): tp.offset for tp in got}

    def rewind(self) -> dict[tuple[str, int], int]:
        """Back to the last commit: seek every held partition to its committed offset,
        or to where an external sink recorded it is done, if that is further."""
        committed = {
            tp: max(off, self.floors.get(tp, 0)) for tp, off in self.committed_positions().items()
        }
        self._eof.clear()
        for (topic, part), off in committed.items():
            # A partition not fetching yet starts from the committed offset anyway.
            with contextlib.suppress(self.ck.KafkaException):
                self.consumer.seek(self.ck.TopicPartition(self.url.topic(topic), part, off))
        return committed

    def poll(self, positions: dict[tuple[str, int], int], max_records: int) -> list[Batch]:
        # A short wait: under steady input a long one would hold every epoch back by it.
        msgs = self.consumer.consume(max_records, 0.01)
        by_topic: dict[str, Batch] = {}
        for m in msgs:
            if m.error():
                if m.error().code() == self.ck.KafkaError._PARTITION_EOF:
                    self._eof.add((self.url.strip(m.topic()), m.partition()))
                    continue
                raise StoreError(f"Kafka consumer error: {m.error()}")
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
        return list(by_topic.values())

    def wait_for_data(self, timeout: float, stop: Any) -> None:
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

    def _fenced(self, exc: BaseException) -> FencedError | None:
        """A newer producer of this slot, or a newer group generation, took over. The
        producer must not be recreated: that would fence the rightful owner in turn."""
        if not isinstance(exc, self.ck.KafkaException):
            return None
        err = exc.args[0]
        fenced = {
            self.ck.KafkaError._FENCED,
            self.ck.KafkaError.PRODUCER_FENCED,
            self.ck.KafkaError.INVALID_PRODUCER_EPOCH,
            self.ck.KafkaError.FENCED_INSTANCE_ID,
            self.ck.KafkaError.ILLEGAL_GENERATION,
            self.ck.KafkaError.UNKNOWN_MEMBER_ID,
        }
        if err.code() in fenced:
            return FencedError(
                f"app '{self.app}' worker {self.worker} was fenced ({err.str()}): another "
                "process took over its slot or partitions; this one stops without committing"
            )
        return None

    def _guard(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:
            fenced = self._fenced(exc)
            if fenced is not None:
                self.fenced = True
                self._group_fenced = exc.args[0].code() in (
                    self.ck.KafkaError.ILLEGAL_GENERATION,
                    self.ck.KafkaError.UNKNOWN_MEMBER_ID,
                    self.ck.KafkaError.FENCED_INSTANCE_ID,
                )
                raise fenced from exc
            raise

    def begin(self) -> Any:
        self._pending = {}
        self._produced = {}
        self._sent_offsets = False
        self._guard(self.producer.begin_transaction)
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
        tps = [
            self.ck.TopicPartition(self.url.topic(t), p, off) for (t, p), off in positions.items()
        ]
        meta = self.consumer.consumer_group_metadata()
        producer = self.producer
        self._guard(
            lambda: _bounded(
                lambda: producer.send_offsets_to_transaction(tps, meta, TXN_TIMEOUT_S),
                "send_offsets_to_transaction",
            )
        )
        self._sent_offsets = True

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
        producer = self.producer
        self._guard(
            lambda: _bounded(
                lambda: producer.commit_transaction(TXN_TIMEOUT_S), "commit_transaction"
            )
        )

    def rollback(self, txn: Any) -> None:
        self._pending = {}
        if self._group_fenced:
            # A zombie the group fenced (it resumed after its partitions moved) still has
            # a working producer: its open transaction would hold the changelog's end,
            # and the new owner's restore, until it times out. Never a new producer here.
            self._group_fenced = False
            producer = self.producer
            with contextlib.suppress(Exception):
                _bounded(lambda: producer.abort_transaction(TXN_TIMEOUT_S), "abort_transaction")
            return
        if self.fenced:
            return
        try:
            producer = self.producer
            _bounded(lambda: producer.abort_transaction(TXN_TIMEOUT_S), "abort_transaction")
        except Exception as exc:
            if self._fenced(exc) is not None:
                self.fenced = True
                return
            # An abort that fails leaves the transaction's fate to the coordinator; a new
            # producer of the same slot fences the old one and settles it.
            log.warning("abort failed (%s); recreating the producer", exc)
            self._new_producer()

    def outcome_of(self, positions: dict[tuple[str, int], int]) -> bool:
        """After a commit that raised: fence the old producer, then ask the group."""
        if self.fenced:
            return False
        self._new_producer()
        committed = self.committed_positions()
        return all(committed.get(tp) == off for tp, off in positions.items())

    def after_commit(self) -> None:
        """The epoch is durable in Kafka: bring the local stores up to it."""
        if self._wrote_inputs:
            # Only partitions that got records: the others' end did not move, and their
            # end-of-partition event would not come again.
            self._eof -= self._wrote_inputs
            self._wrote_inputs = set()
        self.producer.poll(0)
        for (topic, part), records in self._pending.items():
            store = self.local.get((topic, part))
            if store is None:
                continue
            last = self._produced.get((topic, part))
            # Transaction markers take an offset after the last record.
            nxt = store.next_offset if last is None else last + 1
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
        self.before_revoke = lambda: None
        self.assignment_changed = lambda: None
        self.sinks_revoked = lambda parts: None
        # An assignment arriving while the consumer closes must not ask the group for
        # offsets (it fails with _DESTROY and turns a clean stop into an error).
        self.sinks_assigned = lambda parts: {}
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

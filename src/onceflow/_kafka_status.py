"""What `onceflow status`, `topics` and `tail` (and the chaos audit) read from a Kafka
cluster, as plain data: per-partition lag of an app, transactions left open (hanging)
with their age, the topics of a namespace, and committed records.

Looking never disturbs a running App. Offsets come from the AdminClient (ListOffsets,
OffsetFetch), which joins no group. Records are read by consumers that `assign()`
partitions under a throwaway group id (confluent-kafka insists on one) and never
subscribe or commit, so the id leaves no group on the broker, no App's group sees a new
member, and no App's committed offset moves.

Where an app's facts come from, since Kafka has no `apps` table:

- the apps: the `<app>.meta` topics of the namespace (every App writes one before it
  starts: key `topology`, the stateful steps, and key `config`), plus the consumer
  group `<namespace>.<app>` when asked for one by name;
- its source topics: the union of the sources of its stateful steps (`topology`), the
  `sources` of its config when the App records them, the topics its group has committed
  offsets on (the only trace a stateless App leaves), and any `--topic` given. Each
  covers a gap of another: a stateless App has an empty topology, and an App that has
  not committed yet has no group offsets.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn, TypeVar

from ._errors import ConfigError, StoreError
from ._kafka import _EFFECT, _msgpack_dec, transaction_timeout_ms
from ._kafka_common import CLIENT_LOG, KafkaURL, kafka_module, message_record
from ._records import Record
from ._settings import Settings

T = TypeVar("T")

# Admin calls give up after this long: a CLI pointed at a wrong address must answer
# soon, and a healthy broker answers in milliseconds.
_TIMEOUT_S = 15.0
# Reading a few records (meta topics, lag probes, the first record of an open
# transaction) gives up after this long and reports what it has.
_READ_S = 10.0
# A gap this small between an app's committed offset and the end of a partition is read
# record by record. Offsets also count transaction markers and aborted records: an app
# that has caught up on a topic written transactionally (another App's output) commits
# the offset after its last record, which is the commit marker's, so counting offsets
# would show a lag of 1 forever.
LAG_PROBE_OFFSETS = 100

Key = tuple[str, int]


# -- data -------------------------------------------------------------------------


@dataclass(frozen=True)
class KafkaTopicInfo:
    """A topic of the namespace. End offsets count transaction markers too, so they are
    positions, not numbers of records."""

    name: str
    partitions: int
    end_offsets: list[int]


@dataclass(frozen=True)
class KafkaPartitionStatus:
    """One source partition of an app.

    `end_offset` is the last stable offset, the end a read_committed reader (the App)
    can reach. `lag` is the committed records between the app's committed offset (or
    the partition's start before its first commit) and that end: counted record by
    record when at most `LAG_PROBE_OFFSETS` offsets apart, else the offset difference.
    """

    topic: str
    partition: int
    end_offset: int
    committed_offset: int | None
    lag: int


@dataclass(frozen=True)
class OpenTransaction:
    """A partition whose last stable offset trails its end: a transaction is open.

    `age_seconds` is taken from the timestamp of the transaction's first record on the
    partition (None if it could not be read). `hanging` is set by `status`: older than
    the transaction timeout of the app it is attributed to (`app`, by topic), so the
    broker should have aborted it already.
    """

    topic: str
    partition: int
    stable_offset: int
    end_offset: int
    age_seconds: float | None
    app: str | None = None
    timeout_seconds: float | None = None
    hanging: bool = False


@dataclass(frozen=True)
class KafkaStepStatus:
    """A stateful step and its changelog topic (end offsets summed over partitions)."""

    name: str
    kind: str
    topic: str | None
    changelog: str | None
    changelog_end_offset: int


@dataclass(frozen=True)
class KafkaEffectStatus:
    """An effect sink's journal, as its changelog holds it: intents not yet settled,
    applied ones, and permanent failures (dead letters). `complete` is False when the
    changelog could not be read to its end in time (the counts are then a floor)."""

    name: str
    pending: int
    done: int
    dead: int
    complete: bool = True


@dataclass(frozen=True)
class KafkaAppStatus:
    name: str
    group: str
    group_state: str | None
    lag: int
    transaction_timeout_seconds: float
    # True when the App's recorded config does not say, and the timeout is the one its
    # commit interval would give under this shell's ONCEFLOW_COMMIT_INTERVAL.
    transaction_timeout_assumed: bool
    dead_letter_topic: str
    dead_letter_end_offset: int
    partitions: list[KafkaPartitionStatus]
    steps: list[KafkaStepStatus]
    effects: list[KafkaEffectStatus] = field(default_factory=list)


@dataclass(frozen=True)
class KafkaStatus:
    store: str
    apps: list[KafkaAppStatus]
    open_transactions: list[OpenTransaction] = field(default_factory=list)


@dataclass(frozen=True)
class AppMeta:
    """What an App wrote to its meta topic; None for an app known only by its group."""

    topology: list[list[str]] | None
    config: dict[str, Any]


# -- the cluster --------------------------------------------------------------------


class Cluster:
    """An AdminClient on the store's cluster, seen through the store's namespace: every
    name going in and coming out is the name without the namespace prefix."""

    def __init__(self, store: str) -> None:
        self.store = store
        self.url = KafkaURL.parse(store)
        self.ck = kafka_module()
        self.admin = self.ck.admin.AdminClient(self._conf())
        self._prefix = f"{self.url.namespace}." if self.url.namespace else ""

    def _conf(self, **extra: Any) -> dict[str, Any]:
        return {"bootstrap.servers": self.url.bootstrap, "logger": CLIENT_LOG, **extra}

    def call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except self.ck.KafkaException as exc:
            err = exc.args[0] if exc.args else exc
            reason = err.str() if hasattr(err, "str") else str(err)
            raise StoreError(
                f"{what} on Kafka at {self.url.bootstrap} failed: {reason}. Operator action: "
                "check that the broker is up and that --store names it"
            ) from exc

    def _mine(self, full: str) -> bool:
        # Kafka's own topics and groups start with "__"; other namespaces' do not
        # start with this one's prefix.
        return not full.startswith("__") and full.startswith(self._prefix)

    def tp(self, key: Key, offset: int | None = None) -> Any:
        full = self.url.topic(key[0])
        if offset is None:
            return self.ck.TopicPartition(full, key[1])
        return self.ck.TopicPartition(full, key[1], offset)

    def topics(self) -> dict[str, int]:
        """Topic name -> partitions, for the namespace's topics."""
        md = self.call("listing topics", lambda: self.admin.list_topics(timeout=_TIMEOUT_S))
        return {
            self.url.strip(name): len(t.partitions)
            for name, t in md.topics.items()
            if self._mine(name) and t.partitions
        }

    def offsets(
        self, keys: Iterable[Key], *, latest: bool = True, committed_only: bool = True
    ) -> dict[Key, int]:
        """The earliest or latest offset of each partition. Latest under read_committed
        is the last stable offset: the first offset of the oldest open transaction."""
        keys = list(keys)
        if not keys:
            return {}
        spec_type = self.ck.admin.OffsetSpec
        spec = spec_type.latest() if latest else spec_type.earliest()
        level = self.ck.IsolationLevel
        iso = level.READ_COMMITTED if committed_only else level.READ_UNCOMMITTED
        futures = self.call(
            "listing offsets",
            lambda: self.admin.list_offsets(
                {self.tp(k): spec for k in keys}, isolation_level=iso, request_timeout=_TIMEOUT_S
            ),
        )
        return {
            (self.url.strip(tp.topic), tp.partition): int(
                self.call("listing offsets", fut.result).offset
            )
            for tp, fut in futures.items()
        }

    def committed(self, group: str, keys: Iterable[Key] | None = None) -> dict[Key, int]:
        """The group's committed offsets (all its partitions when `keys` is None)."""
        full = self.url.topic(group)
        tps = None if keys is None else [self.tp(k) for k in keys]
        if tps == []:
            return {}
        req = self.ck.ConsumerGroupTopicPartitions(full, tps)
        futures = self.call(
            f"reading the offsets of group '{full}'",
            lambda: self.admin.list_consumer_group_offsets([req], request_timeout=_TIMEOUT_S),
        )
        result = self.call(f"reading the offsets of group '{full}'", futures[full].result)
        return {
            (self.url.strip(tp.topic), tp.partition): int(tp.offset)
            for tp in result.topic_partitions or []
            if tp.offset >= 0 and self._mine(tp.topic)
        }

    def groups(self) -> dict[str, str]:
        """Consumer groups of the namespace (names without the prefix) -> state."""
        result = self.call(
            "listing consumer groups",
            lambda: self.admin.list_consumer_groups(request_timeout=_TIMEOUT_S).result(),
        )
        return {
            self.url.strip(g.group_id): g.state.name for g in result.valid if self._mine(g.group_id)
        }

    def members(self, group: str) -> int | None:
        """How many members the group has once it is stable (None while it rebalances)."""
        full = self.url.topic(group)
        futures = self.call(
            f"describing group '{full}'",
            lambda: self.admin.describe_consumer_groups([full], request_timeout=_TIMEOUT_S),
        )
        desc = self.call(f"describing group '{full}'", futures[full].result)
        return len(desc.members) if desc.state.name == "STABLE" else None

    def consumer(self, *, committed_only: bool = True) -> Any:
        """A consumer for `assign()` only: never subscribes, never commits."""
        return self.ck.Consumer(
            self._conf(
                **{
                    "group.id": f"onceflow-cli-{uuid.uuid4().hex[:12]}",
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    # The end of a partition comes from the fetcher, which steps over
                    # transaction markers; the consumer's position does not.
                    "enable.partition.eof": True,
                    "isolation.level": "read_committed" if committed_only else "read_uncommitted",
                    "auto.offset.reset": "earliest",
                    # An operator waits on each read; the 500 ms default only saves
                    # requests, which a one-off look does not need to.
                    "fetch.wait.max.ms": 50,
                }
            )
        )

    def read(
        self,
        ranges: dict[Key, tuple[int, int]],
        *,
        committed_only: bool = True,
        limit: int | None = None,
        timeout: float = _READ_S,
    ) -> tuple[dict[Key, list[Any]], set[Key]]:
        """Raw messages of each partition from `start` up to `end` (exclusive), at most
        `limit` per partition; and the partitions not finished when `timeout` ran out.

        A partition is finished at `end`, at `limit`, or at the end the fetcher reports,
        which under read_committed is the last stable offset: aborted records and
        transaction markers are stepped over, never returned.
        """
        got: dict[Key, list[Any]] = {k: [] for k in ranges}
        todo = {k: r for k, r in ranges.items() if r[0] < r[1]}
        if not todo:
            return got, set()
        c = self.consumer(committed_only=committed_only)
        eof = self.ck.KafkaError._PARTITION_EOF
        try:
            c.assign([self.tp(k, start) for k, (start, _) in todo.items()])
            deadline = time.monotonic() + timeout
            while todo and time.monotonic() < deadline:
                for m in c.consume(1000, 0.1):
                    key = (self.url.strip(m.topic()), m.partition())
                    if key not in todo:
                        continue
                    err = m.error()
                    if err is not None:
                        if err.fatal():
                            raise StoreError(f"reading {key[0]}[{key[1]}]: {err.str()}")
                        # Other errors are transient (a leader moving); the client
                        # retries them until the deadline.
                        done = err.code() == eof
                    else:
                        end = todo[key][1]
                        if m.offset() < end:
                            got[key].append(m)
                        done = m.offset() >= end - 1 or (
                            limit is not None and len(got[key]) >= limit
                        )
                    if done:
                        del todo[key]
                        c.pause([self.tp(key)])
            return got, set(todo)
        finally:
            c.close()

    def metas(self, apps: Iterable[str]) -> dict[str, AppMeta]:
        """The last topology and config each app wrote to `<app>.meta`; apps whose meta
        topic holds no readable topology are left out."""
        keys = {app: (f"{app}.meta", 0) for app in apps}
        # Written without a transaction: every record is committed as soon as written.
        low = self.offsets(keys.values(), latest=False)
        high = self.offsets(keys.values(), committed_only=False)
        got, unfinished = self.read({k: (low[k], high[k]) for k in keys.values()})
        if unfinished:
            # Leaving the app out would report it missing, which is worse than failing.
            names = ", ".join(sorted(t for t, _ in unfinished))
            raise StoreError(
                f"timed out reading {names} on Kafka at {self.url.bootstrap}. Operator "
                "action: check the broker's health and run status again"
            )
        out = {}
        for app, key in keys.items():
            topology: list[list[str]] | None = None
            config: dict[str, Any] = {}
            for m in got[key]:
                try:
                    if m.key() == b"topology":
                        topology = json.loads(m.value())
                    elif m.key() == b"config":
                        config = json.loads(m.value())
                except (ValueError, TypeError):
                    # A user topic that merely ends in ".meta": not an App's.
                    topology = None
                    break
            if isinstance(topology, list) and isinstance(config, dict):
                out[app] = AppMeta(topology, config)
        return out


# -- status -----------------------------------------------------------------------


def app_lag(store: str, app: str, topics: list[str]) -> list[KafkaPartitionStatus]:
    """End offsets of every partition of `topics` against the app's committed offsets."""
    cluster = Cluster(store)
    found = cluster.topics()
    keys = [(t, p) for t in sorted(set(topics)) if t in found for p in range(found[t])]
    return _lags(cluster, app, keys)


def _lags(
    cluster: Cluster, app: str, keys: list[Key], committed: dict[Key, int] | None = None
) -> list[KafkaPartitionStatus]:
    if not keys:
        return []
    if committed is None:
        committed = cluster.committed(app, keys)
    low = cluster.offsets(keys, latest=False)
    end = cluster.offsets(keys)
    # Where the app reads next: its commit, or the start (auto.offset.reset=earliest)
    # before its first commit or when retention deleted what it had not read.
    starts = {k: max(committed.get(k, low[k]), low[k]) for k in keys}
    probe = {k: (starts[k], end[k]) for k in keys if 0 < end[k] - starts[k] <= LAG_PROBE_OFFSETS}
    got, unfinished = cluster.read(probe)
    out = []
    for k in keys:
        lag = max(0, end[k] - starts[k])
        if k in probe and k not in unfinished:
            lag = len(got[k])
        out.append(KafkaPartitionStatus(k[0], k[1], end[k], committed.get(k), lag))
    return out


def open_transactions(store: str, topics: list[str] | None = None) -> list[OpenTransaction]:
    """Partitions (of `topics`, or of every topic of the store's namespace) with an open
    transaction, and how long ago its first record there was written."""
    return _open_transactions(Cluster(store), topics)


def _open_transactions(cluster: Cluster, topics: list[str] | None) -> list[OpenTransaction]:
    found = cluster.topics()
    names = sorted(found if topics is None else set(topics) & found.keys())
    keys = [(t, p) for t in names for p in range(found[t])]
    # The end first, then the stable offset: on a partition being written, the reverse
    # order would see the end move past a stable offset read a moment before and report
    # a transaction that never was. This order can only miss one opened in between.
    ends = cluster.offsets(keys, committed_only=False)
    stable = cluster.offsets(keys)
    open_keys = [k for k in keys if stable[k] < ends[k]]
    # The record at the last stable offset is the first of the oldest open transaction;
    # only a read_uncommitted reader sees it.
    first, _ = cluster.read(
        {k: (stable[k], ends[k]) for k in open_keys}, committed_only=False, limit=1
    )
    now = time.time()
    out = []
    for k in open_keys:
        msgs = first[k]
        age = max(0.0, now - msgs[0].timestamp()[1] / 1000.0) if msgs else None
        out.append(OpenTransaction(k[0], k[1], stable[k], ends[k], age))
    return out


def transaction_timeout_s(config: dict[str, Any]) -> tuple[float, bool]:
    """The app's transaction timeout in seconds, and whether it is assumed.

    Taken from the App's recorded config when it holds `transaction_timeout_ms` or
    `commit_interval`; otherwise computed from this shell's commit interval setting
    (the default gives 10 s), which is right for Apps that use the default.
    """
    if isinstance(config.get("transaction_timeout_ms"), int | float):
        return float(config["transaction_timeout_ms"]) / 1000.0, False
    if isinstance(config.get("commit_interval"), int | float):
        return transaction_timeout_ms(float(config["commit_interval"])) / 1000.0, False
    return transaction_timeout_ms(Settings.from_env().commit_interval) / 1000.0, True


def app_names(cluster: Cluster, topics: dict[str, int] | None = None) -> list[str]:
    """Apps of the namespace: the names of its `<app>.meta` topics (the meta topic is
    written before an App first reads; a consumer group alone may be any consumer's)."""
    found = cluster.topics() if topics is None else topics
    return sorted(t[: -len(".meta")] for t in found if t.endswith(".meta") and t != ".meta")


def status(store: str, app: str | None = None, topics: Sequence[str] = ()) -> KafkaStatus:
    """Every app of the namespace, or only `app`, and the namespace's open transactions.

    `topics` adds source topics to count lag on (for `app`, or for every app): for a
    stateless App that has not committed yet, nothing else names its sources.
    """
    cluster = Cluster(store)
    found = cluster.topics()
    missing = [t for t in topics if t not in found]
    if missing:
        raise ConfigError(
            f"topic '{missing[0]}' does not exist on {store} "
            f"(topics: {', '.join(sorted(found)) or 'none'})"
        )
    groups = cluster.groups()
    metas = cluster.metas(app_names(cluster, found))
    if not cluster.url.namespace:
        # Without a namespace every topic is in view, namespaced Apps' meta topics too
        # ("staging.payments.meta"). Each App creates its dead-letter topic under the
        # name it recorded, so a meta whose dead-letter topic is not here is one of a
        # namespace's Apps, whose other names would not be found either.
        metas = {a: m for a, m in metas.items() if _dead_letter_topic(a, m.config) in found}
    if app is None:
        names = sorted(metas)
    elif app in metas or app in groups:
        # A group asked for by name is shown for its offsets even without a meta topic.
        names = [app]
    else:
        raise ConfigError(
            f"no app named '{app}' on {store} (apps: {', '.join(sorted(metas)) or 'none'})"
        )
    apps = [
        _app_status(cluster, name, metas.get(name), groups.get(name), found, topics)
        for name in names
    ]
    txns = _attribute(_open_transactions(cluster, None), metas)
    if app is not None:
        # Transactions on another app's topics are that app's business; those on
        # topics no app claims (outputs) may be this one's.
        txns = [t for t in txns if t.app is None or app in t.app.split(", ")]
    return KafkaStatus(store, apps, txns)


def _changelogs(app: str, topology: list[list[str]]) -> dict[str, str]:
    """Source topic -> changelog topic, per the naming of `KafkaSession.changelog`."""
    return {s[2]: f"{app}.{s[2]}.changelog" for s in topology if len(s) > 2 and s[2]}


def _dead_letter_topic(app: str, config: dict[str, Any]) -> str:
    return str(config.get("dead_letter_topic", f"{app}.dead-letters"))


def _app_status(
    cluster: Cluster,
    name: str,
    meta: AppMeta | None,
    group_state: str | None,
    found: dict[str, int],
    extra_topics: Sequence[str],
) -> KafkaAppStatus:
    topology = (meta.topology or []) if meta is not None else []
    config = meta.config if meta is not None else {}
    sources = {s[2] for s in topology if len(s) > 2 and s[2]}
    sources |= {t for t in config.get("sources", []) if isinstance(t, str)}
    committed = cluster.committed(name)
    sources |= {t for t, _ in committed}
    sources |= set(extra_topics)
    keys = [(t, p) for t in sorted(sources) if t in found for p in range(found[t])]
    parts = _lags(cluster, name, keys, committed)
    dlq = _dead_letter_topic(name, config)
    changelogs = _changelogs(name, topology)
    ends = cluster.offsets(
        [(t, p) for t in [dlq, *changelogs.values()] if t in found for p in range(found[t])],
        committed_only=False,
    )

    def total(topic: str) -> int:
        return sum(off for (t, _), off in ends.items() if t == topic)

    steps = [
        KafkaStepStatus(
            s[0],
            s[1],
            s[2] if len(s) > 2 else None,
            changelogs.get(s[2]) if len(s) > 2 else None,
            total(changelogs[s[2]]) if len(s) > 2 and s[2] in changelogs else 0,
        )
        for s in sorted(topology)
    ]
    timeout, assumed = transaction_timeout_s(config)
    effects = _effects(cluster, name, config, found)
    return KafkaAppStatus(
        name=name,
        group=cluster.url.topic(name),
        group_state=group_state,
        lag=sum(p.lag for p in parts),
        transaction_timeout_seconds=timeout,
        transaction_timeout_assumed=assumed,
        dead_letter_topic=dlq,
        dead_letter_end_offset=total(dlq),
        partitions=parts,
        steps=steps,
        effects=effects,
    )


def _effects(
    cluster: Cluster, app: str, config: dict[str, Any], found: dict[str, int]
) -> list[KafkaEffectStatus]:
    """Each effect sink's intents by their last changelog record (what compaction
    keeps), read from the changelog of the topic that feeds the sink."""
    sinks = config.get("effect_sinks")
    if not isinstance(sinks, dict):
        return []
    out = []
    for sink, topic in sorted(sinks.items()):
        changelog = f"{app}.{topic}.changelog"
        keys = [(changelog, p) for p in range(found.get(changelog, 0))]
        low = cluster.offsets(keys, latest=False)
        high = cluster.offsets(keys)
        got, unfinished = cluster.read({k: (low[k], high[k]) for k in keys})
        prefix = _EFFECT + b"\x00" + str(sink).encode() + b"\x00"
        last: dict[bytes, str] = {}
        for msgs in got.values():
            for m in msgs:
                key, value = m.key(), m.value()
                if key and key.startswith(prefix) and value is not None:
                    last[key] = str(_msgpack_dec.decode(value)[3])
        counts = Counter(last.values())
        out.append(
            KafkaEffectStatus(
                str(sink), counts["pending"], counts["done"], counts["dead"], not unfinished
            )
        )
    return out


def _attribute(txns: list[OpenTransaction], metas: dict[str, AppMeta]) -> list[OpenTransaction]:
    """Name the app whose topics hold each open transaction, and flag hanging ones.

    An App writes transactionally to its changelogs, its dead letters and its outputs;
    the first two (and outputs, if its config lists them) are known by name. A topic no
    app claims is judged against the longest timeout of the namespace's apps, so a
    transaction is never called hanging while its writer may still legitimately hold it.
    """
    owners: dict[str, list[tuple[str, float]]] = {}
    timeouts = []
    for name, meta in metas.items():
        timeout = transaction_timeout_s(meta.config)[0]
        timeouts.append(timeout)
        owned = {_dead_letter_topic(name, meta.config)}
        owned |= set(_changelogs(name, meta.topology or []).values())
        owned |= {t for t in meta.config.get("outputs", []) if isinstance(t, str)}
        for topic in owned:
            owners.setdefault(topic, []).append((name, timeout))
    fallback = max(timeouts or [transaction_timeout_s({})[0]])
    out = []
    for t in txns:
        writers = owners.get(t.topic, [])
        timeout = max([w[1] for w in writers] or [fallback])
        out.append(
            replace(
                t,
                app=", ".join(sorted(w[0] for w in writers)) or None,
                timeout_seconds=timeout,
                hanging=t.age_seconds is not None and t.age_seconds > timeout,
            )
        )
    return out


# -- topics -----------------------------------------------------------------------


def list_topics(store: str) -> list[KafkaTopicInfo]:
    cluster = Cluster(store)
    found = cluster.topics()
    ends = cluster.offsets([(t, p) for t in found for p in range(found[t])], committed_only=False)
    return [
        KafkaTopicInfo(t, n, [ends[(t, p)] for p in range(n)]) for t, n in sorted(found.items())
    ]


# -- tail -------------------------------------------------------------------------


def to_record(cluster: Cluster, m: Any) -> Record:
    return message_record(m, cluster.url.strip(m.topic()))


class KafkaTail:
    """Committed records of one topic (read_committed), from a chosen start, then as
    they are committed. Never joins a group, never commits."""

    def __init__(self, store: str, topic: str, partition: int | None) -> None:
        self.cluster = Cluster(store)
        self.topic = topic
        found = self.cluster.topics()
        if topic not in found:
            known = ", ".join(sorted(found)) or "none"
            raise ConfigError(f"topic '{topic}' does not exist on {store} (topics: {known})")
        n = found[topic]
        if partition is not None and not 0 <= partition < n:
            raise ConfigError(f"topic '{topic}' has {n} partition(s); --partition {partition}")
        self.parts = list(range(n)) if partition is None else [partition]
        keys = [(topic, p) for p in self.parts]
        low = self.cluster.offsets(keys, latest=False)
        end = self.cluster.offsets(keys)
        self.low = {p: low[(topic, p)] for p in self.parts}
        # The end when the tail started: reading without --follow stops here, so a
        # topic that keeps being written still gives a tail that ends.
        self.end = {p: end[(topic, p)] for p in self.parts}
        self.positions = dict(self.end)
        self._at_end: set[int] = set()
        self._consumer: Any = None

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def __enter__(self) -> KafkaTail:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def from_beginning(self) -> None:
        self.positions = dict(self.low)

    def last(self, n: int) -> list[Record]:
        """The last `n` committed records across the partitions (by timestamp); reading
        goes on after them. Offsets also count markers and aborted records, so each
        partition is read back from its end in growing windows until it gives `n`."""
        found: list[Any] = []
        todo = set(self.parts) if n > 0 else set()
        window = n
        while todo:
            ranges = {
                (self.topic, p): (max(self.low[p], self.end[p] - window), self.end[p]) for p in todo
            }
            got, unfinished = self.cluster.read(ranges, timeout=_TIMEOUT_S)
            if unfinished:
                raise StoreError(
                    f"timed out reading '{self.topic}' on Kafka at {self.cluster.url.bootstrap}"
                )
            for (_, p), (start, _) in ranges.items():
                msgs = got[(self.topic, p)]
                if len(msgs) >= n or start <= self.low[p]:
                    found.extend(msgs[-n:])
                    todo.discard(p)
            window *= 4
        recs = [to_record(self.cluster, m) for m in found]
        recs.sort(key=lambda r: (r.timestamp, r.partition, r.offset))
        return recs[-n:] if n else []

    def _open(self) -> Any:
        if self._consumer is None:
            self._consumer = self.cluster.consumer()
            self._consumer.assign(
                [self.cluster.tp((self.topic, p), self.positions[p]) for p in self.parts]
            )
        return self._consumer

    def poll(self, timeout: float) -> list[Record]:
        """Committed records that arrived, waiting up to `timeout` for the first."""
        c = self._open()
        out = []
        for m in c.consume(1000, timeout):
            err = m.error()
            if err is not None:
                if err.code() == self.cluster.ck.KafkaError._PARTITION_EOF:
                    self._at_end.add(m.partition())
                    self.positions[m.partition()] = max(self.positions[m.partition()], m.offset())
                elif err.fatal():
                    raise StoreError(f"reading '{self.topic}': {err.str()}")
                continue
            self._at_end.discard(m.partition())
            self.positions[m.partition()] = m.offset() + 1
            out.append(to_record(self.cluster, m))
        return out

    def drained(self) -> bool:
        """Every partition read up to where it ended when the tail started."""
        return all(self.positions[p] >= self.end[p] or p in self._at_end for p in self.parts)


# -- reset ------------------------------------------------------------------------


def refuse_reset(store: str, app: str) -> NoReturn:
    """`onceflow reset` on Kafka: refused, with what to do instead.

    Deleting the group's offsets and the changelog topics from here would not reset the
    app: its state also lives in a local store on every worker's disk
    (ONCEFLOW_STATE_DIR), which a command run here cannot reach. A worker that kept its
    store would trust it over the recreated changelog as soon as that grew past the
    offset the store records, and bring stale state back.
    """
    url = KafkaURL.parse(store)
    ns = url.namespace or "(none)"
    raise ConfigError(
        f"reset is not available on Kafka: app '{app}' keeps state in local stores on each "
        "worker's disk (ONCEFLOW_STATE_DIR) as well as in the cluster, and a reset from "
        "here cannot reach them. Operator action: to reprocess from the start, run the "
        f"pipeline under a new app name (App('{app}-v2', ...)) or in a new namespace "
        f"(kafka://{url.bootstrap}/NEW; this store's namespace is {ns}); once nothing "
        f"uses the old app, delete its consumer group '{url.topic(app)}', its topics "
        f"'{url.topic(app)}.*' and its ONCEFLOW_STATE_DIR directories with Kafka's tools"
    )

"""What every Kafka-backed part shares: the store URL, client settings, partitioning."""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from ._errors import ConfigError, MissingExtraError
from ._records import Record

ID_HEADER = "onceflow-id"

# librdkafka logs every failed connection attempt to stderr (dozens a second when the
# broker is down). Routed here instead: the CLI reports one error line, and a program
# that configures logging still sees them.
CLIENT_LOG = logging.getLogger("onceflow.kafka.client")
CLIENT_LOG.addHandler(logging.NullHandler())


class _HoldBackRepeats(logging.Filter):
    """Lets the first client line of each kind through, then one a minute.

    Every client of a worker logs a failed connection attempt at each reconnect backoff
    (several lines a second in all while the broker is down, for as long as it is down):
    that flood buried the one line that said what was wrong. A kind is librdkafka's
    facility (FAIL, SESSTMOUT, TXNERR...) at its level; the line that passes after a
    quiet spell says how many were held back."""

    def __init__(self, every: float) -> None:
        super().__init__()
        self.every = every
        self._lock = threading.Lock()
        self._seen: dict[tuple[int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        kind = str(args[0]) if isinstance(args, tuple) and args else str(record.msg)
        key = (record.levelno, kind)
        now = time.monotonic()
        with self._lock:
            last, held = self._seen.get(key, (-self.every, 0))
            if now - last < self.every:
                self._seen[key] = (last, held + 1)
                return False
            self._seen[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} ({held} more like it held back in {self.every:.0f}s)"
        return True


CLIENT_LOG.addFilter(_HoldBackRepeats(every=60.0))


def kafka_module() -> Any:
    try:
        import confluent_kafka
        import confluent_kafka.admin
    except ImportError as exc:
        raise MissingExtraError("kafka", "confluent-kafka") from exc
    return confluent_kafka


def is_kafka(store: str) -> bool:
    return store.startswith("kafka://")


_URL = re.compile(r"^kafka://(?P<hosts>[^/]+)(?:/(?P<ns>[A-Za-z0-9._-]*))?$")


@dataclass(frozen=True)
class KafkaURL:
    """`kafka://host:port[,host:port][/namespace]`.

    The namespace prefixes every topic, group and transactional id onceflow uses, so
    several environments (or test cases) share one cluster without seeing each other.
    """

    bootstrap: str
    namespace: str

    @classmethod
    def parse(cls, store: str) -> KafkaURL:
        m = _URL.match(store)
        if m is None:
            raise ConfigError(f"store {store!r} is not kafka://HOST:PORT[,HOST:PORT][/NAMESPACE]")
        return cls(m.group("hosts"), m.group("ns") or "")

    def topic(self, name: str) -> str:
        return f"{self.namespace}.{name}" if self.namespace else name

    def strip(self, name: str) -> str:
        prefix = f"{self.namespace}." if self.namespace else ""
        return name[len(prefix) :] if prefix and name.startswith(prefix) else name


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (Utils.murmur2), so keys land where Java clients put them."""
    length = len(data)
    seed = 0x9747B28C
    m = 0x5BD1E995
    r = 24
    mask = 0xFFFFFFFF
    h = (seed ^ length) & mask
    n4 = length // 4
    for i in range(n4):
        j = i * 4
        k = data[j] | (data[j + 1] << 8) | (data[j + 2] << 16) | (data[j + 3] << 24)
        k = (k * m) & mask
        k ^= k >> r
        k = (k * m) & mask
        h = (h * m) & mask
        h ^= k
    rest = length % 4
    j = n4 * 4
    if rest == 3:
        h ^= data[j + 2] << 16
    if rest >= 2:
        h ^= data[j + 1] << 8
    if rest >= 1:
        h ^= data[j]
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h


# Kafka keys and ids are bytes; onceflow hands them to user code as str. Bytes that are
# not UTF-8 become lone surrogates (U+DC80..U+DCFF) and go back to the same bytes: with
# errors="replace" two keys differing only in such bytes shared one state, and outputs
# lost their original key.
_LOSSLESS = "surrogateescape"


def decode_key(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", _LOSSLESS)


def encode_key(key: str) -> bytes:
    """The bytes a decoded key came from. A key a user function made with other lone
    surrogates (U+D800..U+DC7F) stands for no bytes at all: it raises UnicodeEncodeError,
    and its record becomes a dead letter, as on the embedded store, rather than being
    written as bytes that would read back as another key."""
    return key.encode("utf-8", _LOSSLESS)


def kafka_partition(key: str | None, partitions: int, fallback: int) -> int:
    """Java's default partitioner for keyed records; the input's partition otherwise."""
    if key is None:
        return fallback % partitions
    return _keyed_partition(key, partitions)


@functools.lru_cache(maxsize=200_000)
def _keyed_partition(key: str, partitions: int) -> int:
    # murmur2 in Python costs microseconds; keys repeat, so it is computed once each.
    return (murmur2(encode_key(key)) & 0x7FFFFFFF) % partitions


def encode_headers(
    headers: dict[str, str] | None, id: str | None
) -> list[tuple[str, bytes]] | None:
    out = [(k, encode_key(v)) for k, v in (headers or {}).items()]
    if id is not None:
        out.append((ID_HEADER, encode_key(id)))
    return out or None


def decode_headers(raw: Any) -> tuple[dict[str, str] | None, str | None]:
    if not raw:
        return None, None
    headers: dict[str, str] = {}
    eid = None
    for k, v in raw:
        # Lossless like keys: two business ids that differ only in bytes that are not
        # UTF-8 must stay two ids for `dedupe`.
        text = v.decode("utf-8", _LOSSLESS) if isinstance(v, bytes) else (v or "")
        if k == ID_HEADER:
            eid = text
        else:
            headers[k] = text
    return headers or None, eid


def message_record(msg: Any, topic: str) -> Record:
    """A confluent-kafka message as the Record the public API returns (under its
    topic's name without the namespace)."""
    headers, eid = decode_headers(msg.headers())
    return Record(
        topic,
        msg.partition(),
        msg.offset(),
        decode_key(msg.key()),
        msg.value() or b"",
        headers,
        msg.timestamp()[1] / 1000.0,
        eid,
    )


def is_outage(exc: BaseException) -> bool:
    """Whether a client error is the cluster's passing state (a broker down, a
    coordinator moving, a producer to recreate) rather than a record the broker refuses
    whatever happens (too large, invalid), which must become a dead letter instead of
    being waited for."""
    ck = kafka_module()
    if not isinstance(exc, ck.KafkaException) or not exc.args:
        return False
    code = getattr(exc.args[0], "code", None)
    refused = {
        ck.KafkaError.MSG_SIZE_TOO_LARGE,
        ck.KafkaError.RECORD_LIST_TOO_LARGE,
        ck.KafkaError.INVALID_RECORD,
        ck.KafkaError.INVALID_MSG,
        ck.KafkaError.INVALID_MSG_SIZE,
    }
    return callable(code) and code() not in refused


def transient(ck: Any, err: Any) -> bool:
    """A client error that the broker coming back (or a pending transaction ending)
    clears by itself: waited out, never reported as a failure."""
    return bool(err.retriable()) or err.code() in (
        ck.KafkaError._TRANSPORT,
        ck.KafkaError._ALL_BROKERS_DOWN,
        ck.KafkaError._TIMED_OUT,
        ck.KafkaError._WAIT_COORD,
        ck.KafkaError._UNKNOWN_PARTITION,
        ck.KafkaError.REQUEST_TIMED_OUT,
        ck.KafkaError.NOT_COORDINATOR,
        ck.KafkaError.COORDINATOR_NOT_AVAILABLE,
        ck.KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        ck.KafkaError.LEADER_NOT_AVAILABLE,
        ck.KafkaError.NOT_LEADER_FOR_PARTITION,
        ck.KafkaError.UNKNOWN_TOPIC_OR_PART,
        ck.KafkaError.UNSTABLE_OFFSET_COMMIT,
    )


class Waiting:
    """Waits out a condition that clears by itself (an outage, another process's open
    transaction): says so once in the log, backs off, and says when it is over. A log
    line per retry would bury everything else during a long outage."""

    def __init__(self, log: logging.Logger, first: float = 0.05, cap: float = 2.0) -> None:
        self.log = log
        self.first = self.delay = first
        self.cap = cap
        self.since: float | None = None

    def __call__(self, why: str, sleep: bool = True) -> None:
        """One more round of waiting, for `why` (logged the first time only)."""
        if self.since is None:
            self.since = time.monotonic()
            self.log.warning("%s; waiting, onceflow resumes by itself", why)
        if sleep:
            time.sleep(self.delay)
            self.delay = min(self.cap, self.delay * 2)

    def over(self, what: str) -> None:
        """The condition cleared: the next one is logged again."""
        if self.since is not None:
            self.log.warning("%s after waiting %.1fs", what, time.monotonic() - self.since)
        self.since = None
        self.delay = self.first

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


def kafka_partition(key: str | None, partitions: int, fallback: int) -> int:
    """Java's default partitioner for keyed records; the input's partition otherwise."""
    if key is None:
        return fallback % partitions
    return _keyed_partition(key, partitions)


@functools.lru_cache(maxsize=200_000)
def _keyed_partition(key: str, partitions: int) -> int:
    # murmur2 in Python costs microseconds; keys repeat, so it is computed once each.
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def encode_headers(
    headers: dict[str, str] | None, id: str | None
) -> list[tuple[str, bytes]] | None:
    out = [(k, v.encode()) for k, v in (headers or {}).items()]
    if id is not None:
        out.append((ID_HEADER, id.encode()))
    return out or None


def decode_headers(raw: Any) -> tuple[dict[str, str] | None, str | None]:
    if not raw:
        return None, None
    headers: dict[str, str] = {}
    eid = None
    for k, v in raw:
        text = v.decode(errors="replace") if isinstance(v, bytes) else (v or "")
        if k == ID_HEADER:
            eid = text
        else:
            headers[k] = text
    return headers or None, eid


def message_record(msg: Any, topic: str) -> Record:
    """A confluent-kafka message as the Record the public API returns (under its
    topic's name without the namespace)."""
    headers, eid = decode_headers(msg.headers())
    key = msg.key()
    return Record(
        topic,
        msg.partition(),
        msg.offset(),
        None if key is None else key.decode(errors="replace"),
        msg.value() or b"",
        headers,
        msg.timestamp()[1] / 1000.0,
        eid,
    )

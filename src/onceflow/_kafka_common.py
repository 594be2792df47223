"""What every Kafka-backed part shares: the store URL, client settings, partitioning."""

from __future__ import annotations

import functools
import logging
import re
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

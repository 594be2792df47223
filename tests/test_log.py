"""The embedded log: durable idempotent sends, dense offsets, committed reads, groups."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from onceflow import ConfigError, Consumer, Producer, StoreError
from onceflow._sqlite import SQLiteStore

from .helpers import read_all


@pytest.fixture
def store(embedded_store: str) -> str:
    """The embedded log's own behaviour: sequences, dense offsets, SQLite locking."""
    return embedded_store


def test_send_assigns_dense_offsets_per_partition(store: str) -> None:
    with Producer(store, producer_id="p", partitions=3) as p:
        results = [p.send("t", {"i": i}, key=f"k{i % 5}") for i in range(30)]
    by_part: dict[int, list[int]] = {}
    for r in results:
        assert not r.duplicate and r.offset is not None
        by_part.setdefault(r.partition, []).append(r.offset)
    for offs in by_part.values():
        assert offs == list(range(len(offs)))
    assert len(read_all(store, "t")) == 30


def test_same_key_same_partition(store: str) -> None:
    with Producer(store, partitions=4) as p:
        parts = {p.send("t", i, key="acct-1").partition for i in range(10)}
    assert len(parts) == 1


def test_resend_with_same_sequence_is_stored_once(store: str) -> None:
    with Producer(store, producer_id="orders") as p:
        first = p.send("t", b"a", key="k", sequence=0)
        again = p.send("t", b"a", key="k", sequence=0)
    assert not first.duplicate and again.duplicate
    assert [r.value for r in read_all(store, "t")] == [b"a"]


def test_restarted_producer_resumes_its_sequences(store: str) -> None:
    with Producer(store, producer_id="orders") as p:
        p.send_batch("t", [("k", b"a", "id-a"), ("k", b"b", "id-b")])
    # The process restarts: same producer id, sequences continue from the store.
    with Producer(store, producer_id="orders") as p:
        assert p.last_sequence("t", 0) == 1
        dup = p.send("t", b"b", key="k", id="id-b", sequence=1)  # a retry: the same record
        new = p.send("t", b"c", key="k")
    assert dup.duplicate and not new.duplicate
    assert [r.value for r in read_all(store, "t")] == [b"a", b"b", b"c"]


def test_other_producer_ids_are_independent(store: str) -> None:
    with Producer(store, producer_id="a") as a, Producer(store, producer_id="b") as b:
        a.send("t", b"x", sequence=0)
        b.send("t", b"x", sequence=0)
    assert len(read_all(store, "t")) == 2


def test_batch_is_all_or_nothing(store: str) -> None:
    with Producer(store) as p, pytest.raises(ConfigError):
        p.send_batch("t", [("k", b"1", None), ("k", b"2", None)], sequences=[0])
    assert read_all(store, "t") == []


def test_records_keep_key_value_headers_id(store: str) -> None:
    with Producer(store) as p:
        p.send("t", {"a": 1}, key="k", id="e-1", headers={"h": "v"}, timestamp=123.0)
    (rec,) = read_all(store, "t")
    assert (rec.key, rec.value, rec.headers, rec.id, rec.timestamp) == (
        "k",
        b'{"a":1}',
        {"h": "v"},
        "e-1",
        123.0,
    )


def test_consumer_group_commits_positions(store: str) -> None:
    with Producer(store) as p:
        p.send_batch("t", [(None, i, None) for i in range(10)])
    with Consumer(store, group="g", topics=["t"]) as c:
        assert len(c.poll(max_records=4)) == 4
        c.commit()
    with Consumer(store, group="g", topics=["t"]) as c:
        rest = c.poll(max_records=100)
    assert [r.offset for r in rest] == list(range(4, 10))


def test_consumer_start_latest(store: str) -> None:
    with Producer(store) as p:
        p.send("t", 1)
        with Consumer(store, group="late", topics=["t"], start="latest") as c:
            assert c.poll() == []
            p.send("t", 2)
            assert [r.value for r in c.poll(timeout=1)] == [b"2"]


def test_group_offsets_never_move_back(store: str) -> None:
    with Producer(store) as p:
        p.send_batch("t", [(None, i, None) for i in range(5)])
    with Consumer(store, group="g", topics=["t"]) as c:
        c.poll()
        c.commit()
        c.seek("t", 0, 1)
        with pytest.raises(StoreError, match="move partition 0"):
            c.commit()


def test_uncommitted_writes_are_invisible(store: str) -> None:
    with Producer(store) as p:
        p.send("t", b"committed")
    st = SQLiteStore(store)
    tid, _ = st.topic("t") or (0, 0)
    from onceflow._records import Columns

    with st.lock:
        st.conn.execute("BEGIN IMMEDIATE")
        st.append(st.conn, tid, 0, Columns(["k"], [b"open"], None, [0.0], [None]))
        # Another connection, like another process, reads while the transaction is open.
        assert [r.value for r in read_all(store, "t")] == [b"committed"]
        st.conn.execute("ROLLBACK")
    st.close()
    assert [r.value for r in read_all(store, "t")] == [b"committed"]


def test_invalid_topic_name_is_refused(store: str) -> None:
    with Producer(store) as p, pytest.raises(ConfigError, match="invalid topic name"):
        p.send("bad topic!", b"x")


def test_store_directory_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Producer(str(tmp_path / "missing" / "x.db"))


def test_wrong_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    Producer(str(path)).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value='0' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema version 0"):
        Producer(str(path))


def _send_many(path: str, who: int, n: int) -> None:
    with Producer(path, producer_id=f"proc-{who}", partitions=2) as p:
        for i in range(n):
            p.send("shared", {"who": who, "i": i}, key=f"{who}-{i % 3}")


def _consume_until(path: str, want: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    seen = 0
    with Consumer(path, group="watcher", topics=["shared"]) as c:
        for _ in range(2000):
            seen += len(c.poll(max_records=500, timeout=0.05))
            c.commit()
            if seen >= want:
                break
    out.put(seen)


def test_many_processes_share_one_store(store: str) -> None:
    """Four writers and a committing reader at once: no 'database is locked' escapes."""
    ctx = multiprocessing.get_context("spawn")
    n = 150
    q: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
    Producer(store, partitions=2).close()
    procs = [ctx.Process(target=_send_many, args=(store, w, n)) for w in range(4)]
    reader = ctx.Process(target=_consume_until, args=(store, 4 * n, q))
    for proc in [*procs, reader]:
        proc.start()
    for proc in [*procs, reader]:
        proc.join(120)
        assert proc.exitcode == 0
    assert q.get(timeout=5) == 4 * n
    recs = read_all(store, "shared")
    assert len(recs) == 4 * n
    assert len({r.value for r in recs}) == 4 * n

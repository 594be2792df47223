"""Producer sessions: two sessions of one producer id, a paused sender, threads sharing a
Producer, explicit sequences. Proven on both backends by what is in the log: every
acknowledged record exactly once. On the embedded log a new session fences the old one
and explicit sequences out of order are refused."""

from __future__ import annotations

import multiprocessing
import queue
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from onceflow import ConfigError, FencedError, Producer, SendResult

from .helpers import read_all


def ids_in_log(store: str, topic: str) -> Counter[str | None]:
    return Counter(r.id for r in read_all(store, topic))


def test_two_sessions_of_one_producer_id_lose_nothing(store: str, backend: str) -> None:
    """Two replicas, or a restarted process whose predecessor still sends. Every
    acknowledged record is in the log exactly once. Embedded: the older session is
    fenced, with an error naming the producer id, and stores nothing. Kafka: the broker
    gives each Producer a session of its own; both store what they send."""
    acked: list[tuple[str | None, SendResult]] = []
    fenced: list[FencedError] = []

    def send(p: Producer, items: list[tuple[str | None, Any, str | None]]) -> None:
        try:
            got = p.send_batch("t", items)
        except FencedError as exc:
            fenced.append(exc)
            return
        acked.extend(zip([eid for _, _, eid in items], got, strict=True))

    with Producer(store, producer_id="checkout", partitions=2) as old:
        send(old, [("k", {"n": 0}, "old-0")])
        with Producer(store, producer_id="checkout", partitions=2) as new:
            send(new, [("k", {"n": 1}, "new-1")])
            send(old, [("k", {"n": 2}, "old-2")])
            send(old, [("k", {"n": 3}, "old-3"), ("j", {"n": 4}, "old-4")])
            send(new, [("k", {"n": 5}, "new-5")])
    assert [eid for eid, r in acked if r.duplicate] == []
    assert ids_in_log(store, "t") == Counter(eid for eid, _ in acked)
    if backend == "embedded":
        assert len(fenced) == 2, fenced
        assert all("'checkout'" in str(e) and "new Producer" in str(e) for e in fenced)
    else:
        assert fenced == []


def _pause_before_commit(p: Producer, reached: threading.Event, resume: threading.Event) -> None:
    """Hold `p`'s next send after its records are prepared, before they are committed:
    on the embedded log after its sequence numbers were planned, on Kafka after the
    records went to the client, before the send is acknowledged."""
    client: Any = p._client
    if hasattr(client, "_write"):  # the embedded log's client
        write = client._write

        def held(*args: Any, **kwargs: Any) -> Any:
            reached.set()
            assert resume.wait(60)
            return write(*args, **kwargs)

        client._write = held
        return
    kafka = client

    class Held:
        def __init__(self, inner: Any) -> None:
            self._inner = inner
            self._done = False

        def __getattr__(self, name: str) -> Any:
            attr = getattr(self._inner, name)
            if name == "flush" and not self._done:
                self._done = True

                def call(*args: Any, **kwargs: Any) -> Any:
                    reached.set()
                    assert resume.wait(60)
                    return attr(*args, **kwargs)

                return call
            return attr

    kafka.producer = Held(kafka.producer)


def test_a_paused_sender_resumes_and_nothing_acknowledged_is_lost(store: str, backend: str) -> None:
    """The old race: a sender paused between taking its sequence numbers and its commit
    while a new session of the same id sends. Resumed, it must not have its record
    dropped as a duplicate: on the embedded log it is fenced, on Kafka it is stored."""
    reached, resume = threading.Event(), threading.Event()
    outcome: list[SendResult | BaseException] = []
    with Producer(store, producer_id="ledger-api") as old:
        old.send("t", {"n": 0}, key="k", id="before")
        _pause_before_commit(old, reached, resume)

        def late_send() -> None:
            try:
                outcome.append(old.send("t", {"n": 1}, key="k", id="late"))
            except BaseException as exc:
                outcome.append(exc)

        t = threading.Thread(target=late_send)
        t.start()
        try:
            assert reached.wait(60)
            with Producer(store, producer_id="ledger-api") as new:
                acked = new.send_batch("t", [("k", {"n": i}, f"new-{i}") for i in range(3)])
        finally:
            resume.set()
            t.join(120)
    assert len(outcome) == 1, outcome
    late = outcome[0]
    assert not any(r.duplicate for r in acked)
    assert not (isinstance(late, SendResult) and late.duplicate), late
    want = Counter(["before", "new-0", "new-1", "new-2"])
    if backend == "embedded":
        assert isinstance(late, FencedError) and "'ledger-api'" in str(late), late
    else:
        assert isinstance(late, SendResult), late
        want["late"] += 1
    assert ids_in_log(store, "t") == want


def test_threads_sharing_one_producer_store_every_record_once(store: str) -> None:
    threads, per_thread = 8, 30
    start = threading.Barrier(threads)
    results: list[SendResult] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    with Producer(store, producer_id="shared", partitions=2) as p:

        def sender(w: int) -> None:
            try:
                start.wait(30)
                for i in range(per_thread):
                    if i % 5 == 4:
                        items = [
                            (f"k{j}", {"w": w, "i": i, "j": j}, f"{w}-{i}-{j}") for j in (0, 1)
                        ]
                        got = p.send_batch("t", items)
                    else:
                        got = [p.send("t", {"w": w, "i": i}, key=f"k{i % 3}", id=f"{w}-{i}")]
                    with lock:
                        results.extend(got)
            except BaseException as exc:
                errors.append(exc)

        workers = [threading.Thread(target=sender, args=(w,)) for w in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(300)
    assert not errors, errors
    assert [r for r in results if r.duplicate] == []
    want = Counter(
        f"{w}-{i}-{j}" if i % 5 == 4 else f"{w}-{i}"
        for w in range(threads)
        for i in range(per_thread)
        for j in ((0, 1) if i % 5 == 4 else (None,))
    )
    assert ids_in_log(store, "t") == want
    # Each acknowledged offset holds one record: no two sends were told the same place.
    assert len({(r.partition, r.offset) for r in results}) == len(results) == sum(want.values())


def _replica(store: str, name: str, stop: Any, acks: Any) -> None:
    """A process sending under the shared producer id until fenced or told to stop."""
    try:
        with Producer(store, producer_id="payments-api") as p:
            i = 0
            while not stop.is_set():
                r = p.send("t", {"from": name, "i": i}, key=f"k{i % 4}", id=f"{name}-{i}")
                acks.put(("ack", f"{name}-{i}", r.duplicate))
                i += 1
    except FencedError as exc:
        acks.put(("fenced", name, str(exc)))
        return
    acks.put(("stopped", name, ""))


def test_a_restarted_process_and_its_draining_predecessor(store: str, backend: str) -> None:
    """Real processes: a replica keeps sending while a new one with its producer id
    starts and sends. Every acknowledged record is in the log exactly once; on the
    embedded log the old one is told it was fenced."""
    ctx = multiprocessing.get_context("spawn")
    acks: Any = ctx.Queue()
    stop_old, stop_new = ctx.Event(), ctx.Event()
    Producer(store).close()  # the store exists before both replicas open it
    old = ctx.Process(target=_replica, args=(store, "old", stop_old, acks))
    new = ctx.Process(target=_replica, args=(store, "new", stop_new, acks))
    got: list[tuple[str, str, Any]] = []

    def take(until: Callable[[], bool]) -> None:
        while not until():
            try:
                got.append(acks.get(timeout=120))
            except queue.Empty:
                raise AssertionError(f"no progress from the replicas: {got[-5:]}") from None

    def count(name: str) -> int:
        return sum(1 for kind, what, _ in got if kind == "ack" and what.startswith(f"{name}-"))

    old.start()
    try:
        take(lambda: count("old") >= 5)
        new.start()
        take(lambda: count("new") >= 20)
        stop_new.set()
        take(lambda: any(kind != "ack" and what == "new" for kind, what, _ in got))
        stop_old.set()
        take(lambda: any(kind != "ack" and what == "old" for kind, what, _ in got))
    finally:
        stop_old.set()
        stop_new.set()
        for proc in (old, new):
            proc.join(120)
            if proc.is_alive():
                proc.kill()
    acked = [what for kind, what, dup in got if kind == "ack"]
    assert not [what for kind, what, dup in got if kind == "ack" and dup]
    assert ids_in_log(store, "t") == Counter(acked)
    ends = {what: (kind, msg) for kind, what, msg in got if kind != "ack"}
    assert ends["new"][0] == "stopped", ends
    if backend == "embedded":
        assert ends["old"][0] == "fenced", ends
        assert "'payments-api'" in ends["old"][1]
    else:
        assert ends["old"][0] == "stopped", ends


# -- explicit sequences (embedded: Kafka refuses sequences=) --------------------------


def test_explicit_sequences_out_of_order_are_refused(embedded_store: str) -> None:
    store = embedded_store
    with Producer(store, producer_id="orders") as p:
        first = p.send_batch("t", [("k", b"a", "a"), ("k", b"b", "b"), ("k", b"c", "c")])
        assert [r.offset for r in first] == [0, 1, 2]
        # A used sequence for another record: refused, not dropped.
        with pytest.raises(ConfigError, match="sequence 1"):
            p.send("t", b"x", key="k", id="x", sequence=1)
        # The same record again under its sequence: a retry, stored once.
        again = p.send("t", b"b", key="k", id="b", sequence=1)
        assert again.duplicate and again.offset == 1
        # A gap: sequences 3 and 4 were never sent.
        with pytest.raises(ConfigError, match="sequence 5"):
            p.send("t", b"y", key="k", id="y", sequence=5)
        # Not increasing within a batch: all or nothing, nothing written.
        with pytest.raises(ConfigError, match="sequence"):
            p.send_batch("t", [("k", b"d", "d"), ("k", b"e", "e")], sequences=[3, 3])
        nxt = p.send("t", b"d", key="k", id="d", sequence=3)
        assert not nxt.duplicate and nxt.offset == 3
    # A restarted producer re-sends what it does not know was stored: a duplicate.
    with Producer(store, producer_id="orders") as p:
        assert p.send("t", b"d", key="k", id="d", sequence=3).duplicate
        assert not p.send("t", b"e", key="k", id="e").duplicate
    assert ids_in_log(store, "t") == Counter("abcde")


def test_a_send_retried_after_a_lost_commit_answer_is_stored_once(embedded_store: str) -> None:
    """The store numbers records inside the send's transaction; when the answer to a
    COMMIT that did land is lost, the retry must find those records, not add copies."""
    with Producer(embedded_store, producer_id="api", partitions=2) as p:
        client: Any = p._client
        write = client._write
        lost = [True]

        def commit_answer_lost(*args: Any, **kwargs: Any) -> Any:
            out = write(*args, **kwargs)
            if lost:  # the first attempt committed, and then its caller saw an error
                lost.pop()
                raise sqlite3.OperationalError("disk I/O error")
            return out

        client._write = commit_answer_lost
        got = p.send_batch("t", [(f"k{i}", {"i": i}, f"id-{i}") for i in range(6)])
        assert not lost
    assert [r.duplicate for r in got] == [False] * 6
    recs = read_all(embedded_store, "t")
    assert Counter(r.id for r in recs) == Counter(f"id-{i}" for i in range(6))
    assert {(r.partition, r.offset) for r in got} == {(r.partition, r.offset) for r in recs}


def test_a_sequence_too_old_to_verify_is_refused(embedded_store: str) -> None:
    from onceflow._producer import SEQUENCE_WINDOW

    with Producer(embedded_store, producer_id="bulk") as p:
        first = p.send("t", b"0", key="k", id="0")
        assert first.sequence == 0
        p.send_batch("t", [("k", str(i).encode(), str(i)) for i in range(1, SEQUENCE_WINDOW + 2)])
        with pytest.raises(ConfigError, match=r"sequence 0 .* older than"):
            p.send("t", b"0", key="k", id="0", sequence=0)
    assert len(read_all(embedded_store, "t")) == SEQUENCE_WINDOW + 2


def test_a_store_of_the_previous_version_gains_producer_sessions(embedded_store: str) -> None:
    with Producer(embedded_store, producer_id="p") as p:
        p.send("t", b"a", key="k")
    conn = sqlite3.connect(embedded_store)
    conn.execute("DROP TABLE IF EXISTS producer_sessions")
    conn.execute("DROP TABLE IF EXISTS producer_batches")
    conn.commit()
    conn.close()
    with Producer(embedded_store, producer_id="p") as old:
        old.send("t", b"b", key="k")
        with Producer(embedded_store, producer_id="p") as new:
            new.send("t", b"c", key="k")
            with pytest.raises(FencedError):
                old.send("t", b"d", key="k")
    assert [r.value for r in read_all(embedded_store, "t")] == [b"a", b"b", b"c"]

"""What the backend seam (`onceflow._backend`) promises, checked on every backend the
library exports (`BACKENDS`, the `backend` fixture's parameters): a real SQLite file and
the real broker. A new backend is tested by adding it to that list and to `store`."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from onceflow import FencedError, Producer
from onceflow._backend import TP, RebalanceListener, Session, SessionOptions, open_backend
from onceflow._records import Columns

IN, OUT = "in", "out"


class Recorder:
    """A `RebalanceListener` that writes down what it hears. With `floors` it asks to
    resume partitions further on, as a sink that recorded it is done there would."""

    def __init__(self, floors: dict[TP, int] | None = None) -> None:
        self.parts: list[TP] = []
        self.calls: list[str] = []
        self.floors = floors or {}

    def assigned(self, parts: list[TP]) -> dict[TP, int]:
        self.calls.append("assigned")
        self.parts.extend(parts)
        return {tp: off for tp, off in self.floors.items() if tp in parts}

    def revoking(self, parts: list[TP]) -> None:
        self.calls.append("revoking")

    def lost(self, parts: list[TP]) -> None:
        self.calls.append("lost")

    def revoked(self, parts: list[TP]) -> None:
        self.calls.append("revoked")


def open_session(store: str, tmp_path: Path, app: str = "contract") -> Session:
    return open_backend(store).session(
        SessionOptions(
            app=app,
            owner=f"test:{os.getpid()}:{uuid.uuid4().hex[:6]}",
            worker=0,
            state_dir=str(tmp_path / "state"),
            commit_interval=0.1,
            step_topics={},
            topic_partitions=2,
        )
    )


def holding(session: Session, listener: Recorder, parts: int = 2) -> None:
    """Acquire the input and wait until the listener heard of all its partitions: at
    once on the embedded store, after the group's assignment on Kafka (in a poll)."""
    session.ensure_topics({IN: parts, OUT: 1})
    session.acquire([IN], listener)
    deadline = time.monotonic() + 60
    while len(listener.parts) < parts:
        assert time.monotonic() < deadline, f"assigned only {listener.parts}"
        session.poll({(IN, p): 0 for p in range(parts)}, 10)


@pytest.fixture
def held(store: str, tmp_path: Path) -> Iterator[tuple[Session, Recorder]]:
    session = open_session(store, tmp_path)
    listener = Recorder()
    try:
        holding(session, listener)
        yield session, listener
    finally:
        session.close()


def outputs(values: list[bytes]) -> dict[TP, Columns]:
    n = len(values)
    return {(OUT, 0): Columns([None] * n, values, None, [time.time()] * n, [None] * n)}


def commit(session: Session, positions: dict[TP, int], values: tuple[bytes, ...] = ()) -> None:
    txn = session.transaction()
    try:
        txn.check_fence()
        txn.write_outputs(outputs(list(values)))
        txn.write_positions(positions)
        txn.commit()
    except BaseException:
        txn.rollback()
        raise
    session.after_commit()


def committed_values(store: str) -> list[bytes]:
    return [r.value for r in open_backend(store).committed_records(OUT)]


def test_the_listener_hears_of_every_partition_and_its_floors_are_kept(
    store: str, tmp_path: Path
) -> None:
    session = open_session(store, tmp_path)
    listener = Recorder(floors={(IN, 1): 7})
    try:
        holding(session, listener)
        assert set(listener.parts) == {(IN, 0), (IN, 1)}
        assert listener.calls[0] == "assigned"
        if not open_backend(store).several_workers:
            # One process holds every partition: told once, at start.
            assert listener.calls == ["assigned"] and len(listener.parts) == 2
        # Where a sink recorded it is done is where the partition resumes, not below.
        assert session.committed_positions() == {(IN, 0): 0, (IN, 1): 7}
        assert session.rewind() == {(IN, 0): 0, (IN, 1): 7}
        commit(session, {(IN, 0): 2})
        assert session.rewind() == {(IN, 0): 2, (IN, 1): 7}
        heard = list(listener.calls)
    finally:
        session.close()
    assert listener.calls == heard  # closing is not a rebalance the App hears of


def test_a_transaction_commits_all_of_it_or_nothing(
    held: tuple[Session, Recorder], store: str
) -> None:
    session, _ = held
    txn = session.transaction()
    txn.write_outputs(outputs([b"dropped"]))
    txn.write_positions({(IN, 0): 3})
    txn.rollback()
    assert committed_values(store) == []
    assert session.committed_of([(IN, 0)])[(IN, 0)] < 0
    commit(session, {(IN, 0): 3}, (b"a", b"b"))
    assert committed_values(store) == [b"a", b"b"]
    assert session.committed_of([(IN, 0)]) == {(IN, 0): 3}


def test_committed_of_and_rewind_return_the_last_commit(held: tuple[Session, Recorder]) -> None:
    session, _ = held
    commit(session, {(IN, 0): 2})
    commit(session, {(IN, 0): 5, (IN, 1): 9})
    assert session.committed_of([(IN, 0), (IN, 1)]) == {(IN, 0): 5, (IN, 1): 9}
    assert session.rewind() == {(IN, 0): 5, (IN, 1): 9}
    assert session.committed_positions() == {(IN, 0): 5, (IN, 1): 9}
    assert session.outcome_of({(IN, 0): 5, (IN, 1): 9})
    assert not session.outcome_of({(IN, 0): 6})


def test_positions_only_move_forward(held: tuple[Session, Recorder], store: str) -> None:
    session, _ = held
    commit(session, {(IN, 0): 5})
    with pytest.raises(Exception, match="back"):
        commit(session, {(IN, 0): 4}, (b"stale",))
    assert session.committed_of([(IN, 0)]) == {(IN, 0): 5}
    assert committed_values(store) == []


def test_a_fenced_writer_commits_nothing(
    held: tuple[Session, Recorder], store: str, tmp_path: Path
) -> None:
    """A successor takes the partitions over (the same worker slot on Kafka): the old
    holder's next transaction is refused, and nothing of it becomes visible."""
    old, _ = held
    new = open_session(store, tmp_path)
    try:
        holding(new, Recorder())
        with pytest.raises(FencedError):
            commit(old, {(IN, 0): 1}, (b"zombie",))
        assert committed_values(store) == []
        assert new.committed_of([(IN, 0)])[(IN, 0)] < 0
    finally:
        new.close()


def test_idle_once_every_record_was_read(held: tuple[Session, Recorder], store: str) -> None:
    session, _ = held
    with Producer(store, partitions=2) as p:
        p.send_batch(IN, [(f"k{i}", {"i": i}, f"id-{i}") for i in range(6)])
    positions = session.rewind()
    seen: list[tuple[int, int]] = []
    deadline = time.monotonic() + 60
    while True:
        batches = session.poll(positions, 100)
        for b in batches:
            seen.extend(zip(b.parts, b.offs, strict=True))
            for part, off in zip(b.parts, b.offs, strict=True):
                positions[(b.topic, part)] = off + 1
        if not batches and len(seen) == 6 and session.idle():
            break
        assert time.monotonic() < deadline, f"read {seen}, idle {session.idle()}"
    assert len(set(seen)) == 6


if TYPE_CHECKING:
    _listener: RebalanceListener = Recorder()

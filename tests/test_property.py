"""A hypothesis state machine: send, re-send, retry, crash at random steps, restart; after
every step the committed output and state equal the reference fold of the committed input."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import defaultdict
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from onceflow import App, Producer
from onceflow._crash import CRASH_POINTS, CrashInjector, SimulatedCrash
from onceflow._sqlite import SQLiteStore

from .helpers import read_all

KEYS = ["a", "b", "c", "d", "e"]


def build(store: str) -> App:
    app = App("fold", store=store, partitions=2, commit_every=3, max_batch=2)
    (
        app.source("in")
        .dedupe(name="ids", max_keys=10_000)
        .reduce(name="sum", fn=lambda acc, v: acc + v["n"], initial=0)
        .to("sums")
    )
    return app


class ExactlyOnce(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="onceflow-prop-")
        self.store = f"{self.dir}/s.db"
        self.producer = Producer(self.store, producer_id="client", partitions=2)
        self.sent: list[tuple[str, str, int]] = []  # (id, key, n)
        self.last_send: tuple[str, str, int, int, int] | None = None  # id, key, n, part, seq
        self.app = build(self.store)
        self.sessions = 0

    def teardown(self) -> None:
        self.producer.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(key=st.sampled_from(KEYS), n=st.integers(1, 50), count=st.integers(1, 4))
    def send(self, key: str, n: int, count: int) -> None:
        for _ in range(count):
            eid = f"id-{len(self.sent)}"
            r = self.producer.send("in", {"n": n}, key=key, id=eid)
            self.sent.append((eid, key, n))
            self.last_send = (
                eid,
                key,
                n,
                r.partition,
                self.producer.last_sequence("in", r.partition),
            )

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def resend_from_new_session(self, data: st.DataObject) -> None:
        eid, key, n = data.draw(st.sampled_from(self.sent))
        self.sessions += 1
        with Producer(self.store, producer_id=f"session-{self.sessions}") as p:
            p.send("in", {"n": n}, key=key, id=eid)

    @precondition(lambda self: self.last_send is not None)
    @rule()
    def retry_last_send(self) -> None:
        assert self.last_send is not None
        eid, key, n, _, seq = self.last_send
        # The client restarts (a new session of its producer id) and re-sends its last
        # record, not knowing it was stored: the log keeps one copy.
        self.producer.close()
        self.producer = Producer(self.store, producer_id="client", partitions=2)
        assert self.producer.send("in", {"n": n}, key=key, id=eid, sequence=seq).duplicate

    @rule(point=st.sampled_from([None, *CRASH_POINTS[:5]]), nth=st.integers(1, 3))
    def run(self, point: str | None, nth: int) -> None:
        self.app._crash = None if point is None else CrashInjector(f"{point}:{nth}", "raise")
        try:
            self.app.run(until_idle=True)
        except SimulatedCrash:
            pass
        finally:
            self.app._crash = None

    @invariant()
    def committed_effects_equal_the_reference_fold(self) -> None:
        st_ = SQLiteStore(self.store)
        try:
            committed = st_.committed("fold", "in")
            inputs = {p: st_.read_records("in", p, 0, committed.get(p, 0)) for p in (0, 1)}
            with st_.lock:
                state = {
                    (part, key): json.loads(json.dumps(_unpack(v)))
                    for part, key, v in st_.conn.execute(
                        "SELECT part, key, value FROM state WHERE app='fold' AND step='sum'"
                    )
                }
        finally:
            st_.close()
        expected: dict[str, list[int]] = defaultdict(list)
        sums: dict[tuple[int, str], int] = {}
        for part, recs in inputs.items():
            seen: set[str | None] = set()
            for rec in recs:
                if rec.id in seen:
                    continue
                seen.add(rec.id)
                key = rec.key or ""
                sums[(part, key)] = sums.get((part, key), 0) + json.loads(rec.value)["n"]
                expected[key].append(sums[(part, key)])
        actual: dict[str, list[int]] = defaultdict(list)
        for rec in read_all(self.store, "sums") if _exists(self.store, "sums") else []:
            actual[rec.key or ""].append(json.loads(rec.value))
        assert dict(actual) == dict(expected)
        assert state == sums


def _unpack(raw: bytes) -> Any:
    import msgspec

    return msgspec.msgpack.decode(raw)


def _exists(store: str, topic: str) -> bool:
    st_ = SQLiteStore(store)
    try:
        return st_.topic(topic) is not None
    finally:
        st_.close()


ExactlyOnce.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestExactlyOnceStateMachine = ExactlyOnce.TestCase

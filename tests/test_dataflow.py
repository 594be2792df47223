"""The dataflow API: steps, state, dedupe, dead letters, build-time and start-time checks."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from onceflow import (
    App,
    CallbackSink,
    ConfigError,
    Producer,
    SinkGuaranteeError,
    State,
    TopologyError,
    UserFunctionError,
)

from .helpers import read_all, values

Factory = Callable[..., App]


def produce(
    store: str,
    topic: str,
    items: list[Any],
    *,
    key: Callable[[Any], str] | None = None,
    ids: bool = False,
    partitions: int = 1,
) -> None:
    with Producer(store, partitions=partitions) as p:
        p.send_batch(
            topic,
            [(key(v) if key else None, v, f"id-{i}" if ids else None) for i, v in enumerate(items)],
        )


def test_stateless_steps(store: str, app_factory: Factory) -> None:
    produce(store, "in", list(range(10)))
    app = app_factory()
    s = app.source("in")
    s.map(lambda v: v * 10).filter(lambda v: v % 20 == 0).to("evens")
    s.flat_map(lambda v: [v] * (v % 3)).to("repeated")
    stats = app.run(until_idle=True)
    assert values(store, "evens") == [0, 20, 40, 60, 80]
    assert values(store, "repeated") == [1, 2, 2, 4, 5, 5, 7, 8, 8]
    assert stats.records_in == 10 and stats.records_out == 14


def test_key_by_sets_partitioning_key(store: str, app_factory: Factory) -> None:
    produce(store, "in", [{"acct": "a", "n": 1}, {"acct": "b", "n": 2}, {"acct": 7, "n": 3}])
    app = app_factory(partitions=4)
    app.source("in").key_by(lambda v: v["acct"]).to("by-acct")
    app.run(until_idle=True)
    assert sorted(r.key or "" for r in read_all(store, "by-acct")) == ["7", "a", "b"]


def test_reduce_and_aggregate_keep_per_key_state(store: str, app_factory: Factory) -> None:
    produce(
        store,
        "in",
        [{"k": k, "n": n} for k, n in [("a", 1), ("b", 2), ("a", 3)]],
        key=lambda v: v["k"],
    )
    app = app_factory()
    s = app.source("in")
    s.map(lambda v: v["n"]).reduce(name="sum", fn=lambda acc, v: acc + v).to("sums")
    s.aggregate(name="seen", initial=list, fn=lambda acc, v: [*acc, v["n"]]).to("lists")
    app.run(until_idle=True)
    assert values(store, "sums") == [1, 2, 4]
    assert values(store, "lists") == [[1], [2], [1, 3]]
    # A restart continues from the committed state.
    produce(store, "in", [{"k": "a", "n": 10}], key=lambda v: v["k"])
    app.run(until_idle=True)
    assert values(store, "sums")[-1] == 14
    assert values(store, "lists")[-1] == [1, 3, 10]


def counter(value: Any, state: State) -> list[Any]:
    state.value = (state.value or 0) + 1
    if value.get("reset"):
        state.delete()
        return []
    return [{"key": state.key, "count": state.value}]


def test_process_reads_writes_deletes_state(store: str, app_factory: Factory) -> None:
    produce(
        store,
        "in",
        [{"k": "x"}, {"k": "x"}, {"k": "x", "reset": True}, {"k": "x"}],
        key=lambda v: v["k"],
    )
    app = app_factory()
    app.source("in").process(name="count", fn=counter).to("counts")
    app.run(until_idle=True)
    assert [v["count"] for v in values(store, "counts")] == [1, 2, 1]


def test_state_larger_than_the_cache(store: str, app_factory: Factory) -> None:
    """Only a few keys fit the cache: the rest live on disk and are read back."""
    n_keys = 500
    items = [{"k": f"k{i % n_keys}", "n": 1} for i in range(3 * n_keys)]
    produce(store, "in", items, key=lambda v: v["k"])
    app = app_factory(state_cache_keys=10, max_batch=100, commit_every=100)
    app.source("in").reduce(name="c", fn=lambda a, v: a + v["n"], initial=0).to("out")
    app.run(until_idle=True)
    finals: dict[str, int] = {}
    for r in read_all(store, "out"):
        finals[r.key or ""] = json.loads(r.value)
    assert set(finals.values()) == {3} and len(finals) == n_keys


def test_stateful_step_after_key_by_is_refused(app_factory: Factory) -> None:
    app = app_factory()
    app.source("in").key_by(lambda v: v["a"]).reduce(name="r", fn=lambda a, v: a)
    with pytest.raises(TopologyError, match=r"'r' follows key_by\(\).*through"):
        app.build()


def test_through_repartitions_for_stateful_steps(store: str, app_factory: Factory) -> None:
    produce(store, "in", [{"acct": f"a{i % 3}", "n": i} for i in range(9)], partitions=3)
    app = app_factory(partitions=3)
    (
        app.source("in")
        .key_by(lambda v: v["acct"])
        .through("by-acct")
        .reduce(name="sum", fn=lambda a, v: a + v["n"], initial=0)
        .to("sums")
    )
    app.run(until_idle=True)
    last: dict[str, int] = {}
    for r in read_all(store, "sums"):
        last[r.key or ""] = json.loads(r.value)
    assert last == {"a0": 9, "a1": 12, "a2": 15}


def test_stateful_steps_need_names(app_factory: Factory) -> None:
    s = App("x", store="unused.db").source("in")
    with pytest.raises(ConfigError, match="needs name="):
        s.reduce(name="", fn=lambda a, v: a)
    with pytest.raises(ConfigError, match="invalid"):
        s.process(name="bad name!", fn=counter)
    app = app_factory()
    src = app.source("in")
    src.reduce(name="same", fn=lambda a, v: a)
    src.process(name="same", fn=counter)
    with pytest.raises(TopologyError, match="'same'"):
        app.build()


def test_dedupe_needs_a_retention() -> None:
    with pytest.raises(ConfigError, match="needs a retention"):
        App("x", store="unused.db").source("in").dedupe(name="d")


def test_dedupe_by_record_id_and_by_key_function(store: str, app_factory: Factory) -> None:
    with Producer(store) as p:
        p.send_batch(
            "in", [(None, {"pid": "A"}, "A"), (None, {"pid": "B"}, "B"), (None, {"pid": "A"}, "A")]
        )
    with Producer(store, producer_id="other-session") as p:
        p.send("in", {"pid": "B"}, id="B")
    app = app_factory()
    s = app.source("in")
    s.dedupe(name="by-id", ttl=60).to("once-by-id")
    s.dedupe(name="by-field", key=lambda v: v["pid"], max_keys=100).to("once-by-field")
    stats = app.run(until_idle=True)
    assert values(store, "once-by-id") == [{"pid": "A"}, {"pid": "B"}]
    assert values(store, "once-by-field") == [{"pid": "A"}, {"pid": "B"}]
    assert stats.duplicates == 4


def test_dedupe_replays_the_first_outcome(store: str, app_factory: Factory) -> None:
    with Producer(store) as p:
        p.send_batch("in", [(None, {"pid": "A", "n": 5}, "A"), (None, {"pid": "A", "n": 99}, "A")])
    app = app_factory()
    (
        app.source("in")
        .dedupe(name="pay", ttl=60, replay_to="answers")
        .map(lambda v: {"pid": v["pid"], "charged": v["n"]})
        .to("answers")
    )
    app.run(until_idle=True)
    # A later retry, after the first outcome was committed, gets the same answer.
    with Producer(store, producer_id="retry") as p:
        p.send("in", {"pid": "A", "n": 123}, id="A")
    app.run(until_idle=True)
    recs = read_all(store, "answers")
    assert [json.loads(r.value) for r in recs] == [{"pid": "A", "charged": 5}] * 3
    assert [bool(r.headers and r.headers.get("onceflow-replay")) for r in recs] == [
        False,
        True,
        True,
    ]


def test_dedupe_ttl_forgets_old_ids(store: str, app_factory: Factory) -> None:
    with Producer(store) as p:
        p.send("in", {"x": 1}, id="A")
    app = app_factory()
    app.source("in").dedupe(name="d", ttl=0.2).to("out")
    app.run(until_idle=True)
    import time

    time.sleep(0.3)
    with Producer(store, producer_id="later") as p:
        p.send("in", {"x": 1}, id="A")
    app.run(until_idle=True)
    assert len(read_all(store, "out")) == 2


def test_dedupe_max_keys_keeps_the_newest(embedded_store: str) -> None:
    from onceflow._sqlite import SQLiteStore

    store = embedded_store
    app = App("app", store=store, commit_every=1, max_batch=1)
    app.source("in").dedupe(name="d", max_keys=5).to("out")
    with Producer(store) as p:
        p.send_batch("in", [(None, i, f"id-{i}") for i in range(60)])
    app.run(until_idle=True)
    st = SQLiteStore(store)
    (held,) = st.conn.execute("SELECT COUNT(*) FROM dedup WHERE step='d'").fetchone()
    st.close()
    assert 5 <= held < 60


def test_undecodable_and_invalid_values_become_dead_letters(
    store: str, app_factory: Factory
) -> None:
    class Payment(msgspec.Struct):
        id: str
        amount: int

    with Producer(store) as p:
        p.send("in", {"id": "a", "amount": 1})
        p.send("in", b"\xff not json", key="k")
        p.send("in", {"id": "b"})
        p.send("in", {"id": "c", "amount": 3})
    app = app_factory()
    app.source("in", schema=Payment).map(lambda p: p.amount).to("amounts")
    stats = app.run(until_idle=True)
    assert values(store, "amounts") == [1, 3]
    dead = read_all(store, "app.dead-letters")
    assert [d.value for d in dead] == [b"\xff not json", b'{"id":"b"}']
    assert dead[0].headers is not None
    assert dead[0].headers["onceflow-source-offset"] == "1"
    assert "malformed" in dead[0].headers["onceflow-error"]
    assert "amount" in (dead[1].headers or {})["onceflow-error"]
    assert stats.dead_letters == 2


def test_user_function_errors_become_dead_letters(store: str, app_factory: Factory) -> None:
    produce(store, "in", [1, 0, 2, [1]])
    app = app_factory()
    app.source("in").map(lambda v: 10 // v).reduce(name="r", fn=lambda a, v: a + v).to("out")
    app.run(until_idle=True)
    assert values(store, "out") == [10, 15]
    dead = read_all(store, "app.dead-letters")
    assert [d.value for d in dead] == [b"0", b"[1]"]
    assert "ZeroDivisionError" in (dead[0].headers or {})["onceflow-error"]


def test_failed_process_call_leaves_no_trace_in_state(store: str, app_factory: Factory) -> None:
    def fragile(value: Any, state: State) -> list[Any]:
        acc = state.get({"items": []})
        acc["items"].append(value["n"])  # mutated in place, before the failure
        state.value = acc
        if value["n"] < 0:
            raise ValueError("negative")
        return [list(acc["items"])]

    produce(store, "in", [{"n": 1}, {"n": -1}, {"n": 2}], key=lambda v: "k")
    app = app_factory()
    app.source("in").process(name="p", fn=fragile).to("out")
    app.run(until_idle=True)
    assert values(store, "out") == [[1], [1, 2]]


def test_process_returning_a_dict_is_a_clear_dead_letter(store: str, app_factory: Factory) -> None:
    produce(store, "in", [1], key=lambda v: "k")
    app = app_factory()
    app.source("in").process(name="p", fn=lambda v, s: {"oops": v}).to("out")
    app.run(until_idle=True)
    (dead,) = read_all(store, "app.dead-letters")
    assert "return a list" in (dead.headers or {})["onceflow-error"]


def test_on_error_stop_commits_nothing_of_the_epoch(store: str, app_factory: Factory) -> None:
    produce(store, "in", [1, 2, 0, 3])
    app = app_factory(on_error="stop")
    app.source("in").map(lambda v: 6 // v).to("out")
    with pytest.raises(UserFunctionError, match=r"in\[0\]@2"):
        app.run(until_idle=True)
    assert read_all(store, "out") == []


def test_exactly_once_app_refuses_at_least_once_sink(app_factory: Factory) -> None:
    app = app_factory()
    app.source("in").sink(CallbackSink(print, name="printer"))
    with pytest.raises(SinkGuaranteeError, match=r"'printer'.*at-least-once.*Operator action"):
        app.build()
    ok = app_factory(guarantee="at-least-once")
    ok.source("in").sink(CallbackSink(print))
    ok.build()


def test_changed_topology_is_refused_naming_the_step(store: str, app_factory: Factory) -> None:
    produce(store, "in", [1], key=lambda v: "k")
    first = app_factory("shop")
    first.source("in").reduce(name="totals", fn=lambda a, v: a + v).to("out")
    first.run(until_idle=True)
    changed = app_factory("shop")
    changed.source("in").reduce(name="sums", fn=lambda a, v: a + v).to("out")
    with pytest.raises(TopologyError, match=r"'totals'.*gone.*Operator action"):
        changed.run(until_idle=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"commit_interval": 0}, "commit_interval"),
        ({"partitions": 0}, "at least 1"),
        ({"guarantee": "maybe"}, "guarantee"),
        ({"on_error": "ignore"}, "on_error"),
        ({"dead_letter_topic": "bad topic"}, "invalid topic name"),
    ],
)
def test_invalid_configuration_fails_at_start(
    app_factory: Factory, kwargs: Any, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        app_factory(**kwargs)


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("ONCEFLOW_COMMIT_INTERVAL", "0.5")
    monkeypatch.setenv("ONCEFLOW_STORE", str(tmp_path / "env.db"))
    app = App("e")
    assert app.commit_interval == 0.5 and app.store.endswith("env.db")
    monkeypatch.setenv("ONCEFLOW_PARTITIONS", "many")
    with pytest.raises(ConfigError, match="ONCEFLOW_PARTITIONS"):
        App("e")


def test_app_without_source_is_refused(app_factory: Factory) -> None:
    with pytest.raises(ConfigError, match="no source"):
        app_factory().build()

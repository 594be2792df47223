"""Pipelines the crash tests run, in-process and as killable child processes.

Module-level factories, so that a child process can load them as
`tests.pipelines:NAME` (the worker sets the store).
"""

from __future__ import annotations

import os
from typing import Any

from onceflow import App, FileSink, SQLiteTableSink, State

# Small epochs make every run cross many commits, so crashes land between them.
SMALL = {"commit_every": 7, "max_batch": 5, "commit_interval": 0.02}


def running_sum() -> App:
    """One stage, keyed state: per-key output order is deterministic."""
    app = App("sums", partitions=3, **SMALL)  # type: ignore[arg-type]
    app.source("amounts").reduce(name="total", fn=lambda a, v: a + v["n"], initial=0).to("totals")
    return app


def _apply(v: dict[str, Any], st: State) -> list[dict[str, Any]]:
    bal = st.get(100)
    ok = bal >= v["n"]
    if ok:
        st.value = bal - v["n"]
    return [{"id": v["id"], "ok": ok, "bal": st.get(100)}]


def payments(partitions: int = 2) -> App:
    """Dedupe with replayed answers, a keyed process, and a second stage via a topic."""
    app = App("payments", partitions=partitions, **SMALL)  # type: ignore[arg-type]
    once = app.source("payments").dedupe(name="ids", ttl=3600, replay_to="answers")
    once.process(name="debits", fn=_apply).to("answers")
    (
        once.key_by(lambda v: v["to"])
        .through("credits")
        .reduce(name="credits", fn=lambda a, v: a + v["n"], initial=0)
        .to("credit-totals")
    )
    return app


def with_sinks() -> App:
    """A SQLite table sink and a file sink beside an output topic."""
    app = App("sinks", partitions=2, **SMALL)  # type: ignore[arg-type]
    totals = app.source("amounts").reduce(name="total", fn=lambda a, v: a + v["n"], initial=0)
    totals.to("totals")
    totals.map(lambda t: {"k": "sum-" + str(t), "v": t}).sink(
        SQLiteTableSink("seen_totals", key=["k"], columns=["k", "v"])
    )
    path = os.environ.get("ONCEFLOW_TEST_FILE", "sink-output.jsonl")
    totals.sink(FileSink(path))
    return app


running_sum_app = running_sum()
payments_app = payments()
# One partition of each topic per worker, for the Kafka tests that run three workers.
payments3_app = payments(3)
with_sinks_app = with_sinks()


def nondeterministic() -> App:
    """Broken on purpose: its output depends on the run, so the chaos audit must fail."""
    import random

    app = App("broken", **SMALL)  # type: ignore[arg-type]
    app.source("events").map(lambda v: {**v, "noise": random.random()}).to("out")
    return app


nondeterministic_app = nondeterministic()


def _ledger_rows(cur: object, rows: list[tuple[object, object, tuple[str, int, int, int]]]) -> None:
    """A user function running SQL inside the sink's transaction."""
    for _, value, row_id in rows:
        cur.execute(  # type: ignore[attr-defined]
            "INSERT INTO ledger(row_id, account, amount) VALUES (%s, %s, %s)",
            ("/".join(map(str, row_id)), value["k"], value["n"]),
        )


def to_postgres() -> App:
    """Totals upserted into PostgreSQL and every input appended to a ledger, beside a topic."""
    from onceflow import PostgresSink

    app = App("pg", partitions=2, **SMALL)  # type: ignore[arg-type]
    src = app.source("amounts")
    totals = src.reduce(name="total", fn=lambda a, v: a + v["n"], initial=0)
    totals.to("totals")
    src.map(lambda v: {"k": v.get("k", ""), "n": v["n"]}).sink(
        PostgresSink(fn=_ledger_rows, name="ledger")
    )
    src.key_by(lambda v: v.get("k", "")).map(lambda v: v).sink(
        PostgresSink(table="seen", key=["k"], columns=["k", "n"], name="seen")
    )
    return app


to_postgres_app = to_postgres()


def charges() -> App:
    """Each payment becomes one HTTP charge through the effect journal."""
    from onceflow import HttpEffectSink

    url = os.environ.get("ONCEFLOW_TEST_HTTP", "http://127.0.0.1:9/charges")
    app = App("charges", partitions=2, **SMALL)  # type: ignore[arg-type]
    app.source("payments").sink(HttpEffectSink(url, name="charges", retries=2, backoff=0.01))
    return app


charges_app = charges()


def _insert_ids(cur: object, rows: list[tuple[object, object, tuple[str, int, int, int]]]) -> None:
    """Plain INSERTs into a table with no unique key: a replayed row would show twice."""
    for _, value, _ in rows:
        cur.execute(  # type: ignore[attr-defined]
            "INSERT INTO inputs(id, k, n) VALUES (%s, %s, %s)",
            (value["id"], value["k"], value["n"]),
        )


def ids_to_postgres() -> App:
    """Every input's id into PostgreSQL, beside a keyed total in a topic (Kafka tests)."""
    from onceflow import PostgresSink

    app = App("pgids", partitions=4, **SMALL)  # type: ignore[arg-type]
    src = app.source("amounts")
    src.reduce(name="total", fn=lambda a, v: a + v["n"], initial=0).to("totals")
    src.sink(PostgresSink(fn=_insert_ids, name="inputs"))
    return app


ids_to_postgres_app = ids_to_postgres()


def counts() -> App:
    """Keyed counts over four partitions, many small epochs, long transactions: the
    transaction timeout (20 commit intervals, 40 s) outlasts a paused worker's group
    session (10 s), so its open transaction can still commit after its partitions moved
    (the Kafka zombie tests)."""
    app = App("counts", partitions=4, commit_every=20, max_batch=20, commit_interval=2.0)
    app.source("events").reduce(name="count", fn=lambda a, v: a + 1, initial=0).to("counts")
    return app


counts_app = counts()

"""The PostgreSQL pipeline of tests/pipelines.py with the module hooks `onceflow chaos`
looks for: its events, and the tables it needs in each scratch database."""

from __future__ import annotations

import random
from typing import Any

from onceflow.testing import Event

from .pipelines import to_postgres

app = to_postgres()


def chaos_events(n: int, seed: int) -> list[Event]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = f"k{rng.randrange(20)}"
        out.append(Event("amounts", {"k": k, "n": rng.randint(1, 9)}, key=k, id=f"e{i}"))
    return out


def chaos_postgres_setup(conn: Any) -> None:
    conn.execute("CREATE TABLE ledger(row_id text PRIMARY KEY, account text, amount int)")
    conn.execute("CREATE TABLE seen(k text PRIMARY KEY, n int)")


def chaos_audit(store: str, postgres: str | None = None) -> list[tuple[str, bool, str]]:
    """A business invariant of the ledger, read from PostgreSQL: no amount is lost."""
    import psycopg

    assert postgres is not None
    with psycopg.connect(postgres) as conn:
        (total,) = conn.execute("SELECT coalesce(sum(amount), 0) FROM ledger").fetchone() or (0,)
    return [("ledger sum is positive (hook got the database)", int(total) > 0, str(total))]

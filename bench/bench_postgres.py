"""Rows/s into PostgreSQL: onceflow's transactional PostgresSink (two-phase commit with
the store, offsets and fencing in PostgreSQL) against a plain at-least-once batched
INSERT loop over the same rows, in one run, on a throwaway local PostgreSQL server.

    .venv/bin/python bench/bench_postgres.py [--rows 200000] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402
from infra.postgres import PostgresServer  # noqa: E402

from onceflow import App, PostgresSink, Producer  # noqa: E402


def rows(n: int) -> list[dict[str, object]]:
    return [
        {"entry_id": f"e{i}", "account": f"acct-{i % 1000}", "amount": i % 997} for i in range(n)
    ]


def reset_table(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS ledger")
        c.execute("CREATE TABLE ledger(entry_id text PRIMARY KEY, account text, amount int)")
        c.execute("DROP TABLE IF EXISTS onceflow_sink_offsets")
        c.execute("DROP TABLE IF EXISTS onceflow_sink_epochs")


def plain_loop(url: str, data: list[dict[str, object]], batch: int = 5000) -> float:
    """The baseline: INSERT in batches, commit each; a crash between batches repeats or
    loses work (at-least-once at best, with no offsets recorded)."""
    t0 = time.perf_counter()
    with psycopg.connect(url) as c:
        for i in range(0, len(data), batch):
            with c.cursor() as cur:
                cur.executemany(
                    "INSERT INTO ledger(entry_id, account, amount) VALUES (%s, %s, %s)",
                    [(r["entry_id"], r["account"], r["amount"]) for r in data[i : i + batch]],
                )
            c.commit()
    return time.perf_counter() - t0


def onceflow_run(url: str, data: list[dict[str, object]], workdir: Path, run: int) -> float:
    store = str(workdir / f"store-{run}.db")
    with Producer(store, producer_id="bench") as p:
        for i in range(0, len(data), 10_000):
            p.send_batch("entries", [(str(r["account"]), r, None) for r in data[i : i + 10_000]])
    app = App("pg-bench", store=store, commit_interval=0.1)
    app.source("entries").sink(
        PostgresSink(
            url, table="ledger", key=["entry_id"], columns=["entry_id", "account", "amount"]
        )
    )
    t0 = time.perf_counter()
    app.run(until_idle=True)
    return time.perf_counter() - t0


def count(url: str) -> int:
    with psycopg.connect(url) as c:
        return int(c.execute("SELECT COUNT(*) FROM ledger").fetchone()[0])  # type: ignore[index]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    data = rows(args.rows)
    eo: list[float] = []
    base: list[float] = []
    with tempfile.TemporaryDirectory(prefix="onceflow-bench-pg-") as tmp:
        server = PostgresServer(Path(tmp) / "pg")
        server.start()
        try:
            url = server.create_database("bench")
            for run in range(args.runs):
                reset_table(url)
                secs = plain_loop(url, data)
                assert count(url) == args.rows
                base.append(args.rows / secs)
                reset_table(url)
                secs = onceflow_run(url, data, Path(tmp), run)
                if count(url) != args.rows:
                    print(f"error: {count(url)} rows in PostgreSQL, expected {args.rows}")
                    return 1
                eo.append(args.rows / secs)
                print(
                    f"run {run + 1}: plain {base[-1]:,.0f} rows/s, onceflow {eo[-1]:,.0f} rows/s",
                    file=sys.stderr,
                )
        finally:
            server.close()
    m_eo, m_base = statistics.median(eo), statistics.median(base)
    print(f"rows: {args.rows:,}, median of {args.runs} runs")
    print(f"plain batched INSERT loop (at-least-once): {m_base:>10,.0f} rows/s")
    print(f"onceflow PostgresSink (exactly-once, 2PC):  {m_eo:>10,.0f} rows/s")
    print(f"ratio onceflow / plain: {m_eo / m_base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

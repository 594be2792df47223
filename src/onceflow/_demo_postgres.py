"""`onceflow demo --sink postgresql://...`: the ledger and the balances in PostgreSQL.

Each run creates a database of its own, `onceflow_demo_<tag>`, on the server the URL
names (the URL's own database is only used to connect), with two tables:

    ledger(payment, side, account, amount, total)   primary key (payment, side)
    balances(account, side, total)                   primary key (account, side)

The pipeline writes every ledger entry, of both stages, through one `PostgresSink` in
fn mode: per epoch, one PostgreSQL transaction inserts the entries and adds each entry's
amount to its account's side in `balances`. So `balances` is PostgreSQL's own fold of
what it received, not a copy of the pipeline's running totals, and an epoch applied
twice or lost would show as a balance that differs from the ledger and the state. The
ledger is a plain insert, never an upsert: a replayed entry fails on the primary key
instead of being absorbed.

The child process finds the run's database in ONCEFLOW_DEMO_SINK (`DEMO_SINK_ENV`),
which the supervisor sets; `_demo.app` reads it when the module loads.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ._chaos_postgres import _connect, with_dbname
from ._errors import ConfigError
from ._postgres_sink import PostgresSink, _psycopg, app_gid_prefix, redact

if TYPE_CHECKING:
    from ._demo import Entry, Transfer
    from ._sinks import Row

DEMO_SINK_ENV = "ONCEFLOW_DEMO_SINK"
SINK_NAME = "demo-ledger"
DB_PREFIX = "onceflow_demo_"
SCHEMA = (
    "CREATE TABLE ledger("
    " payment text NOT NULL, side text NOT NULL CHECK (side IN ('debit', 'credit')),"
    " account text NOT NULL, amount bigint NOT NULL, total bigint NOT NULL,"
    " PRIMARY KEY (payment, side))",
    "CREATE TABLE balances("
    " account text NOT NULL, side text NOT NULL CHECK (side IN ('debit', 'credit')),"
    " total bigint NOT NULL, PRIMARY KEY (account, side))",
)
Check = tuple[str, bool, str]
Side = tuple[str, str]  # (account, "debit" | "credit")
# (payment, side) -> (account, amount, total): the primary key makes it one row each.
LedgerRows = dict[tuple[str, str], tuple[str, int, int]]


# -- the run's database -----------------------------------------------------------------


def create_run_database(server: str) -> str:
    """Create `onceflow_demo_<tag>` with the demo's tables on `server`; its URL.

    A database per run, rather than tables in the one the URL names: the demo never
    writes into, or wipes, a database it did not create."""
    parts = urlsplit(server)
    if parts.scheme not in ("postgresql", "postgres") or not parts.netloc:
        raise ConfigError(
            f"--sink needs a URL such as postgresql://user@127.0.0.1:5432/postgres, "
            f"not {redact(server)!r}"
        )
    pg = _psycopg()
    name = f"{DB_PREFIX}{uuid.uuid4().hex[:8]}"
    with _connect(server) as admin:
        _check_prepared_allowed(admin)
        try:
            admin.execute(pg.sql.SQL("CREATE DATABASE {}").format(pg.sql.Identifier(name)))
        except pg.errors.InsufficientPrivilege as exc:
            raise ConfigError(
                f"user of {redact(server)} may not create databases ({exc}). Operator "
                "action: grant it CREATEDB, or pass a user that has it"
            ) from None
        admin.execute(
            pg.sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                pg.sql.Identifier(name), pg.sql.Literal("made by `onceflow demo --sink`")
            )
        )
    url = with_dbname(server, name)
    with _connect(url) as conn:
        for stmt in SCHEMA:
            conn.execute(stmt)
    return url


def _check_prepared_allowed(admin: Any) -> None:
    # Checked before the database exists: otherwise every incarnation of the pipeline
    # would die on it at its first commit, and the run would leave a database behind.
    (maxp,) = admin.execute("SHOW max_prepared_transactions").fetchone()
    if int(maxp) <= 0:
        raise ConfigError(
            "PostgreSQL has max_prepared_transactions = 0, so the demo's PostgresSink "
            "cannot prepare transactions. Operator action: set it to at least 10 in "
            "postgresql.conf and restart the server"
        )


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


# -- the sink ---------------------------------------------------------------------------


def ledger_sink(url: str, opening: int) -> PostgresSink:
    """The PostgresSink both stages hand their ledger entries to."""
    return PostgresSink(url, fn=_writer(opening), name=SINK_NAME)


def _writer(opening: int) -> Callable[[Any, Sequence[Row]], None]:
    def write_ledger(cur: Any, rows: Sequence[Row]) -> None:
        entries: list[Entry] = [v for _, v, _ in rows]
        if not entries:
            return
        with cur.copy("COPY ledger (payment, side, account, amount, total) FROM STDIN") as cp:
            for e in entries:
                cp.write_row((e.payment, e.side, e.account, e.amount, e.total))
        deltas: dict[Side, int] = defaultdict(int)
        for e in entries:
            deltas[(e.account, e.side)] += -e.amount if e.side == "debit" else e.amount
        # In key order: two workers on Kafka never take the same rows' locks crosswise.
        cur.executemany(
            "INSERT INTO balances (account, side, total) VALUES (%s, %s, %s) "
            "ON CONFLICT (account, side) DO UPDATE SET total = balances.total + %s",
            [
                (account, side, _start(side, opening) + d, d)
                for (account, side), d in sorted(deltas.items())
            ],
        )

    return write_ledger


def _start(side: str, opening: int) -> int:
    """A side's total before any entry: the opening balance is spendable funds."""
    return opening if side == "debit" else 0


# -- the audit --------------------------------------------------------------------------


@dataclass
class Expected:
    """What the rest of the audit established from the log and the store, for the
    PostgreSQL tables to be held against."""

    first: dict[str, Transfer]
    accepted: set[str]
    topic_ledger: dict[tuple[str, str], Entry]
    spend: dict[str, int]
    received: dict[str, int]
    opening: int
    accounts: int
    app: str


@dataclass
class _Tables:
    ledger: LedgerRows
    balances: dict[Side, int]
    prepared: list[str]


def audit(url: str, want: Expected) -> tuple[list[Check], dict[str, int]]:
    """The PostgreSQL checks of a finished run, and the figures behind them."""
    from ._errors import StoreError

    try:
        got = _read(url, want.app)
    except StoreError as exc:
        return [("PostgreSQL database readable", False, str(exc))], {}
    checks = [
        _check_entries(got, want),
        _check_running_totals(got, want.opening),
        _check_balances(got, want),
    ]
    money = _check_money(got, want)
    checks.append(money[0])
    checks.append(
        (
            "no prepared transaction of the app left in PostgreSQL",
            not got.prepared,
            ", ".join(got.prepared[:3]) or "none in pg_prepared_xacts",
        )
    )
    figures = {"pg_ledger": len(got.ledger), "pg_balances": len(got.balances), "pg_money": money[1]}
    return checks, figures


def _read(url: str, app: str) -> _Tables:
    with _connect(url) as conn:
        ledger = {
            (p, s): (a, int(n), int(t))
            for p, s, a, n, t in conn.execute(
                "SELECT payment, side, account, amount, total FROM ledger"
            )
        }
        balances = {(a, s): int(t) for a, s, t in conn.execute("SELECT * FROM balances")}
        prepared = _prepared(conn, app)
    return _Tables(ledger, balances, prepared)


def _prepared(conn: Any, app: str) -> list[str]:
    return [
        r[0]
        for r in conn.execute(
            "SELECT gid FROM pg_prepared_xacts "
            "WHERE database = current_database() AND left(gid, %s) = %s ORDER BY 1",
            (len(app_gid_prefix(app)), app_gid_prefix(app)),
        )
    ]


def settled(url: str, app: str) -> bool:
    """Whether no transaction of the app is left prepared in the run's database.

    On Kafka a worker killed between the Kafka commit and COMMIT PREPARED leaves its
    transaction prepared until the worker that gets its partitions next settles it, so
    committed offsets alone do not say that the run is over."""
    from ._errors import StoreError

    try:
        with _connect(url) as conn:
            return not _prepared(conn, app)
    except StoreError:
        return False


def _check(name: str, detail: str, *problems: tuple[str, list[Any]]) -> Check:
    for what, items in problems:
        if items:
            shown = ", ".join(str(x) for x in items[:3])
            detail += f"; {what}: {len(items):,} ({shown})"
    return (name, not any(items for _, items in problems), detail)


def _check_entries(got: _Tables, want: Expected) -> Check:
    sides: dict[str, set[str]] = defaultdict(set)
    misfiled: list[str] = []
    for (payment, side), (account, amount, _) in got.ledger.items():
        sides[payment].add(side)
        sent = want.first.get(payment)
        owner = None if sent is None else sent.payer if side == "debit" else sent.payee
        if sent is None or (account, amount) != (owner, sent.amount):
            misfiled.append(f"{payment} {side}")
    both = {"debit", "credit"}
    miscounted = [
        p
        for p in want.accepted | sides.keys()
        if sides.get(p, set()) != (both if p in want.accepted else set())
    ]
    differ = [
        f"{p} {s}"
        for (p, s), row in got.ledger.items()
        if (e := want.topic_ledger.get((p, s))) is None or row != (e.account, e.amount, e.total)
    ]
    return _check(
        "PostgreSQL ledger: one debit and one credit row per accepted payment, none otherwise",
        f"{len(got.ledger):,} rows for {len(want.accepted):,} accepted payments",
        ("wrong rows for the payment", sorted(miscounted)),
        ("wrong account or amount", misfiled),
        ("differs from the ledger topic", differ),
    )


def _chains(
    ledger: dict[tuple[str, str], tuple[str, int, int]],
) -> dict[Side, list[tuple[int, int]]]:
    """Each account side's (amount, total) rows in the order they were written.

    Amounts are positive, so spendable funds only fall and funds received only rise:
    the totals alone give the order, and PostgreSQL needs no sequence column."""
    out: dict[Side, list[tuple[int, int]]] = defaultdict(list)
    for (_, side), (account, amount, total) in ledger.items():
        out[(account, side)].append((amount, total))
    for (_, side), rows in out.items():
        rows.sort(key=lambda r: r[1], reverse=side == "debit")
    return out


def _check_running_totals(got: _Tables, opening: int) -> Check:
    broken: list[str] = []
    negative: list[str] = []
    for (account, side), rows in _chains(got.ledger).items():
        now = _start(side, opening)
        for amount, total in rows:
            now += -amount if side == "debit" else amount
            if now != total:
                broken.append(f"{account} {side}: {total} != {now}")
                break
        if rows and min(t for _, t in rows) < 0:
            negative.append(account)
    return _check(
        "PostgreSQL ledger: each running total follows from the one before",
        f"{len(got.ledger):,} rows",
        ("running total broken", broken),
        ("negative running total", negative),
    )


def _fold(ledger: LedgerRows, opening: int) -> dict[Side, int]:
    out: dict[Side, int] = {}
    for (_, side), (account, amount, _) in ledger.items():
        k = (account, side)
        out[k] = out.get(k, _start(side, opening)) + (-amount if side == "debit" else amount)
    return out


def _check_balances(got: _Tables, want: Expected) -> Check:
    folded = _fold(got.ledger, want.opening)
    state: dict[Side, int] = {(a, "debit"): v for a, v in want.spend.items()}
    state.update({(a, "credit"): v for a, v in want.received.items()})
    keys = sorted(got.balances.keys() | folded.keys() | state.keys())

    def at(table: dict[Side, int], k: Side) -> int:
        return table.get(k, _start(k[1], want.opening))

    return _check(
        "PostgreSQL balances equal the fold of its ledger and the committed state",
        f"{len(got.balances):,} account sides in balances",
        ("differs from the ledger", [k for k in keys if at(got.balances, k) != at(folded, k)]),
        ("differs from the state", [k for k in keys if at(got.balances, k) != at(state, k)]),
    )


def _check_money(got: _Tables, want: Expected) -> tuple[Check, int]:
    # Accounts that never paid or were paid have no row and still hold the opening.
    accounts = {a for a, _ in got.balances}
    n = max(want.accounts, len(accounts))
    total = sum(got.balances.values())
    total += sum(want.opening for a in accounts if (a, "debit") not in got.balances)
    total += (n - len(accounts)) * want.opening
    expected = n * want.opening
    verdict = "==" if total == expected else "!="
    return (
        (
            "money conserved in PostgreSQL balances",
            total == expected,
            f"sum of balances {total:,} {verdict} {n:,} accounts x {want.opening:,}",
        ),
        total,
    )

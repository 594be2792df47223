"""PostgreSQL under `onceflow chaos`: scratch databases per run, and the audit of them.

Given a server (`--postgres postgresql://user@host:port/db`), chaos creates two fresh
databases on it, `onceflow_chaos_<tag>` for the crashing run and `onceflow_ref_<tag>`
for the reference run, so that the two runs never write into one table, and neither
writes into the database the pipeline names. The child processes find theirs in
`ONCEFLOW_CHAOS_POSTGRES_URL`, which every PostgresSink honours over its own URL; the
reference run, in this process, has its sinks pointed at the other database directly.

The pipeline module creates its tables by defining `chaos_postgres_setup(conn)`, called
once per scratch database with a psycopg connection in autocommit mode. Without it the
databases start empty, and a `PostgresSink(table=...)` fails before the first kill with
its own "table does not exist" error.

The audit, after the drain: every table of the crashing run's database holds the same
rows as the reference run's (as multisets; the sink's own epoch table aside, since
epochs count restarts), every sink's recorded offsets equal the App's committed
consumer offsets, and no prepared transaction is left in the database.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ._app import App
from ._errors import ConfigError, StoreError
from ._postgres_sink import CHAOS_URL_ENV, PostgresSink, _psycopg, redact
from ._sqlite import SQLiteStore

Check = tuple[str, bool, str]
Row = tuple[Any, ...]

# Epochs are fencing tokens: a run with restarts has higher ones, by design.
_NOT_COMPARED = {"onceflow_sink_epochs"}
_OFFSETS_TABLE = "onceflow_sink_offsets"
# How many rows of each kind a failing table comparison shows.
_SAMPLE = 3


def postgres_sinks(app: App) -> list[PostgresSink]:
    return [s.fn for s in app._steps if s.kind == "sink" and isinstance(s.fn, PostgresSink)]


def with_dbname(url: str, dbname: str) -> str:
    """The same server and user, another database."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres") or not parts.netloc:
        raise ConfigError(
            f"--postgres needs a URL such as postgresql://user@127.0.0.1:5432/postgres, "
            f"not {redact(url)!r}"
        )
    return urlunsplit(parts._replace(path=f"/{dbname}"))


@dataclass
class ScratchDatabases:
    """The two databases of one chaos run, on the server given by `--postgres`."""

    server: str
    names: tuple[str, str]

    @property
    def chaos_url(self) -> str:
        return with_dbname(self.server, self.names[0])

    @property
    def reference_url(self) -> str:
        return with_dbname(self.server, self.names[1])

    @classmethod
    def create(cls, server: str, setup: Callable[[Any], object] | None) -> ScratchDatabases:
        tag = uuid.uuid4().hex[:8]
        dbs = cls(server, (f"onceflow_chaos_{tag}", f"onceflow_ref_{tag}"))
        pg = _psycopg()
        with _connect(server) as admin:
            try:
                for name in dbs.names:
                    admin.execute(pg.sql.SQL("CREATE DATABASE {}").format(pg.sql.Identifier(name)))
                for url in (dbs.chaos_url, dbs.reference_url):
                    if setup is not None:
                        with _connect(url) as conn:
                            setup(conn)
            except BaseException:
                # Half a set-up (one database made, a failing setup hook) leaves nothing.
                dbs.drop()
                raise
        return dbs

    def child_env(self) -> dict[str, str]:
        return {CHAOS_URL_ENV: self.chaos_url}

    def drop(self) -> None:
        pg = _psycopg()
        with _connect(self.server) as admin:
            for name in self.names:
                _rollback_prepared(with_dbname(self.server, name))
                # FORCE: the reference run's sinks may still hold a session (PG 13+).
                admin.execute(
                    pg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        pg.sql.Identifier(name)
                    )
                )


def point_sinks(app: App, url: str) -> None:
    """Make every PostgresSink of an App, built in this process, write to `url`."""
    for sink in postgres_sinks(app):
        _point(sink, url)


def preflight(app: App, url: str) -> None:
    """Open every sink once against `url`, so that a missing table or
    `max_prepared_transactions = 0` fails now, with the sink's own error, not as a
    child that dies after every restart."""
    store = sqlite3.connect(":memory:")
    try:
        for sink in postgres_sinks(app):
            _point(sink, url)
            try:
                sink.open(app.name, store)
            finally:
                sink.close()
    finally:
        store.close()


def _point(sink: PostgresSink, url: str) -> None:
    # Closed first: an open session would keep writing to the database it was opened on.
    sink.close()
    sink.url = url


def audit(app: App, store: str, dbs: ScratchDatabases) -> list[Check]:
    """The PostgreSQL checks of a drained chaos run (embedded store)."""
    with _connect(dbs.chaos_url) as got, _connect(dbs.reference_url) as want:
        checks = compare_databases(got, want)
        checks.extend(check_offsets(app, got, want, _store_offsets(app, store)))
        checks.append(check_prepared(got))
    return checks


def compare_databases(got: Any, want: Any) -> list[Check]:
    """One check per table: the crashing run's rows equal the reference run's."""
    tables = sorted((_tables(got) | _tables(want)) - _NOT_COMPARED - {_OFFSETS_TABLE})
    return [_compare_table(got, want, t) for t in tables]


def check_offsets(
    app: App, got: Any, want: Any, consumer: Callable[[str], dict[int, int]]
) -> list[Check]:
    """Each sink's recorded offsets equal the store's committed ones.

    A sink records the epoch's positions with its rows, in its own transaction, so after
    the drain they must have caught up with the store: one ahead committed in PostgreSQL
    an epoch that the store did not, one behind lost a committed epoch. The partitions
    compared are those the sink recorded in either run. A sink records offsets only in
    epochs that give it rows, so one behind a filter that drops a partition's last
    records shows as behind without having lost anything.
    """
    checks: list[Check] = []
    for sink in postgres_sinks(app):
        recorded = _sink_offsets(got, app.name, sink.name)
        keys = set(recorded) | set(_sink_offsets(want, app.name, sink.name))
        committed = {topic: consumer(topic) for topic in {t for t, _ in keys}}
        wrong = [
            f"{t}[{p}]: {recorded.get((t, p))} in PostgreSQL, {committed[t].get(p)} committed"
            for t, p in sorted(keys)
            if recorded.get((t, p)) != committed[t].get(p)
        ]
        checks.append(
            (
                f"offsets of PostgresSink '{sink.name}' equal the consumer offsets",
                not wrong,
                "; ".join(wrong[:5]) or f"{len(keys)} partitions",
            )
        )
    return checks


def check_prepared(got: Any) -> Check:
    gids = [
        r[0]
        for r in got.execute(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() ORDER BY 1"
        )
    ]
    return (
        "no prepared transaction left in PostgreSQL",
        not gids,
        ", ".join(gids[:5]) or "none",
    )


def diff_rows(got: Iterable[Row], want: Iterable[Row], key: list[int]) -> list[str]:
    """Missing, extra and (by primary key) different rows, a few of each; empty if equal."""
    extra = Counter(got)
    extra.subtract(Counter(want))
    more = [r for r, n in extra.items() for _ in range(n) if n > 0]
    less = [r for r, n in extra.items() for _ in range(-n) if n < 0]
    different: list[tuple[Row, Row]] = []
    if key:
        by_key = {tuple(r[i] for i in key): r for r in less}
        for r in list(more):
            twin = by_key.pop(tuple(r[i] for i in key), None)
            if twin is not None:
                different.append((r, twin))
                more.remove(r)
                less.remove(twin)
    problems = []
    if less:
        problems.append(f"{len(less)} missing, e.g. {less[:_SAMPLE]}")
    if more:
        problems.append(f"{len(more)} extra, e.g. {more[:_SAMPLE]}")
    if different:
        shown = [f"{g} instead of {w}" for g, w in different[:_SAMPLE]]
        problems.append(f"{len(different)} different, e.g. {shown}")
    return problems


def _compare_table(got: Any, want: Any, table: str) -> Check:
    name = f"PostgreSQL table '{table}' equals the reference run's (none lost, none doubled)"
    a, b = _rows(got, table), _rows(want, table)
    if a is None or b is None:
        side = "crashing" if a is None else "reference"
        return (name, False, f"missing in the {side} run's database")
    problems = diff_rows(a, b, _primary_key(got, table))
    return (name, not problems, "; ".join(problems) or f"{len(a)} rows")


def _tables(conn: Any) -> set[str]:
    return {
        r[0]
        for r in conn.execute(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
        )
    }


def _rows(conn: Any, table: str) -> list[Row] | None:
    pg = _psycopg()
    if table not in _tables(conn):
        return None
    cur = conn.execute(pg.sql.SQL("SELECT * FROM {}").format(pg.sql.Identifier(table)))
    return [tuple(_hashable(v) for v in r) for r in cur]


def _primary_key(conn: Any, table: str) -> list[int]:
    """Positions of the primary key's columns, to pair a lost row with its changed twin."""
    cols = [
        r[0]
        for r in conn.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = %s ORDER BY ordinal_position",
            (table,),
        )
    ]
    key = [
        r[0]
        for r in conn.execute(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a "
            "ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
            "WHERE i.indrelid = to_regclass(quote_ident(%s)) AND i.indisprimary",
            (table,),
        )
    ]
    return [cols.index(c) for c in key if c in cols]


def _hashable(value: Any) -> Any:
    # json and array columns come back as dicts and lists, which a Counter cannot hold.
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, default=str)
    return value


def _sink_offsets(conn: Any, app: str, sink: str) -> dict[tuple[str, int], int]:
    if _OFFSETS_TABLE not in _tables(conn):
        return {}
    return {
        (t, int(p)): int(o)
        for t, p, o in conn.execute(
            "SELECT topic, part, next_offset FROM onceflow_sink_offsets "
            "WHERE app = %s AND sink = %s",
            (app, sink),
        )
    }


def _store_offsets(app: App, store: str) -> Callable[[str], dict[int, int]]:
    def committed(topic: str) -> dict[int, int]:
        st = SQLiteStore(store)
        try:
            return st.committed(app.name, topic)
        finally:
            st.close()

    return committed


def _rollback_prepared(url: str) -> None:
    """PostgreSQL refuses to drop a database holding a prepared transaction, and only a
    session in that database can roll one back; a kept-prepared one is a finding of the
    audit, already reported, not a reason to leave the database behind."""
    pg = _psycopg()
    try:
        with _connect(url) as conn:
            for (gid,) in conn.execute(
                "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
            ).fetchall():
                conn.execute(pg.sql.SQL("ROLLBACK PREPARED {}").format(pg.sql.Literal(gid)))
    except StoreError:
        pass  # never created, or already gone


def _connect(url: str) -> Any:
    pg = _psycopg()
    try:
        return pg.connect(url, autocommit=True, connect_timeout=10)
    except pg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise StoreError(f"cannot connect to PostgreSQL at {redact(url)}: {first}") from None

"""PostgreSQL under `onceflow chaos`: scratch databases per run, and the audit of them.

Given a server (`--postgres postgresql://user@host:port/db`), chaos creates two fresh
databases on it, `onceflow_chaos_<tag>` for the crashing run and `onceflow_ref_<tag>`
for the reference run, so that the two runs never write into one table, and neither
writes into the database the pipeline names. The child processes (one on the embedded
store, every worker on Kafka) find theirs in `ONCEFLOW_CHAOS_POSTGRES_URL`, which every
PostgresSink honours over its own URL; the reference run, in this process, has its
sinks pointed at the other database directly.

The pipeline module creates its tables by defining `chaos_postgres_setup(conn)`, called
once per scratch database with a psycopg connection in autocommit mode. Without it the
databases start empty, and a `PostgresSink(table=...)` fails before the first kill with
its own "table does not exist" error.

The audit, after the drain, on either backend:

- every table of the crashing run's database holds the same rows as the reference
  run's (as multisets). The sink's bookkeeping is left out: epochs and, on Kafka,
  per-partition fences count restarts and rebalances, by design; intents are
  checked on their own (below); recorded offsets are checked against the store;
- no sink's recorded offsets are ahead of the committed consumer offsets (the
  SQLite store's group offsets, or the Kafka consumer group's): PostgreSQL would hold
  an epoch that the store never committed. Behind is no finding by itself: a sink
  records offsets only in epochs that give it rows (see `check_offsets`);
- no prepared transaction is left in the database;
- on Kafka, no intent (`onceflow_sink_intents`) is left for a transaction still
  prepared. An intent whose transaction never prepared, or was settled without the
  intent being deleted (a kill in between), is harmless: recovery reads intents only
  joined with `pg_prepared_xacts`, prepared ids are never reused, and the next
  assignment of its partition sweeps it. Those are counted in the detail.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ._app import App
from ._errors import ConfigError, StoreError
from ._kafka_common import is_kafka
from ._postgres_sink import CHAOS_URL_ENV, PostgresSink, _psycopg, redact
from ._sqlite import SQLiteStore

Check = tuple[str, bool, str]
Row = tuple[Any, ...]
TP = tuple[str, int]
# The committed consumer offsets of some partitions of one run's store (absent: none).
Committed = Callable[[set[TP]], dict[TP, int]]

# Epochs and fences are fencing tokens: a run with restarts (or, on Kafka, rebalances)
# has higher ones, by design. Owners only name the backend. Intents are checked by
# `check_intents`.
_INTENTS_TABLE = "onceflow_sink_intents"
_NOT_COMPARED = {
    "onceflow_sink_epochs",
    "onceflow_sink_fences",
    "onceflow_sink_owners",
    _INTENTS_TABLE,
}
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
    for sink in postgres_sinks(app):
        _point(sink, url)
        try:
            sink.check(app.name)
        finally:
            sink.close()


def _point(sink: PostgresSink, url: str) -> None:
    # Closed first: an open session would keep writing to the database it was opened on.
    sink.close()
    sink.url = url


def audit(app: App, store: str, dbs: ScratchDatabases, reference_store: str) -> list[Check]:
    """The PostgreSQL checks of a drained chaos run, on the embedded store or Kafka.

    `store` and `reference_store` are the two runs' stores: each sink's recorded offsets
    are compared with the consumer offsets of its own run.
    """
    with _connect(dbs.chaos_url) as got, _connect(dbs.reference_url) as want:
        checks = compare_databases(got, want)
        checks.extend(
            check_offsets(
                app,
                got,
                want,
                committed_offsets(app.name, store),
                committed_offsets(app.name, reference_store),
            )
        )
        checks.append(check_prepared(got))
        if is_kafka(store):
            checks.append(check_intents(got))
    return checks


def compare_databases(got: Any, want: Any) -> list[Check]:
    """One check per table: the crashing run's rows equal the reference run's."""
    tables = sorted((_tables(got) | _tables(want)) - _NOT_COMPARED - {_OFFSETS_TABLE})
    return [_compare_table(got, want, t) for t in tables]


def committed_offsets(app: str, store: str) -> Committed:
    """The App's committed consumer offsets in `store`: the embedded store's group
    offsets, or the Kafka consumer group's (read with the AdminClient, joining nothing)."""
    if is_kafka(store):

        def kafka(keys: set[TP]) -> dict[TP, int]:
            from ._kafka_status import Cluster

            return Cluster(store).committed(app, sorted(keys)) if keys else {}

        return kafka

    def embedded(keys: set[TP]) -> dict[TP, int]:
        st = SQLiteStore(store)
        try:
            out: dict[TP, int] = {}
            for topic in {t for t, _ in keys}:
                for part, off in st.committed(app, topic).items():
                    if (topic, part) in keys:
                        out[(topic, int(part))] = int(off)
            return out
        finally:
            st.close()

    return embedded


def check_offsets(
    app: App, got: Any, want: Any, committed: Committed, reference: Committed
) -> list[Check]:
    """No sink's recorded offsets are ahead of its run's committed consumer offsets.

    A sink records the epoch's positions with its rows, in its own transaction, and its
    prepared transaction commits only once the store committed the epoch (or, on Kafka,
    once the group's offsets reached them). Ahead, then, means PostgreSQL holds an epoch
    that the store never committed: the check fails.

    Behind is reported, never failed on: a sink records offsets only in epochs that give
    it rows, so a sink behind a filter (or a key_by whose last records of a partition
    went to another sink) stays behind without having lost anything, and where epochs
    end differs between a crashing run and the reference. A lost epoch shows as missing
    rows in the table comparison, which is the check for that. The detail says, for
    each partition behind, whether the reference run's sink is behind on it too (the
    same records gave it no rows there either).

    The partitions compared are those the sink recorded in either run, and `reference`
    gives the reference run's committed offsets.
    """
    checks: list[Check] = []
    for sink in postgres_sinks(app):
        recorded = _sink_offsets(got, app.name, sink.name)
        ref_recorded = _sink_offsets(want, app.name, sink.name)
        keys = set(recorded) | set(ref_recorded)
        have = committed(keys)
        ahead = [tp for tp in sorted(recorded) if recorded[tp] > have.get(tp, -1)]
        behind = [tp for tp in sorted(keys) if recorded.get(tp, -1) < have.get(tp, -1)]
        ref_have = reference(set(behind)) if behind else {}
        if ahead:
            detail = "AHEAD of the committed offsets (an epoch the store never committed): "
            detail += "; ".join(_shown(tp, recorded, have) for tp in ahead[:5])
        else:
            detail = f"{len(keys) - len(behind)} of {len(keys)} partitions equal"
        if behind and not ahead:
            detail += "; behind (records that gave this sink no rows; rows compared above): "
            detail += "; ".join(
                _shown(tp, recorded, have)
                + (
                    ", the reference run's sink behind too"
                    if ref_recorded.get(tp, -1) < ref_have.get(tp, -1)
                    else ", not behind in the reference run"
                )
                for tp in behind[:5]
            )
        checks.append(
            (
                f"offsets of PostgresSink '{sink.name}' not ahead of the consumer offsets",
                not ahead,
                detail,
            )
        )
    return checks


def _shown(tp: TP, recorded: dict[TP, int], committed: dict[TP, int]) -> str:
    return f"{tp[0]}[{tp[1]}]: {recorded.get(tp)} in PostgreSQL, {committed.get(tp)} committed"


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


def check_intents(got: Any) -> Check:
    """Kafka: no intent is left for a transaction still prepared (see the module doc);
    intents of transactions no longer prepared are harmless, and counted."""
    if _INTENTS_TABLE not in _tables(got):
        return ("no sink intent left pending in PostgreSQL", True, "no intents table")
    rows = got.execute(
        "SELECT i.gid, x.gid IS NOT NULL FROM onceflow_sink_intents i "
        "LEFT JOIN pg_prepared_xacts x ON x.gid = i.gid AND x.database = current_database() "
        "GROUP BY i.gid, x.gid ORDER BY 1"
    ).fetchall()
    pending = [gid for gid, prepared in rows if prepared]
    stale = len(rows) - len(pending)
    detail = f"pending: {', '.join(pending[:5])}" if pending else "none pending"
    if stale:
        detail += f"; {stale} of transactions no longer prepared (harmless, swept later)"
    return ("no sink intent left pending in PostgreSQL", not pending, detail)


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

"""PostgresSink: exactly-once into PostgreSQL, by two-phase commit with the store.

Per epoch, before the store's transaction opens:
  1. in one PostgreSQL transaction: check and raise the sink's fencing epoch (a write
     from an older epoch is refused inside PostgreSQL, so a zombie cannot write), write
     the rows, record the next input offset per partition;
  2. PREPARE TRANSACTION with a global id naming the app, the sink and the epoch
     (`gid_prefix`: digests of the names, so that no two apps' or sinks' ids share a
     prefix, and recovery matches them exactly, never with LIKE).
Then the store commits the epoch, recording that id (the coordinator's record), and
after the commit the sink runs COMMIT PREPARED. On start, every prepared transaction of
this app and sink is resolved from the store's record: committed if the store committed
its epoch, rolled back otherwise. No prepared transaction of the app is left behind.

One app and sink name belong to one backend in a database (`onceflow_sink_owners`): an
embedded App and a Kafka App of the same names would resume from each other's offsets
and settle each other's prepared transactions, so the second one is refused.

On the Kafka backend the fence is per input partition and the coordinator's record is
the Kafka transaction's consumer offsets; see `_sink_fences.py`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ._errors import ConfigError, FencedError, MissingExtraError, UnavailableError
from ._sink_fences import SCHEMA as FENCE_SCHEMA
from ._sink_fences import PartitionFences
from ._sinks import Row, Sink, SinkContext, check_identifier, sql_of

if TYPE_CHECKING:
    from ._backend import Transaction
    from ._sqlite import SQLiteStore

log = logging.getLogger("onceflow")
T = TypeVar("T")

_GID_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
# PostgreSQL's limit on a prepared transaction's id, terminating zero included.
_GID_MAX = 199
# Set by `onceflow chaos` in its children: every sink writes to chaos's scratch database,
# whatever URL the pipeline names, so that a chaos run never writes into a real database.
CHAOS_URL_ENV = "ONCEFLOW_CHAOS_POSTGRES_URL"

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS onceflow_sink_epochs("
    " app text NOT NULL, sink text NOT NULL, epoch bigint NOT NULL, PRIMARY KEY(app, sink))",
    "CREATE TABLE IF NOT EXISTS onceflow_sink_offsets("
    " app text NOT NULL, sink text NOT NULL, topic text NOT NULL, part integer NOT NULL,"
    " next_offset bigint NOT NULL, PRIMARY KEY(app, sink, topic, part))",
    "CREATE TABLE IF NOT EXISTS onceflow_sink_owners("
    " app text NOT NULL, sink text NOT NULL, backend text NOT NULL, PRIMARY KEY(app, sink))",
)
# Which rows each backend writes for a sink, to recognise the owner of a sink whose
# bookkeeping predates `onceflow_sink_owners`.
_OWN_ROWS = {"embedded": "onceflow_sink_epochs", "kafka": "onceflow_sink_fences"}


def _digest(name: str) -> str:
    # 80 bits: names are chosen by people, not by an adversary.
    return hashlib.sha256(name.encode()).hexdigest()[:20]


def app_gid_prefix(app: str) -> str:
    """Every prepared-transaction id of `app`'s sinks starts with this, no other app's."""
    return f"onceflow.{_digest(app)}."


def gid_prefix(app: str, sink: str, backend: str) -> str:
    """The ids of one sink: injective in (app, sink, backend), whatever characters the
    names hold, unlike the names themselves made safe (`a.b`+`c` and `a`+`b.c`, or
    `x y` and `x/y`, would share one)."""
    return f"{app_gid_prefix(app)}{backend[0]}.{_digest(sink)}."


# The advisory lock key under which sinks create their bookkeeping tables.
_SCHEMA_LOCK = 0x6F6E6365666C6F77  # "onceflow"

# While PostgreSQL is unreachable, a step that must wait for it (a start, an assignment)
# or a prepared transaction left to settle is retried this often at most.
_MAX_BACKOFF_S = 5.0


def _transient(exc: BaseException) -> bool:
    """A connection that failed or broke, or a server starting up or shutting down:
    an outage to wait out. A refused login or a missing database is not."""
    pg = _psycopg()
    if not isinstance(exc, pg.OperationalError):
        return False
    state = getattr(exc, "sqlstate", None)
    return state is None or state[:2] in ("08", "57")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise MissingExtraError("postgres", "psycopg") from exc
    return psycopg


def redact(url: str) -> str:
    """A URL fit for a message: never the password."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


class PostgresSink(Sink):
    """Writes a stage's outputs into PostgreSQL exactly once.

    Either upserts dict values into `table` by its `key` columns, or calls
    `fn(cursor, rows)` to run any SQL inside the sink's transaction (`rows` are
    `(key, value, row_id)` with a deterministic `row_id`).

        >>> sink = PostgresSink("postgresql://app@db/ledger", table="balances",
        ...                     key=["account"], columns=["account", "balance"])
        >>> stream.sink(sink)                                       # doctest: +SKIP

    The URL may be left out: then ONCEFLOW_POSTGRES_URL, or libpq's PG* variables. The
    server needs `max_prepared_transactions` above 0.
    """

    guarantee = "transactional"
    needs_store = False

    def __init__(
        self,
        url: str | None = None,
        *,
        table: str | None = None,
        key: Sequence[str] = (),
        columns: Sequence[str] = (),
        fn: Callable[[Any, Sequence[Row]], None] | None = None,
        name: str | None = None,
    ) -> None:
        if (table is None) == (fn is None):
            raise ConfigError("PostgresSink needs either table= (with key= and columns=) or fn=")
        self.url = os.environ.get(CHAOS_URL_ENV) or (
            url if url is not None else os.environ.get("ONCEFLOW_POSTGRES_URL", "")
        )
        self.table = table
        self.fn = fn
        self.key = list(key)
        self.columns = list(columns)
        if table is not None:
            check_identifier(table, "table")
            if not self.key or not self.columns:
                raise ConfigError(
                    f"PostgresSink(table={table!r}) needs key=[...] and columns=[...]"
                )
            for c in self.columns:
                check_identifier(c, "column")
            missing = [k for k in self.key if k not in self.columns]
            if missing:
                raise ConfigError(f"PostgresSink({table!r}): key columns {missing} not in columns")
        self.name = name or f"postgres-{table or getattr(fn, '__name__', 'fn')}"
        self._app = ""
        self._backend = "embedded"
        self._conn: Any = None
        self._gid: str | None = None
        # Prepared ids to settle (True: commit, the store committed their epoch; False:
        # roll back) that PostgreSQL could not be told yet. They hold row locks that the
        # next prepare would wait on, so they are settled before it, or when idle.
        self._in_doubt: list[tuple[str, bool]] = []
        self._retry_at = 0.0
        self._backoff = 0.0
        self._down = False
        # Set on Kafka: per-partition fences, and the intents that recovery decides from.
        self._fences: PartitionFences | None = None
        self._store: SQLiteStore | None = None

    # -- connection -----------------------------------------------------------------

    def _where(self) -> str:
        return redact(self.url) or "(libpq defaults)"

    def _connect(self) -> Any:
        pg = _psycopg()
        try:
            conn = pg.connect(self.url, autocommit=True, connect_timeout=10)
        except pg.OperationalError as exc:
            if _transient(exc):
                raise self._unavailable("cannot connect", exc) from None
            raise ConfigError(
                f"PostgreSQL at {self._where()} refused PostgresSink '{self.name}': "
                f"{_first_line(exc)}. Operator action: fix the URL, role or database"
            ) from None
        if self._down:
            log.info("PostgreSQL at %s is reachable again", self._where())
            self._down = False
        self._backoff = 0.0
        return conn

    def _ensure(self) -> Any:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = self._connect()
        return self._conn

    def _unavailable(self, what: str, exc: BaseException) -> UnavailableError:
        """The outage, said once in the log until PostgreSQL is back."""
        self._conn = None
        if not self._down:
            self._down = True
            # Info, not a warning: the error goes up to the App, whose one warning per
            # outage names it (two warnings for one outage would be noise to an operator).
            log.info(
                "PostgreSQL at %s is unreachable (%s: %s); PostgresSink '%s' waits for it "
                "and retries with backoff, nothing is lost",
                self._where(),
                what,
                _first_line(exc),
                self.name,
            )
        return UnavailableError(
            f"PostgreSQL at {self._where()} is unreachable ({what}: {_first_line(exc)}); "
            "onceflow retries when it is back"
        )

    def _reachable(self, step: Callable[[Any], T]) -> T:
        """Run `step` on a connection at a point that cannot be redone later (the start,
        a new assignment): through an outage, wait with backoff. Unbound (no App), or
        once the App is stopping, the outage is raised instead."""
        delay = 0.2
        while True:
            try:
                return step(self._ensure())
            except Exception as exc:
                if isinstance(exc, UnavailableError):
                    err: UnavailableError = exc
                elif _transient(exc):
                    err = self._unavailable("connection lost", exc)
                else:
                    raise
                if self._stopping is None or self._stopping():
                    raise err from None
                time.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF_S)

    # -- lifecycle (Sink hooks) -----------------------------------------------------

    def open(self, context: SinkContext) -> None:
        """Nothing is resolved here: what is in doubt is, once the partitions are ours.

        The coordinator's record of a prepared id is a row in the store's own
        transaction where the backend has SQL tables (fenced by one epoch per process);
        elsewhere it is the transaction's consumer offsets, fenced per input partition
        (`_sink_fences.py`)."""
        super().open(context)
        self._app = context.app
        self._backend = context.backend
        self._gid = None
        store = context.session.sql_store
        self._store = store
        if store is None:
            self._fences = PartitionFences(context.app, self.name, context.session.committed_of)
            self._reachable(self._open_partitioned)
            return
        self._fences = None
        self._reachable(self._check_server)
        with store.lock:
            store.conn.execute(
                "CREATE TABLE IF NOT EXISTS sink_txns(app TEXT NOT NULL, sink TEXT NOT NULL, "
                "gid TEXT NOT NULL, PRIMARY KEY(app, sink)) WITHOUT ROWID"
            )

    def _open_partitioned(self, pg: Any) -> None:
        self._check_server(pg)
        if self.table is not None:
            self._check_table(pg)

    def _assigned_store(self, pg: Any, conn: sqlite3.Connection) -> None:
        # First: an in-doubt prepared transaction holds row locks (on the epoch row, say)
        # that anything below would wait on forever.
        self.recover(conn)
        pg.execute(
            "INSERT INTO onceflow_sink_epochs(app, sink, epoch) VALUES(%s, %s, 0) "
            "ON CONFLICT DO NOTHING",
            (self._app, self.name),
        )
        if self.table is not None:
            self._check_table(pg)

    def partitions_assigned(self, parts: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """Before this process reads the partitions: what is in doubt on them decides
        where reading starts, so this waits for PostgreSQL. Returns the offsets
        PostgreSQL recorded, which are where to resume if they are ahead."""
        fences, store = self._fences, self._store
        if fences is not None:
            self._reachable(lambda pg: fences.acquire(pg, parts))
        elif store is not None:
            with store.lock:
                self._reachable(lambda pg: self._assigned_store(pg, store.conn))
        wanted = set(parts)
        return {tp: off for tp, off in self.committed_positions().items() if tp in wanted}

    def partitions_revoked(self, parts: list[tuple[str, int]]) -> None:
        if self._fences is not None:
            self._fences.release(parts)

    def check(self, app: str) -> None:
        """What `open` checks first (the server, the table), and nothing else: no claim,
        no recovery. For a tool that checks a pipeline before running it on either
        backend."""
        self._app = app

        def checks(pg: Any) -> None:
            self._check_server(pg, claim=False)
            if self.table is not None:
                self._check_table(pg)

        self._reachable(checks)

    def _check_server(self, pg: Any, *, claim: bool = True) -> None:
        (maxp,) = pg.execute("SHOW max_prepared_transactions").fetchone()
        if int(maxp) <= 0:
            raise ConfigError(
                "PostgreSQL has max_prepared_transactions = 0, so PostgresSink cannot "
                "prepare transactions. Operator action: set max_prepared_transactions to at "
                "least the number of sinks (e.g. 20) in postgresql.conf and restart it"
            )
        # CREATE TABLE IF NOT EXISTS is not safe against itself: two workers starting at
        # once both find no table, and one fails on the catalog's unique index. A
        # transaction-scoped advisory lock makes them take turns.
        with pg.transaction():
            pg.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for stmt in (*SCHEMA, *FENCE_SCHEMA):
                pg.execute(stmt)
            if claim:
                self._claim(pg)

    def _claim(self, pg: Any) -> None:
        """Under the schema lock: this app and sink name belong to this backend here."""
        key = (self._app, self.name)
        row = pg.execute(
            "SELECT backend FROM onceflow_sink_owners WHERE app = %s AND sink = %s", key
        ).fetchone()
        owner = None if row is None else row[0]
        if owner is None:
            for backend, table in _OWN_ROWS.items():
                if pg.execute(
                    f"SELECT 1 FROM {table} WHERE app = %s AND sink = %s LIMIT 1", key
                ).fetchone():
                    owner = backend
            pg.execute(
                "INSERT INTO onceflow_sink_owners(app, sink, backend) VALUES (%s, %s, %s)",
                (*key, owner or self._backend),
            )
        if owner is not None and owner != self._backend:
            raise ConfigError(
                f"PostgresSink '{self.name}' of app '{self._app}': this database holds the "
                f"bookkeeping of a sink of these names of an App on {owner}, and this App "
                f"runs on {self._backend}; the two would resume from each other's offsets and "
                "settle each other's prepared transactions. Operator action: give one of "
                "them another app name or sink name (name=...), or another database"
            )

    def _check_table(self, pg: Any) -> None:
        assert self.table is not None
        have = {
            r[0]
            for r in pg.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = %s",
                (self.table,),
            )
        }
        if not have:
            raise ConfigError(
                f"table '{self.table}' does not exist in PostgreSQL; operator action: create "
                f"it with columns {self.columns} and a unique key on {self.key}"
            )
        lacking = [c for c in self.columns if c not in have]
        if lacking:
            raise ConfigError(
                f"table '{self.table}' has no columns {lacking}; operator action: add them or "
                "fix columns="
            )

    def _prefix(self) -> str:
        return gid_prefix(self._app, self.name, self._backend)

    def _new_gid(self, fence: int) -> str:
        head = f"{self._prefix()}{fence}.{uuid.uuid4().hex[:12]}."
        # The names, for a person reading pg_prepared_xacts; the digests decide.
        return head + _GID_SAFE.sub("_", f"{self._app}.{self.name}")[: _GID_MAX - len(head)]

    def _legacy_prefix(self) -> str | None:
        """The prefix ids had before they were digests, where it named only this sink
        (names without dots or characters it replaced): for an id left in doubt across
        an upgrade."""
        if any("." in n or _GID_SAFE.search(n) for n in (self._app, self.name)):
            return None
        return self._ambiguous_legacy_prefix()

    def _ambiguous_legacy_prefix(self) -> str:
        return f"onceflow.{_GID_SAFE.sub('_', self._app)}.{_GID_SAFE.sub('_', self.name)}."

    def recover(self, conn: sqlite3.Connection) -> None:
        """Settle prepared transactions of this sink from the store's record: the one it
        recorded is committed, every other one of this sink rolled back. Ids are matched
        by their exact prefix: a pattern would match other apps' ids too."""
        row = conn.execute(
            "SELECT gid FROM sink_txns WHERE app=? AND sink=?", (self._app, self.name)
        ).fetchone()
        committed_gid = None if row is None else row[0]
        pg = self._ensure()
        prefix, legacy = self._prefix(), self._legacy_prefix()
        for (gid,) in pg.execute(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
        ).fetchall():
            if gid == committed_gid:
                pg.execute(f"COMMIT PREPARED '{gid}'")
            elif gid.startswith(prefix) or (
                legacy is not None and re.fullmatch(re.escape(legacy) + r"\d+\.[0-9a-f]{12}", gid)
            ):
                pg.execute(f"ROLLBACK PREPARED '{gid}'")
            elif legacy is None and gid.startswith(self._ambiguous_legacy_prefix()):
                log.warning(
                    "sink %s: prepared transaction %s may be this sink's, from before "
                    "onceflow named them unambiguously, or another app's. Operator action: "
                    "COMMIT PREPARED it if the store of the app that wrote it records it "
                    "(table sink_txns), else ROLLBACK PREPARED it",
                    self.name,
                    gid,
                )

    def committed_positions(self) -> dict[tuple[str, int], int]:
        """The next offsets PostgreSQL recorded: where to resume if they are ahead."""
        return {
            (t, p): int(o)
            for t, p, o in self._reachable(
                lambda pg: pg.execute(
                    "SELECT topic, part, next_offset FROM onceflow_sink_offsets "
                    "WHERE app=%s AND sink=%s",
                    (self._app, self.name),
                ).fetchall()
            )
        }

    def prepare(
        self, rows: Sequence[Row], positions: dict[tuple[str, int], int], fence: int
    ) -> None:
        """Phases 1 and 2: write and PREPARE, before the store's transaction. An outage
        raises `UnavailableError`: the App drops the epoch and retries it later."""
        for attempt in (1, 2):
            try:
                self._prepare_once(rows, positions, fence)
                return
            except (FencedError, UnavailableError):
                raise
            except Exception as exc:
                if not _transient(exc):
                    raise
                # A lost connection loses the unprepared transaction with it: reconnect
                # and do it again, the epoch checked again.
                self._conn = None
                if attempt == 2:
                    raise self._unavailable("connection lost while preparing", exc) from None
                time.sleep(0.2)

    def _prepare_once(
        self, rows: Sequence[Row], positions: dict[tuple[str, int], int], fence: int
    ) -> None:
        pg = self._ensure()
        self._settle_in_doubt(pg)
        gid = self._new_gid(fence)
        if self._fences is not None:
            self._fences.record_intent(pg, gid, positions)
        pg.execute("BEGIN")
        try:
            # Waiting on a lock held by a prepared transaction could last forever.
            pg.execute("SET LOCAL lock_timeout = '10s'")
            self._check_fence(pg, positions, fence)
            if self.fn is not None:
                with pg.cursor() as c:
                    self.fn(c, rows)
            elif rows:
                self._upsert(pg, rows)
            if positions:
                with pg.cursor() as c:
                    c.executemany(
                        "INSERT INTO onceflow_sink_offsets(app, sink, topic, part, next_offset) "
                        "VALUES(%s, %s, %s, %s, %s) ON CONFLICT(app, sink, topic, part) "
                        "DO UPDATE SET next_offset = excluded.next_offset",
                        [(self._app, self.name, t, p, o) for (t, p), o in positions.items()],
                    )
            pg.execute(f"PREPARE TRANSACTION '{gid}'")
        except BaseException:
            if not pg.closed and not pg.broken:
                pg.execute("ROLLBACK")
                self._forget(pg, gid)
            else:
                # The PREPARE may have landed before the connection broke.
                self._in_doubt.append((gid, False))
            raise
        self._gid = gid

    def _check_fence(self, pg: Any, positions: dict[tuple[str, int], int], fence: int) -> None:
        if self._fences is not None:
            self._fences.check(pg, positions)
            return
        cur = pg.execute(
            "UPDATE onceflow_sink_epochs SET epoch = %s "
            "WHERE app = %s AND sink = %s AND epoch <= %s",
            (fence, self._app, self.name, fence),
        )
        if cur.rowcount != 1:
            raise FencedError(
                f"PostgresSink '{self.name}': a newer process of app '{self._app}' wrote "
                f"with a higher epoch than {fence}; this one stops without writing"
            )

    def _settle_in_doubt(self, pg: Any) -> None:
        """Tell PostgreSQL the fate of each prepared id it could not be told before, in
        order. On Kafka a new owner of the partition may have settled it already."""
        while self._in_doubt:
            gid, commit = self._in_doubt[0]
            if pg.execute("SELECT 1 FROM pg_prepared_xacts WHERE gid = %s", (gid,)).fetchone():
                try:
                    pg.execute(f"{'COMMIT' if commit else 'ROLLBACK'} PREPARED '{gid}'")
                except _psycopg().errors.UndefinedObject:
                    pass  # settled by that new owner in between
            self._forget(pg, gid)
            self._in_doubt.pop(0)

    def retry_pending(self) -> None:
        """While the App is idle: settle what an outage left in doubt, with backoff."""
        if self._in_doubt and time.monotonic() >= self._retry_at:
            self._try_settle()

    def _try_settle(self) -> None:
        try:
            self._settle_in_doubt(self._ensure())
        except Exception as exc:
            if not isinstance(exc, UnavailableError):
                if not _transient(exc):
                    raise
                self._unavailable("connection lost while settling", exc)
            self._backoff = min(max(self._backoff * 2, 0.2), _MAX_BACKOFF_S)
            self._retry_at = time.monotonic() + self._backoff

    def _forget(self, pg: Any, gid: str) -> None:
        if self._fences is not None:
            self._fences.forget(pg, gid)

    def _upsert(self, pg: Any, rows: Sequence[Row]) -> None:
        from psycopg import sql

        assert self.table is not None
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in self.columns)
        keys = sql.SQL(", ").join(sql.Identifier(c) for c in self.key)
        others = [c for c in self.columns if c not in self.key]
        action = (
            sql.SQL("DO UPDATE SET ")
            + sql.SQL(", ").join(
                sql.SQL("{} = excluded.{}").format(sql.Identifier(c), sql.Identifier(c))
                for c in others
            )
            if others
            else sql.SQL("DO NOTHING")
        )
        stmt = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) {}").format(
            sql.Identifier(self.table),
            cols,
            sql.SQL(", ").join(sql.Placeholder() for _ in self.columns),
            keys,
            action,
        )
        try:
            params = [tuple(v[c] for c in self.columns) for _, v, _ in rows]
        except (KeyError, TypeError) as exc:
            raise ConfigError(
                f"PostgresSink('{self.table}') needs dict values with keys {self.columns}: {exc!r}"
            ) from exc
        pg_mod = _psycopg()
        try:
            with pg.cursor() as c:
                c.executemany(stmt, params)
        except pg_mod.errors.InvalidColumnReference as exc:
            raise ConfigError(
                f"table '{self.table}' has no unique constraint on {self.key}; operator "
                "action: add one (ON CONFLICT needs it)"
            ) from exc

    def write(self, txn: Transaction, rows: Sequence[Row]) -> None:
        """Inside the store's transaction: the coordinator's record of the prepared id.
        Fenced per partition, the transaction's consumer offsets are that record."""
        if self._gid is None or self._fences is not None:
            return
        sql_of(txn, self.name).execute(
            "INSERT INTO sink_txns(app, sink, gid) VALUES(?,?,?) "
            "ON CONFLICT(app, sink) DO UPDATE SET gid=excluded.gid",
            (self._app, self.name, self._gid),
        )

    def after_commit(self, rows: Sequence[Row]) -> None:
        """Phase 3, once the store committed: COMMIT PREPARED. If PostgreSQL is away it
        stays in doubt, committed before the next prepare (or when idle, or by the next
        start's recovery, which finds it recorded): the App goes on meanwhile."""
        gid, self._gid = self._gid, None
        if gid is not None:
            self._in_doubt.append((gid, True))
            self._try_settle()

    def abort(self) -> None:
        """The epoch did not commit in the store: its prepared transaction must not either."""
        gid, self._gid = self._gid, None
        if gid is not None:
            self._in_doubt.append((gid, False))
            self._try_settle()

    def close(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.close()

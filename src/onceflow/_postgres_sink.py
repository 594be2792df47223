"""PostgresSink: exactly-once into PostgreSQL, by two-phase commit with the store.

Per epoch, before the store's transaction opens:
  1. in one PostgreSQL transaction: check and raise the sink's fencing epoch (a write
     from an older epoch is refused inside PostgreSQL, so a zombie cannot write), write
     the rows, record the next input offset per partition;
  2. PREPARE TRANSACTION with a global id naming the app, the sink and the epoch.
Then the store commits the epoch, recording that id (the coordinator's record), and
after the commit the sink runs COMMIT PREPARED. On start, every prepared transaction of
this app and sink is resolved from the store's record: committed if the store committed
its epoch, rolled back otherwise. No prepared transaction of the app is left behind.

On the Kafka backend the fence is per input partition and the coordinator's record is
the Kafka transaction's consumer offsets; see `_sink_fences.py`.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from ._errors import ConfigError, FencedError, MissingExtraError, StoreError
from ._sink_fences import SCHEMA as FENCE_SCHEMA
from ._sink_fences import PartitionFences
from ._sinks import Row, Sink, check_identifier

_GID_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
# Set by `onceflow chaos` in its children: every sink writes to chaos's scratch database,
# whatever URL the pipeline names, so that a chaos run never writes into a real database.
CHAOS_URL_ENV = "ONCEFLOW_CHAOS_POSTGRES_URL"

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS onceflow_sink_epochs("
    " app text NOT NULL, sink text NOT NULL, epoch bigint NOT NULL, PRIMARY KEY(app, sink))",
    "CREATE TABLE IF NOT EXISTS onceflow_sink_offsets("
    " app text NOT NULL, sink text NOT NULL, topic text NOT NULL, part integer NOT NULL,"
    " next_offset bigint NOT NULL, PRIMARY KEY(app, sink, topic, part))",
)


# The advisory lock key under which sinks create their bookkeeping tables.
_SCHEMA_LOCK = 0x6F6E6365666C6F77  # "onceflow"


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
        self._conn: Any = None
        self._gid: str | None = None
        # Prepared ids whose rollback failed (the connection broke): they hold row locks
        # that the next prepare would wait on, so they are rolled back before it.
        self._unresolved: list[str] = []
        # Set on Kafka: per-partition fences, and the intents that recovery decides from.
        self._fences: PartitionFences | None = None

    # -- connection -----------------------------------------------------------------

    def _connect(self) -> Any:
        pg = _psycopg()
        try:
            conn = pg.connect(self.url, autocommit=True, connect_timeout=10)
        except pg.OperationalError as exc:
            raise StoreError(
                f"cannot connect to PostgreSQL at {redact(self.url) or '(libpq defaults)'}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc}"
            ) from None
        return conn

    def _ensure(self) -> Any:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = self._connect()
        return self._conn

    # -- lifecycle (Sink hooks) -----------------------------------------------------

    def open(self, app: str, conn: sqlite3.Connection) -> None:
        self._app = app
        pg = self._ensure()
        self._check_server(pg)
        conn.execute(
            "CREATE TABLE IF NOT EXISTS sink_txns(app TEXT NOT NULL, sink TEXT NOT NULL, "
            "gid TEXT NOT NULL, PRIMARY KEY(app, sink)) WITHOUT ROWID"
        )
        # First: an in-doubt prepared transaction holds row locks (on the epoch row, say)
        # that anything below would wait on forever.
        self._gid = None
        self.recover(conn)
        pg.execute(
            "INSERT INTO onceflow_sink_epochs(app, sink, epoch) VALUES(%s, %s, 0) "
            "ON CONFLICT DO NOTHING",
            (app, self.name),
        )
        if self.table is not None:
            self._check_table(pg)

    def open_on_kafka(self, app: str, session: Any) -> None:
        """Kafka: nothing is resolved here; each partition is, when this worker gets it."""
        self._app = app
        self._gid = None
        self._fences = PartitionFences(app, self.name, session.committed_of)
        pg = self._ensure()
        self._check_server(pg, FENCE_SCHEMA)
        if self.table is not None:
            self._check_table(pg)

    def partitions_assigned(self, parts: list[tuple[str, int]]) -> None:
        if self._fences is not None:
            self._fences.acquire(self._ensure(), parts)

    def partitions_revoked(self, parts: list[tuple[str, int]]) -> None:
        if self._fences is not None:
            self._fences.release(parts)

    def _check_server(self, pg: Any, extra: Sequence[str] = ()) -> None:
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
            for stmt in (*SCHEMA, *extra):
                pg.execute(stmt)

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
        return f"onceflow.{_GID_SAFE.sub('_', self._app)}.{_GID_SAFE.sub('_', self.name)}."

    def recover(self, conn: sqlite3.Connection) -> None:
        """Settle prepared transactions of this sink from the store's record."""
        row = conn.execute(
            "SELECT gid FROM sink_txns WHERE app=? AND sink=?", (self._app, self.name)
        ).fetchone()
        committed_gid = None if row is None else row[0]
        pg = self._ensure()
        for (gid,) in pg.execute(
            "SELECT gid FROM pg_prepared_xacts WHERE gid LIKE %s AND database = current_database()",
            (self._prefix() + "%",),
        ).fetchall():
            if gid == committed_gid:
                pg.execute(f"COMMIT PREPARED '{gid}'")
            else:
                pg.execute(f"ROLLBACK PREPARED '{gid}'")

    def committed_positions(self) -> dict[tuple[str, int], int]:
        """The next offsets PostgreSQL recorded: where to resume if they are ahead."""
        pg = self._ensure()
        return {
            (t, p): int(o)
            for t, p, o in pg.execute(
                "SELECT topic, part, next_offset FROM onceflow_sink_offsets "
                "WHERE app=%s AND sink=%s",
                (self._app, self.name),
            )
        }

    def prepare(
        self, rows: Sequence[Row], positions: dict[tuple[str, int], int], fence: int
    ) -> None:
        """Phases 1 and 2: write and PREPARE, before the store's transaction."""
        for attempt in (1, 2):
            try:
                self._prepare_once(rows, positions, fence)
                return
            except FencedError:
                raise
            except Exception as exc:
                pg = _psycopg()
                # A lost connection loses the unprepared transaction with it: reconnect
                # and do it again, the epoch checked again.
                if attempt == 1 and isinstance(exc, pg.OperationalError):
                    self._conn = None
                    time.sleep(0.2)
                    continue
                raise

    def _prepare_once(
        self, rows: Sequence[Row], positions: dict[tuple[str, int], int], fence: int
    ) -> None:
        pg = self._ensure()
        self._resolve_unresolved(pg)
        gid = f"{self._prefix()}{fence}.{uuid.uuid4().hex[:12]}"
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

    def _resolve_unresolved(self, pg: Any) -> None:
        while self._unresolved:
            gid = self._unresolved[0]
            if pg.execute("SELECT 1 FROM pg_prepared_xacts WHERE gid = %s", (gid,)).fetchone():
                pg.execute(f"ROLLBACK PREPARED '{gid}'")
            self._forget(pg, gid)
            self._unresolved.pop(0)

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

    def write(self, conn: sqlite3.Connection, rows: Sequence[Row]) -> None:
        """Inside the store's transaction: the coordinator's record of the prepared id.
        On Kafka the transaction's consumer offsets are that record already."""
        if self._gid is None or self._fences is not None:
            return
        conn.execute(
            "INSERT INTO sink_txns(app, sink, gid) VALUES(?,?,?) "
            "ON CONFLICT(app, sink) DO UPDATE SET gid=excluded.gid",
            (self._app, self.name, self._gid),
        )

    def after_commit(self, conn: sqlite3.Connection, rows: Sequence[Row]) -> None:
        """Phase 3, once the store committed: COMMIT PREPARED, reconnecting if needed."""
        gid, self._gid = self._gid, None
        if gid is None:
            return
        for attempt in range(10):
            try:
                pg = self._ensure()
                pg.execute(f"COMMIT PREPARED '{gid}'")
                self._forget(pg, gid)
                return
            except Exception:
                self._conn = None
                if attempt == 9:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def abort(self) -> None:
        """The epoch did not commit in the store: its prepared transaction must not either."""
        gid, self._gid = self._gid, None
        if gid is None:
            return
        try:
            pg = self._ensure()
            pg.execute(f"ROLLBACK PREPARED '{gid}'")
            self._forget(pg, gid)
        except Exception:
            # Rolled back before the next prepare, or by the next start (the store never
            # recorded it).
            self._conn = None
            self._unresolved.append(gid)

    def close(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.close()

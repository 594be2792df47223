"""A real, throwaway PostgreSQL server (Debian's ``postgresql`` package) for tests, benches
and chaos runs: ``initdb`` once, then ``postgres`` in the foreground, on a free loopback
port, as the ``postgres`` system user (the server refuses to run as root).

    with PostgresServer(tmp_path / "pg") as pg:
        conn = psycopg.connect(pg.url)   # postgresql://postgres@127.0.0.1:PORT/onceflow
        pg.kill()       # SIGKILL every server process: a hard crash, no shutdown checkpoint
        pg.restart()    # same port, same data dir: crash recovery replays the WAL

Manual use: ``python infra/postgres.py start --dir /tmp/pg`` (see docs/postgres-server.md).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import functools
import glob
import json
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if not __package__:
    # Run as a script (`python infra/postgres.py`): `infra` is not importable yet.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra._process import (
    ManagedServer,
    pdeathsig_preexec,
    pick_port,
    run_in_foreground,
    tail,
    tail_section,
    write_banner,
)

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "ENABLE_HINT",
    "PostgresBinaries",
    "PostgresError",
    "PostgresServer",
    "PostgresUnavailable",
    "find_binaries",
]

ENABLE_HINT = (
    "PostgreSQL tests need the server binaries (Debian/Ubuntu: `apt-get install "
    "postgresql`; or set ONCEFLOW_PG_BINDIR to a directory holding initdb and postgres) "
    "and the Python driver (`.venv/bin/pip install 'psycopg[binary]'`)."
)

# Where Debian/Ubuntu put the server binaries, one directory per major version (they are
# not on PATH: /usr/bin holds only pg_wrapper links for client tools).
PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"

# The database role initdb creates (a superuser; trust auth, see _initdb) and the
# database start() creates: the URL is postgresql://postgres@127.0.0.1:PORT/onceflow.
SUPERUSER = "postgres"
DATABASE = "onceflow"

# Scratch clusters (see PostgresServer._choose_cluster_dir) are named with this prefix
# in the system temp dir and carry an owner file naming the process that owns them.
_SCRATCH_PREFIX = "onceflow-pg-"
_OWNER_FILE = "owner.json"

_log = logging.getLogger("onceflow.infra.postgres")


class PostgresError(RuntimeError):
    """The server could not be set up, started, made ready or stopped."""


class PostgresUnavailable(PostgresError):
    """A prerequisite (the server binaries, psycopg) is missing on this machine.

    The test suite turns this into a skip locally and a failure under CI
    (ONCEFLOW_REQUIRE_INFRA=1); the message says how to enable PostgreSQL tests.
    """


# -------------------------------------------------------------------------- binaries


@dataclass(frozen=True)
class PostgresBinaries:
    bindir: Path
    initdb: Path
    postgres: Path
    version: str  # "15.18"

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])


def find_binaries() -> PostgresBinaries:
    """initdb and postgres: $ONCEFLOW_PG_BINDIR, else the highest /usr/lib/postgresql/N/bin,
    else the directory of ``postgres`` on PATH (other distributions, Homebrew)."""
    override = os.environ.get("ONCEFLOW_PG_BINDIR")
    if override:
        candidates = [Path(override)]
    else:
        debian = sorted(glob.glob(PG_BIN_GLOB), key=_version_key, reverse=True)
        candidates = [Path(d) for d in debian]
        on_path = shutil.which("postgres")
        if on_path is not None:
            candidates.append(Path(on_path).resolve().parent)
    for bindir in candidates:
        initdb, postgres = bindir / "initdb", bindir / "postgres"
        if os.access(initdb, os.X_OK) and os.access(postgres, os.X_OK):
            return PostgresBinaries(bindir, initdb, postgres, _server_version(str(postgres)))
    where = override or f"{PG_BIN_GLOB} or PATH"
    raise PostgresUnavailable(
        f"no PostgreSQL server binaries (initdb, postgres) in {where}. {ENABLE_HINT}"
    )


def _version_key(bindir: str) -> tuple[int, ...]:
    # /usr/lib/postgresql/9.6/bin, .../15/bin: compare numerically, so 15 beats 9.6.
    name = Path(bindir).parent.name
    return tuple(int(p) for p in re.findall(r"\d+", name)) or (-1,)


@functools.cache
def _server_version(postgres: str) -> str:
    try:
        out = subprocess.run([postgres, "--version"], capture_output=True, text=True, timeout=30)
    except OSError as exc:
        raise PostgresUnavailable(f"cannot run {postgres}: {exc}. {ENABLE_HINT}") from exc
    match = re.search(r"\(PostgreSQL\) (\d+(?:\.\d+)*)", out.stdout)
    if match is None:
        raise PostgresUnavailable(f"cannot tell the version of {postgres} ({out.stdout!r})")
    return match.group(1)


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise PostgresUnavailable(f"the psycopg package is missing. {ENABLE_HINT}") from exc
    return psycopg


# ------------------------------------------------------------------------ run-as user


@dataclass(frozen=True)
class _RunAs:
    """The OS user the server runs as; ``switch`` is False when we already are that user."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    switch: bool

    def popen_kwargs(self) -> dict[str, Any]:
        if not self.switch:
            return {}
        # extra_groups matters: without it the child keeps root's supplementary groups.
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}


def _run_as() -> _RunAs:
    """Root: the ``postgres`` user of the Debian package ($ONCEFLOW_PG_USER to choose
    another), created as a system user ``onceflow-pg`` if there is none. Anyone else:
    themselves, since only root is refused by the server."""
    if os.geteuid() != 0:
        entry = pwd.getpwuid(os.geteuid())
        return _RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid, (), switch=False)
    wanted = os.environ.get("ONCEFLOW_PG_USER")
    for name in [wanted] if wanted else ["postgres", "onceflow-pg"]:
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            break
    else:
        if wanted:
            raise PostgresError(f"ONCEFLOW_PG_USER={wanted!r} is not a user on this machine")
        entry = _create_system_user("onceflow-pg")
    if entry.pw_uid == 0:
        raise PostgresError(f"user {entry.pw_name!r} is root; PostgreSQL refuses to run as root")
    groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return _RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, switch=True)


def _create_system_user(name: str) -> pwd.struct_passwd:
    # Only when the binaries come from somewhere other than the Debian package (which
    # creates `postgres`): a locked, home-less system account just to own the clusters.
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    cmd = [useradd, "--system", "--user-group", "--no-create-home"]
    cmd += ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise PostgresError(
            f"no `postgres` user and `{' '.join(cmd)}` failed (exit {done.returncode}): "
            f"{(done.stdout + done.stderr).strip()}. Create a non-root user for the server "
            "and set ONCEFLOW_PG_USER to its name."
        )
    _log.warning("created system user %s to run PostgreSQL test clusters", name)
    return pwd.getpwnam(name)


def _can_reach(path: Path, user: _RunAs) -> bool:
    """Whether ``user`` can enter ``path``: search permission on it and every ancestor.

    Asked of the kernel, by running `test -x` as that user, rather than re-implemented
    from mode bits (ACLs, group lists). pytest's tmp_path fails this (0700 root dirs).
    """
    if not user.switch:
        return os.access(path, os.X_OK)
    done = subprocess.run(
        ["test", "-x", str(path)], env=_child_env(Path("/")), **user.popen_kwargs()
    )
    return done.returncode == 0


def _child_env(home: Path) -> dict[str, str]:
    # A minimal environment: the caller's PG* variables (PGDATA, PGPORT, ...) and
    # LANG/LC_* must not leak in. A LANG naming a locale that is not generated makes
    # initdb fail ("invalid locale settings"); the cluster is C/UTF8 anyway.
    return {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "LC_ALL": "C",
        "HOME": str(home),
    }


# ------------------------------------------------------------------ processes (Linux)


def _proc_start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in ticks): with the pid, a process identity
    that survives pid reuse. None if there is no such process (or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _is_gone(pid: int) -> bool:
    # A zombie is as good as gone: it holds no memory and no shared memory attachment,
    # and whether PID 1 ever reaps it (in a container it may not) is not ours to wait on.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _server_processes(data_dir: Path, binary: Path) -> list[int]:
    """Live processes running ``binary`` whose working directory is ``data_dir``.

    The postmaster chdirs into its data dir and every backend and auxiliary process is
    forked from it, so this finds all of a cluster's processes, also after they were
    reparented (they call setsid(), so a process group does not). The binary check
    keeps us off a shell that happens to sit in the data dir.
    """
    want_cwd = os.path.realpath(data_dir)
    want_exe = os.path.realpath(binary)
    found: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            exe = os.readlink(f"/proc/{entry}/exe").removesuffix(" (deleted)")
        except OSError:
            continue
        if cwd == want_cwd and exe == want_exe and not _is_gone(int(entry)):
            found.append(int(entry))
    return found


def _remove_shm_segment(key: int, shmid: int) -> None:
    """IPC_RMID the server's small SysV segment if it is still ours and unattached.

    A SIGKILLed postmaster leaves it (the kernel keeps SysV segments until removed or
    reboot). A restart removes it itself, but a cluster killed and never restarted
    would leak one per kill, and kernel.shmmni (4096) eventually runs out on a
    long-lived CI machine with "could not create shared memory segment".
    """
    try:
        rows = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    except OSError:
        return
    for row in rows:
        fields = row.split()
        # key shmid perms size cpid lpid nattch uid ...
        if len(fields) > 6 and int(fields[0]) == key and int(fields[1]) == shmid:
            if int(fields[6]) == 0:
                with contextlib.suppress(OSError, AttributeError):
                    ctypes.CDLL(None, use_errno=True).shmctl(shmid, 0, None)  # 0: IPC_RMID
            return


# ---------------------------------------------------------------- scratch clusters

# Scratch cluster dirs this process owns; removed at exit (after its servers stopped).
_owned_scratch: set[Path] = set()
# Servers still running at interpreter exit are stopped (a strong set: a running server
# must not be garbage collected out of our reach). PR_SET_PDEATHSIG covers the exits
# that skip atexit.
_running: set[PostgresServer] = set()


@atexit.register
def _at_exit() -> None:
    for server in list(_running):
        with contextlib.suppress(Exception):
            server.stop(timeout=10)
    for path in list(_owned_scratch):
        shutil.rmtree(path, ignore_errors=True)


def _claim_scratch(path: Path) -> None:
    me = {"pid": os.getpid(), "start": _proc_start_time(os.getpid())}
    (path / _OWNER_FILE).write_text(json.dumps(me) + "\n")
    _owned_scratch.add(path)


def _sweep_stale_scratch(base: Path) -> None:
    """Remove scratch clusters whose owner process is gone (a run that was SIGKILLed and
    never reached atexit), unless a server still runs in them."""
    if not Path("/proc/self/stat").exists():
        return  # no way to tell a live owner from a dead one: keep everything
    for path in base.glob(f"{_SCRATCH_PREFIX}*"):
        try:
            owner = json.loads((path / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # being created right now by another process, or not one of ours
        pid, start = owner.get("pid"), owner.get("start")
        if isinstance(pid, int) and _proc_start_time(pid) == start:
            continue  # the owner is alive (same pid *and* start time: not a reused pid)
        postmaster = _read_postmaster_pid(path / "data")
        if postmaster is not None:
            pid, key, shmid, _ = postmaster
            if not _is_gone(pid):
                continue
            if key is not None and shmid is not None:
                _remove_shm_segment(key, shmid)  # the owner died with its server running
        shutil.rmtree(path, ignore_errors=True)
        _log.info("removed stale scratch cluster %s", path)


def _read_postmaster_pid(data_dir: Path) -> tuple[int, int | None, int | None, str] | None:
    """(pid, shm key, shm id, status) from postmaster.pid, or None if absent/partial.

    Lines: 1 pid, 2 data dir, 3 start time, 4 port, 5 socket dir, 6 listen address,
    7 "shm-key shm-id", 8 status ("starting", "ready", "stopping"; what pg_ctl waits on).
    """
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None
    if not lines or not lines[0].strip().isdigit():
        return None
    key = shmid = None
    if len(lines) > 6 and len(lines[6].split()) == 2:
        with contextlib.suppress(ValueError):
            key, shmid = (int(x) for x in lines[6].split())
    status = lines[7].strip() if len(lines) > 7 else ""
    return int(lines[0]), key, shmid, status


# ---------------------------------------------------------------------------- server

# Why each setting is there. Tests can override or add any of them (settings=). They go
# on the postgres command line (-c), so they apply on every start, win over
# postgresql.conf, and show in `ps`.
_BASE_SETTINGS: dict[str, str] = {
    # Loopback only: with trust auth (see _initdb) nothing else may reach the server.
    "listen_addresses": "127.0.0.1",
    # The sink PREPAREs a transaction per epoch; 0 (the default) disables 2PC.
    "max_prepared_transactions": "20",
    # Room for a chaos run's processes and their reconnects, small shared memory.
    "max_connections": "50",
    # The defaults, stated: the tests are about durability, and a developer's
    # "fsync=off for speed" would make crash tests pass for the wrong reason.
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    # Deterministic timestamps in tests and in the log, whatever the machine's zone.
    "timezone": "UTC",
    "log_timezone": "UTC",
    # The whole log on stderr, which start() points at <workdir>/postgres.log.
    "logging_collector": "off",
    "log_destination": "stderr",
    "log_line_prefix": "%m [%p] %q%u@%d ",
}

_UNIX_PATH_MAX = 107  # sizeof(sun_path) - 1 on Linux


class PostgresServer(ManagedServer):
    """A throwaway PostgreSQL cluster for ``workdir``, listening on 127.0.0.1 only.

    ``workdir`` (yours; may be pytest's tmp_path) holds ``server.json`` (port and
    cluster location, so restart(), and a new PostgresServer on the same workdir, come
    back on the same port), ``postgres.log`` (the server's whole log, appended across
    starts, a banner per start) and ``initdb.log``.

    The cluster (``data/``, the data dir, and ``run/``, the unix socket dir) must be
    reachable by the server's OS user. If it can enter ``workdir`` (e.g. a dir you made
    under /tmp) the cluster lives there and is kept as long as the workdir. If not
    (pytest's tmp dirs are 0700 root) it lives in a scratch dir
    ``$TMPDIR/onceflow-pg-XXXX``, linked as ``workdir/cluster``, owned by this process
    and removed by close(), by the context manager's exit, or at interpreter exit; a
    later run removes scratch dirs whose owner process died.

    ``start()`` returns once psycopg can connect and the ``onceflow`` database exists.
    """

    _error = PostgresError
    _what = "PostgreSQL"
    _process_what = "the postmaster"
    # Fast shutdown (roll back, disconnect, checkpoint), then immediate shutdown (no
    # checkpoint: crash recovery on the next start) before SIGKILL.
    _stop_signals = (signal.SIGINT, signal.SIGQUIT)
    _running = _running
    _log = _log

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        port: int | None = None,
        *,
        settings: Mapping[str, str | int] | None = None,
        database: str = DATABASE,
        ready_timeout: float = 60.0,
        stop_timeout: float = 30.0,
        die_with_parent: bool = True,
    ) -> None:
        super().__init__(
            workdir,
            ready_timeout=ready_timeout,
            stop_timeout=stop_timeout,
            die_with_parent=die_with_parent,
        )
        self.log_path = self.workdir / "postgres.log"
        self.initdb_log = self.workdir / "initdb.log"
        self._state_path = self.workdir / "server.json"
        self.settings = {k: str(v) for k, v in (settings or {}).items()}
        if "port" in self.settings:
            raise PostgresError("pass the port as port=, not in settings= (the URL uses it)")
        self.database = database
        self.user = SUPERUSER
        #: Seconds spent in each phase of the last start(): checks (binaries, psycopg,
        #: user, dirs), initdb (first start only), boot (launch to accepting
        #: connections, crash recovery included), database, total.
        self.timings: dict[str, float] = {}
        self.binaries: PostgresBinaries | None = None
        self._cluster_dir: Path | None = None

        self.workdir.mkdir(parents=True, exist_ok=True)
        state = self._load_state()
        self.port: int = port or state.get("port") or pick_port(PostgresError)
        self._save_state()

    # -------------------------------------------------------------- public surface

    @property
    def url(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/onceflow`` (trust auth: no password)."""
        return self.url_for(self.database)

    def url_for(self, dbname: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    @property
    def data_dir(self) -> Path:
        return self._require_cluster() / "data"

    @property
    def socket_dir(self) -> Path:
        return self._require_cluster() / "run"

    @property
    def _address(self) -> str:
        return self.url

    def start(self) -> PostgresServer:
        """initdb if new, launch the postmaster and wait until psycopg can connect.

        On any failure the server is killed and PostgresError carries the log tail;
        PostgresUnavailable means a prerequisite is missing (see ENABLE_HINT).
        """
        return super().start()

    def stop(self, timeout: float | None = None) -> int | None:
        """Fast shutdown (SIGINT: roll back open transactions, disconnect clients,
        checkpoint); after ``timeout`` seconds immediate shutdown (SIGQUIT), then SIGKILL.

        Prepared transactions survive (they are on disk). Returns the postmaster's exit
        status (None if it was not running).
        """
        return super().stop(timeout)

    def kill(self) -> int | None:
        """SIGKILL the whole server, postmaster and backends at once: a hard crash.

        No shutdown checkpoint: restart() runs crash recovery from the WAL. Committed
        transactions survive (fsync is on), open ones are lost, prepared ones stay
        prepared. Clients see their connection drop, with no goodbye message. What is
        in the OS page cache survives, as after a real process crash; this is not a
        power loss. Returns the postmaster's exit status (-9), or None.

        Why not the postmaster alone: each backend then exits only when it next waits
        (a busy one keeps running, an idle one first sends its client a polite FATAL),
        and the restart refuses to start while any is still attached to the old shared
        memory. Safe to call from another thread while start() is waiting; that start()
        then fails promptly.
        """
        return super().kill()

    def close(self) -> None:
        """stop(), then remove the cluster if it is a scratch dir (see the class doc).

        The workdir, with its logs, is left alone; so is a cluster inside it.
        """
        self.stop()
        cluster = self._cluster_dir
        if cluster is not None and cluster in _owned_scratch:
            shutil.rmtree(cluster, ignore_errors=True)
            _owned_scratch.discard(cluster)
            (self.workdir / "cluster").unlink(missing_ok=True)
            self._cluster_dir = None

    def log_tail(self, n: int = 50) -> str:
        """The last ``n`` lines of postgres.log (initdb.log if the server log is empty)."""
        text = tail(self.log_path, n)
        return text if text.strip() else tail(self.initdb_log, n)

    def connect(self, dbname: str | None = None, **kwargs: Any) -> psycopg.Connection[Any]:
        """A psycopg connection to ``dbname`` (default: the ``onceflow`` database)."""
        kwargs.setdefault("connect_timeout", 10)
        conn: psycopg.Connection[Any] = _psycopg().connect(
            self.url_for(dbname or self.database), **kwargs
        )
        return conn

    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name`` (which must not exist) and return its URL.

        A database per test isolates tables and prepared transactions
        (pg_prepared_xacts has a ``database`` column) on one shared server.
        """
        pg = _psycopg()
        with self.connect("postgres", autocommit=True) as conn:
            conn.execute(pg.sql.SQL("CREATE DATABASE {}").format(pg.sql.Identifier(name)))
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE IF EXISTS ``name``, disconnecting its sessions (FORCE, PG 13+)
        and rolling back its prepared transactions first.

        Those belong to no session, so FORCE does not end them, and PostgreSQL refuses to
        drop a database that holds one; a test that crashed mid-commit leaves them.
        ROLLBACK PREPARED works only from a session in the same database.
        """
        pg = _psycopg()
        with self.connect("postgres", autocommit=True) as conn:
            held = conn.execute(
                "SELECT gid FROM pg_prepared_xacts WHERE database = %s", (name,)
            ).fetchall()
        if held:
            with self.connect(name, autocommit=True) as conn:
                for (gid,) in held:
                    conn.execute(pg.sql.SQL("ROLLBACK PREPARED {}").format(pg.sql.Literal(gid)))
        with self.connect("postgres", autocommit=True) as conn:
            stmt = pg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            conn.execute(stmt.format(pg.sql.Identifier(name)))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"PostgresServer({str(self.workdir)!r}, url={self.url!r}, {state})"

    # -------------------------------------------------------------------- internals

    def _require_cluster(self) -> Path:
        if self._cluster_dir is None:
            raise PostgresError("the cluster's location is decided by start(); call it first")
        return self._cluster_dir

    def _load_state(self) -> dict[str, Any]:
        try:
            loaded = json.loads(self._state_path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return loaded if isinstance(loaded, dict) else {}

    def _save_state(self) -> None:
        state: dict[str, Any] = {"port": self.port}
        if self._cluster_dir is not None:
            state["cluster_dir"] = str(self._cluster_dir)
        if self.binaries is not None:
            state["postgres_version"] = self.binaries.version
        self._state_path.write_text(json.dumps(state, indent=2) + "\n")

    def _choose_cluster_dir(self, user: _RunAs) -> Path:
        """The workdir itself if the server user can enter it, else a scratch dir."""
        if self._cluster_dir is not None and self._cluster_dir.is_dir():
            return self._cluster_dir
        if _can_reach(self.workdir, user):
            return self.workdir
        recorded = self._load_state().get("cluster_dir")
        if recorded and Path(recorded).is_dir() and Path(recorded) != self.workdir:
            # A new PostgresServer on the same workdir, while the scratch still exists:
            # the same cluster, now owned (removed at exit) by this process.
            _claim_scratch(Path(recorded))
            return Path(recorded)
        for base in dict.fromkeys([Path(tempfile.gettempdir()), Path("/tmp"), Path("/var/tmp")]):
            if base.is_dir() and _can_reach(base, user):
                break
        else:
            raise PostgresError(
                f"user {user.name!r} cannot enter {self.workdir}, nor any temp dir to hold "
                "the cluster; pass a workdir it can enter"
            )
        _sweep_stale_scratch(base)
        path = Path(tempfile.mkdtemp(prefix=_SCRATCH_PREFIX, dir=base))
        _claim_scratch(path)
        if user.switch:
            os.chown(path, user.uid, user.gid)
        link = self.workdir / "cluster"  # so a person debugging a test finds the data
        link.unlink(missing_ok=True)
        link.symlink_to(path)
        return path

    def _initdb(self, binaries: PostgresBinaries, user: _RunAs) -> None:
        cluster = self._require_cluster()
        data = cluster / "data"
        started = cluster / "initdb.started"
        if any(data.iterdir()):
            if not started.exists():
                # Never wipe what we did not make: a --dir that already had a data/.
                raise PostgresError(f"{data} is not empty and was not made by initdb here")
            # Our own initdb, killed half-way: start over.
            for child in data.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        started.touch()
        cmd = [
            str(binaries.initdb),
            "--pgdata",
            str(data),
            "--username",
            SUPERUSER,
            # Trust for local and host (127.0.0.1/32, ::1/128) connections: a throwaway
            # cluster on loopback, so URLs carry no password. Any local OS user can
            # connect as superuser while it runs; do not use it on a shared host.
            "--auth",
            "trust",
            # C locale and UTF8 on every machine: no dependency on generated locales,
            # and the same sort order everywhere.
            "--encoding",
            "UTF8",
            "--locale",
            "C",
        ]
        with self.initdb_log.open("ab") as out:
            write_banner(out, "initdb")
            try:
                done = subprocess.run(
                    cmd,
                    cwd=cluster,
                    env=_child_env(cluster),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=300,
                    preexec_fn=pdeathsig_preexec() if self.die_with_parent else None,
                    **user.popen_kwargs(),
                )
            except subprocess.TimeoutExpired as exc:
                raise PostgresError(f"initdb did not finish in {exc.timeout:.0f}s") from exc
        if done.returncode != 0:
            raise PostgresError(
                f"initdb failed (exit {done.returncode}): {' '.join(cmd)}\n"
                f"{tail_section(self.initdb_log, 30)}"
            )
        (cluster / "initdb.ok").write_text(f"{binaries.version}\n")

    def _server_settings(self) -> dict[str, str]:
        socket_dir = str(self.socket_dir)
        if len(f"{socket_dir}/.s.PGSQL.{self.port}") > _UNIX_PATH_MAX:
            # The server would refuse to start ("Unix-domain socket path ... is too
            # long"); our clients use TCP, so go without a unix socket.
            socket_dir = ""
        per_start = {"port": str(self.port), "unix_socket_directories": socket_dir}
        return {**_BASE_SETTINGS, **per_start, **self.settings}

    def _launch(self) -> None:
        binaries = self.binaries = find_binaries()
        _psycopg()  # fail as unavailable now, not after initdb
        user = _run_as()
        cluster = self._cluster_dir = self._choose_cluster_dir(user)
        for sub in (cluster / "data", cluster / "run"):
            sub.mkdir(mode=0o700, exist_ok=True)
            if user.switch:
                os.chown(sub, user.uid, user.gid)
        self._save_state()
        self.timings["checks"] = time.monotonic() - self._started_at
        if not (cluster / "initdb.ok").exists():
            t = time.monotonic()
            self._initdb(binaries, user)
            self.timings["initdb"] = time.monotonic() - t
        cmd = [str(binaries.postgres), "-D", str(self.data_dir)]
        for key, value in self._server_settings().items():
            cmd += ["-c", f"{key}={value}"]
        # Not pg_ctl: it daemonizes, so the postmaster would outlive us and escape
        # PR_SET_PDEATHSIG. The postmaster in the foreground is our child. Its
        # preexec_fn runs after subprocess has switched to the server user (a
        # credential change clears PR_SET_PDEATHSIG, so the order matters), and the
        # backends notice their postmaster's death and exit on their own.
        self._spawn(
            cmd,
            self.log_path,
            f"starting {cmd}",
            cwd=cluster,
            env=_child_env(cluster),
            **user.popen_kwargs(),
        )

    def _become_ready(self) -> None:
        # From the launch, not from start(): a slow initdb on a loaded CI machine has
        # its own timeout and must not eat into the server's.
        conn = self._wait_ready(self._launched_at + self.ready_timeout)
        self.timings["boot"] = time.monotonic() - self._launched_at
        t = time.monotonic()
        with conn:
            self._ensure_database(conn, self.database)
        self.timings["database"] = time.monotonic() - t

    @property
    def _ready_what(self) -> str:
        return f"PostgreSQL {self.binaries.version}" if self.binaries else self._what

    def _wait_ready(self, deadline: float) -> psycopg.Connection[Any]:
        """Wait for status "ready" in postmaster.pid (what pg_ctl waits on; no failed
        logins in the log while it boots or recovers), then for a psycopg connection."""
        pg = _psycopg()
        postmaster = self.pid

        def says_ready() -> bool | None:
            info = _read_postmaster_pid(self.data_dir)
            ready = info is not None and info[0] == postmaster and info[3] == "ready"
            return ready or None

        def connect() -> psycopg.Connection[Any]:
            conn: psycopg.Connection[Any] = pg.connect(
                self.url_for("postgres"),
                autocommit=True,
                connect_timeout=max(1, min(5, int(deadline - time.monotonic()))),
            )
            return conn

        self._wait_for(says_ready, deadline, 0.02, "postmaster.pid never said ready")
        return self._wait_for(
            connect,
            deadline,
            0.05,
            f"cannot connect to {self.url_for('postgres')}",
            retry_on=(pg.OperationalError,),
        )

    def _ensure_database(self, conn: psycopg.Connection[Any], name: str) -> None:
        pg = _psycopg()
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists is None:
            conn.execute(pg.sql.SQL("CREATE DATABASE {}").format(pg.sql.Identifier(name)))

    def _kill_server_processes(self, last: int | None = None) -> bool:
        """SIGKILL every process of the cluster (``last`` after all others) and wait
        until they are gone; False if some outlived 10 s of it (stuck in the kernel)."""
        if self._cluster_dir is None or self.binaries is None:
            return True
        data = self.data_dir
        deadline = time.monotonic() + 10
        while pids := _server_processes(data, self.binaries.postgres):
            for pid in sorted(pids, key=lambda pid: pid == last):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                _log.warning("server processes %s of %s outlived SIGKILL", pids, data)
                return False
            time.sleep(0.01)
        return True

    def _before_kill(self, proc: subprocess.Popen[bytes]) -> None:
        # Frozen, the postmaster can neither fork nor react to its children's deaths;
        # the children die first, so none outlives it long enough to notice its death.
        proc.send_signal(signal.SIGSTOP)
        self._kill_server_processes(last=proc.pid)

    def _after_death(self) -> None:
        """With the postmaster dead: kill its leftover processes and the lock state a
        crash leaves behind that could only make the next start fail spuriously."""
        if self._cluster_dir is None or self.binaries is None:
            return
        if not self._kill_server_processes():
            return  # leave the lock files: the next start must see the survivors
        data = self.data_dir
        info = _read_postmaster_pid(data)
        if info is not None and info[1] is not None and info[2] is not None:
            _remove_shm_segment(info[1], info[2])
        # Stale lock files hold the dead postmaster's pid. The server treats a lock as
        # held if that pid is alive and owned by its user; with pid_max often 32768 and
        # several clusters per machine, a backend of another cluster can have taken the
        # pid by the restart ("lock file "postmaster.pid" already exists"). Every
        # process of the cluster is dead now, so nothing is lost by removing them.
        (data / "postmaster.pid").unlink(missing_ok=True)
        (self.socket_dir / f".s.PGSQL.{self.port}.lock").unlink(missing_ok=True)

    def _fail_logs(self) -> str:
        return tail_section(self.log_path, 40)


# ------------------------------------------------------------------------------- CLI


def _parse_setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.strip(), value


def _cli_lines(server: PostgresServer) -> list[str]:
    # After start(): data_dir is known only once the cluster's location is chosen.
    lines = [
        f"url={server.url}",
        f"log: {server.log_path}  data: {server.data_dir}  (Ctrl-C to stop)",
    ]
    if server.data_dir.parent in _owned_scratch:
        lines.append(
            f"note: the server user cannot enter {server.workdir}, so the data lives "
            "in a scratch dir that is removed on exit; use a dir it can enter "
            "(e.g. under /tmp) to keep it"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python infra/postgres.py",
        description="Run onceflow's throwaway PostgreSQL server by hand.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="run a server in the foreground until Ctrl-C")
    start.add_argument("--dir", required=True, type=Path, help="work dir (kept across runs)")
    start.add_argument("--port", type=int, help="port (default: kept from --dir, else random)")
    start.add_argument(
        "-c",
        dest="settings",
        action="append",
        type=_parse_setting,
        default=[],
        metavar="KEY=VALUE",
        help="a server setting, e.g. -c log_statement=all (repeatable)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        server = PostgresServer(args.dir, args.port, settings=dict(args.settings))
        return run_in_foreground(server, lambda: _cli_lines(server), "server")
    except PostgresError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""What the server controllers (``infra.kafka_broker``, ``infra.postgres``) share: one
server process run in the foreground as our child, on loopback, with its output in a
log file in the workdir.

``ManagedServer`` holds the life cycle (start, graceful stop with fallback, SIGKILL,
restart), the readiness wait and its error; each subclass says how its server is
prepared, launched and probed, and what a crash leaves behind to clean up.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, MutableSet, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, ClassVar, NoReturn, Self, TypeVar

T = TypeVar("T")

# How long an immediate shutdown (the fallback signal after an ignored graceful one)
# may take before SIGKILL: it writes nothing, so seconds are plenty.
FALLBACK_STOP_TIMEOUT = 10.0


# ----------------------------------------------------------------------------- ports


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_port(error: type[Exception], exclude: Sequence[int] = ()) -> int:
    """A free loopback port *below* the kernel's ephemeral range.

    Ports from bind(0) come out of the ephemeral range; after a server is killed, any
    outgoing connection on the machine may take that number as its local port and the
    restart on "the same port" fails with "Address already in use". Below the range,
    only another listener can take it.
    """
    low = 20000
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    high = max(low + 1000, ephemeral_low - 1)
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(low, high)
        if port not in exclude and port_is_free(port):
            return port
    raise error(f"no free loopback port in {low}-{high}")


# ------------------------------------------------------------------------- processes


def pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn that makes the kernel SIGKILL the child when its parent dies.

    So a pytest or chaos harness killed with SIGKILL takes its server with it instead
    of leaving an orphan holding ports and memory. The function pointer is looked up
    here, in the parent: the child, between fork and exec, only makes one libc call.
    The signal fires when the *thread* that started the child exits. Linux only;
    elsewhere servers rely on stop()/atexit.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def write_banner(log: IO[bytes], what: str) -> None:
    """Mark in an appended-to log where this run's output begins."""
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} onceflow: {what}\n".encode())
    log.flush()


def tail(path: Path, n: int) -> str:
    """The last n lines of a file, read from its end (server logs grow large)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            data = b""
            while size > 0 and data.count(b"\n") <= n:
                step = min(8192, size)
                size -= step
                handle.seek(size)
                data = handle.read(step) + data
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-n:])


def tail_section(path: Path, n: int) -> str:
    return f"--- {path} (tail) ---\n{tail(path, n)}"


def run_in_foreground(server: ManagedServer, lines: Callable[[], Sequence[str]], what: str) -> int:
    """The CLIs' ``start``: run ``server`` until Ctrl-C or SIGTERM; 1 if it dies first.

    ``lines`` are printed once it is ready (a function: some are known only then).
    """
    # SIGTERM (e.g. from a bench script) stops the server the same way as Ctrl-C;
    # SIGINT also when started in the background by a non-interactive shell, which
    # starts its jobs with SIGINT ignored.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with server:
        for line in lines():
            print(line, flush=True)
        try:
            while server.is_running():
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("stopping...", flush=True)
            return 0
        print(f"{what} exited unexpectedly:\n{server.log_tail(40)}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------- server


class ManagedServer:
    """One server process for ``workdir``, our child in its own session.

    Subclasses set the class attributes and implement ``_address``, ``log_tail``,
    ``_launch`` (prepare, then ``_spawn``), ``_become_ready`` and ``_fail_logs``;
    ``_ready_what``, ``_before_kill`` and ``_after_death`` are optional hooks.
    """

    #: The error every failure is raised as (a subclass's own error class).
    _error: ClassVar[type[Exception]]
    #: "Kafka broker", "PostgreSQL": the start of messages about the server.
    _what: ClassVar[str]
    #: "the broker JVM", "the postmaster": the process we spawn.
    _process_what: ClassVar[str]
    #: A graceful stop sends the first; each one ignored for its timeout (stop_timeout,
    #: then FALLBACK_STOP_TIMEOUT) escalates to the next, and after the last to SIGKILL.
    _stop_signals: ClassVar[Sequence[signal.Signals]] = (signal.SIGTERM,)
    #: Servers started and not yet stopped, for the module's atexit handler.
    _running: ClassVar[MutableSet[Any]]
    _log: ClassVar[logging.Logger]

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        ready_timeout: float,
        stop_timeout: float,
        die_with_parent: bool,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.die_with_parent = die_with_parent
        self.timings: dict[str, float] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._started_at = 0.0  # when the last start() began
        self._launched_at = 0.0  # when its process was spawned
        self._lock = threading.Lock()

    # -------------------------------------------------------------- to implement

    @property
    def _address(self) -> str:
        """Where clients reach the server, for messages."""
        raise NotImplementedError

    def log_tail(self, n: int = 50) -> str:
        raise NotImplementedError

    def _launch(self) -> None:
        """Check prerequisites, prepare the workdir, and ``_spawn`` the server."""
        raise NotImplementedError

    def _become_ready(self) -> None:
        """Return once clients can use the server, or fail with ``_fail``."""
        raise NotImplementedError

    def _fail_logs(self) -> str:
        """The log tails that a readiness failure carries."""
        raise NotImplementedError

    @property
    def _ready_what(self) -> str:
        """The server, as the log line after each start() names it."""
        return self._what

    def _before_kill(self, proc: subprocess.Popen[bytes]) -> None:
        """Runs just before kill() SIGKILLs ``proc``."""

    def _after_death(self) -> None:
        """Runs once the process died other than by a clean stop."""

    # -------------------------------------------------------------- public surface

    @property
    def pid(self) -> int | None:
        """The pid of the process we spawned (None when there is none)."""
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        with self._lock:
            if self.is_running():
                raise self._error(f"{self._what} in {self.workdir} is already running")
            if self._proc is not None:
                # It died on its own, or someone SIGKILLed self.pid: clean up as kill().
                self._hard_stop()
            self._started_at = time.monotonic()
            self.timings = {}
            self._launch()
            try:
                self._become_ready()
            except BaseException:
                self._hard_stop()
                raise
            self.timings["total"] = time.monotonic() - self._started_at
            self._running.add(self)
            self._log.info("%s ready at %s (%s)", self._ready_what, self._address, self.timings)
            return self

    def stop(self, timeout: float | None = None) -> int | None:
        with self._lock:
            proc = self._proc
            if proc is None:
                return None
            if proc.poll() is None:
                self._terminate(proc, self.stop_timeout if timeout is None else timeout)
            if proc.returncode != 0:
                self._after_death()
            return self._reap()

    def kill(self) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        self._before_kill(proc)
        proc.kill()
        code = proc.wait()
        self._after_death()
        # Without blocking: a start() or stop() running in another thread holds the
        # lock, notices the dead process and cleans up itself.
        if self._lock.acquire(blocking=False):
            try:
                if self._proc is proc:
                    self._reap()
            finally:
                self._lock.release()
        return code

    def restart(self) -> Self:
        """Start again on the same port(s) and data (a graceful stop() first if running)."""
        if self.is_running():
            self.stop()
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -------------------------------------------------------------------- internals

    def _spawn(
        self, cmd: Sequence[str], log_path: Path, banner: str, **popen: Any
    ) -> subprocess.Popen[bytes]:
        """Start ``cmd`` with stdout and stderr appended to ``log_path``."""
        self._log_file = log_path.open("ab")
        write_banner(self._log_file, banner)
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                # The log file is opened here, by us, and inherited: it can sit in a
                # workdir the server's user cannot reach.
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                # Own session: a Ctrl-C in the terminal reaches us, not the server, and
                # stop() decides how it goes down.
                start_new_session=True,
                preexec_fn=pdeathsig_preexec() if self.die_with_parent else None,
                **popen,
            )
        except OSError as exc:
            self._reap()
            raise self._error(f"cannot run {cmd[0]}: {exc}") from exc
        self._launched_at = time.monotonic()
        return self._proc

    def _wait_for(
        self,
        probe: Callable[[], T | None],
        deadline: float,
        interval: float,
        why: str,
        *,
        retry_on: tuple[type[BaseException], ...] = (),
        pending: str | None = None,
    ) -> T:
        """Call ``probe`` until it returns a value, failing past ``deadline``.

        A ``retry_on`` error, or ``pending`` for a None, is the last reason; the
        failure says ``why`` and that reason. The process is checked before each try,
        so a server that dies while booting fails now, not at the deadline.
        """
        last: object = None
        while True:
            self._check_alive()
            try:
                result = probe()
            except retry_on as exc:
                last = exc
            else:
                if result is not None:
                    return result
                last = pending
            if time.monotonic() > deadline:
                self._fail(why if last is None else f"{why} ({last})")
            time.sleep(interval)

    def _terminate(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        signals = list(self._stop_signals)
        for i, sig in enumerate(signals):
            proc.send_signal(sig)
            try:
                proc.wait(timeout if i == 0 else FALLBACK_STOP_TIMEOUT)
                return
            except subprocess.TimeoutExpired:
                then = f"sending {signals[i + 1].name}" if i + 1 < len(signals) else "killing it"
                self._log.warning(
                    "%s at %s ignored %s; %s", self._what, self._address, sig.name, then
                )
        proc.kill()
        proc.wait()

    def _check_alive(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            code = None if self._proc is None else self._proc.returncode
            self._fail(f"{self._process_what} exited during startup (exit {code})")

    def _fail(self, why: str) -> NoReturn:
        raise self._error(
            f"{self._what} in {self.workdir} did not become ready "
            f"(ready_timeout={self.ready_timeout:.0f}s): {why}\n{self._fail_logs()}"
        )

    def _hard_stop(self) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._after_death()
        return self._reap()

    def _reap(self) -> int | None:
        code = self._proc.returncode if self._proc is not None else None
        self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self._running.discard(self)
        return code

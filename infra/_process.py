"""What the server controllers (``infra.kafka_broker``, ``infra.postgres``) share: one
server process run in the foreground as our child, on loopback, with its output in a
log file in the workdir.

``ManagedServer`` holds the life cycle (start, graceful stop with fallback, SIGKILL,
restart), the faults a test injects into it (a pause, an outage), the readiness wait
and its error; each subclass says how its server is prepared, launched and probed, and
what a crash leaves behind to clean up.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable, Iterable, Iterator, MutableSet, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, ClassVar, Literal, NoReturn, Self, TypeVar

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


def unread_bytes(ports: Iterable[int]) -> int:
    """Bytes the kernel received on established loopback connections to ``ports`` that
    the listening process has not read yet (Linux: /proc/net/tcp*; 0 elsewhere).

    While a server is paused this is how a test knows a client's request has reached
    it, and will be served the moment it resumes: a pause "in the middle of a commit"
    becomes a condition to wait on instead of a sleep that guesses.
    """
    wanted = {f"{port:04X}" for port in ports}
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            # sl local_address rem_address st tx_queue:rx_queue ...
            fields = row.split()
            if len(fields) < 5 or fields[3] != "01":  # 01: ESTABLISHED
                continue
            if fields[1].rpartition(":")[2] in wanted:
                total += int(fields[4].partition(":")[2], 16)
    return total


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


def _thread_states(pid: int) -> list[str] | None:
    """The scheduler state letter of each thread of ``pid`` (None: cannot tell here)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return [] if sys.platform.startswith("linux") else None
    states = []
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue  # the thread exited meanwhile
        # The state follows the command name, which is in parentheses and may hold spaces.
        fields = stat.rpartition(")")[2].split()
        if fields:
            states.append(fields[0])
    return states


def is_stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` is stopped (SIGSTOP delivered and taken).

    Every thread, not the main one only: a JVM's main thread parks early, and SIGSTOP is
    taken by each thread on its way back to user space; a test that goes on before the
    last one stopped could still be served by a thread that is "paused".
    """
    states = _thread_states(pid)
    if states is None:
        return False
    return bool(states) and all(state == "T" for state in states)


def is_continued(pid: int) -> bool:
    """Whether no thread of ``pid`` is stopped any more (SIGCONT taken by all)."""
    states = _thread_states(pid)
    return states is None or all(state != "T" for state in states)


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


def wait_until(
    probe: Callable[[], T | None],
    deadline: float,
    interval: float,
    why: str,
    *,
    check: Callable[[], None],
    fail: Callable[[str], NoReturn],
    retry_on: tuple[type[BaseException], ...] = (),
    pending: str | None = None,
) -> T:
    """Call ``probe`` until it returns a value, calling ``fail`` past ``deadline``.

    A ``retry_on`` error, or ``pending`` for a None, is the last reason; the failure
    says ``why`` and that reason. ``check`` runs before each try (it raises when the
    server died), so a server that dies while we wait fails now, not at the deadline.
    """
    last: object = None
    while True:
        check()
        try:
            result = probe()
        except retry_on as exc:
            last = exc
        else:
            if result is not None:
                return result
            last = pending
        if time.monotonic() > deadline:
            fail(why if last is None else f"{why} ({last})")
        time.sleep(interval)


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
                if is_stopped(proc.pid):
                    # A paused server cannot act on SIGTERM: it would sit out the whole
                    # timeout and be killed, losing the graceful stop asked for.
                    os.killpg(proc.pid, signal.SIGCONT)
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

    # ------------------------------------------------------------------ faults

    def pause(self) -> None:
        """SIGSTOP the server: every thread freezes where it is, as in a long GC pause,
        a stalled disk or a VM migration. Returns once all of them are stopped.

        The whole process group is stopped (a server that forks, PostgreSQL, stops with
        all its backends). Its sockets stay open: clients connect and send, and nothing
        answers until resume(); peers that time it out meanwhile (a cluster fencing a
        broker, a coordinator moving) are what such a test is about.
        """
        proc = self._require_running("pause")
        os.killpg(proc.pid, signal.SIGSTOP)
        self._wait_signal_taken(proc, is_stopped, "it stopped")

    def resume(self) -> None:
        """SIGCONT: a paused server goes on from the instruction where it stopped, with
        the requests that arrived meanwhile waiting in its sockets."""
        proc = self._require_running("resume")
        os.killpg(proc.pid, signal.SIGCONT)
        self._wait_signal_taken(proc, is_continued, "it continued")

    def is_paused(self) -> bool:
        """Whether the server's process is stopped (by pause() or a SIGSTOP of anyone's)."""
        proc = self._proc
        return proc is not None and proc.poll() is None and is_stopped(proc.pid)

    @contextlib.contextmanager
    def paused(self) -> Iterator[Self]:
        """``with server.paused():`` the server is frozen for the block, resumed after it
        (also when the block raises)."""
        self.pause()
        try:
            yield self
        finally:
            if self.is_running():
                self.resume()

    @contextlib.contextmanager
    def down(self, *, kill: bool = True) -> Iterator[Self]:
        """``with server.down():`` an outage for the block: SIGKILL (or, with
        ``kill=False``, a graceful stop) on entry, start() on the same ports and data on
        exit, which returns once the server is ready again (also when the block raises).
        """
        if kill:
            self.kill()
        else:
            self.stop()
        try:
            yield self
        finally:
            self.start()

    def outage(self, seconds: float, *, how: Literal["kill", "stop", "pause"] = "kill") -> None:
        """An outage of ``seconds``: the server is SIGKILLed, stopped gracefully or
        paused, then, that long later, started again (ready) or resumed."""
        if how == "pause":
            with self.paused():
                time.sleep(seconds)
        else:
            with self.down(kill=how == "kill"):
                time.sleep(seconds)

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
        """``wait_until`` for this server: its death or the deadline fails the start."""
        return wait_until(
            probe,
            deadline,
            interval,
            why,
            check=self._check_alive,
            fail=self._fail,
            retry_on=retry_on,
            pending=pending,
        )

    def _require_running(self, what: str) -> subprocess.Popen[bytes]:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise self._error(f"cannot {what} {self._what} in {self.workdir}: it is not running")
        return proc

    def _wait_signal_taken(
        self, proc: subprocess.Popen[bytes], done: Callable[[int], bool], what: str
    ) -> None:
        # Delivery is asynchronous: without this wait, "paused" would only mean "asked
        # to pause". Seconds are plenty: a thread in uninterruptible disk sleep takes
        # the signal when its I/O returns.
        if _thread_states(proc.pid) is None:
            return  # no /proc here: the signal was sent, and that is all we can tell
        deadline = time.monotonic() + 30
        while not done(proc.pid):
            if proc.poll() is not None:
                raise self._error(f"{self._what} at {self._address} died before {what}")
            if time.monotonic() > deadline:
                raise self._error(f"{self._what} at {self._address}: no {what} within 30s")
            time.sleep(0.005)

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

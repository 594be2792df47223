"""Runs an App in a child process that can be SIGKILLed and restarted.

Used by `onceflow chaos`, the demo and the crash tests: the child is a real process,
so a kill is a real kill -9 at whatever instruction it was running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping

from ._crash import CRASH_ENV, PAUSE_ENV


class Child:
    """One incarnation of the App process: `python -m onceflow._worker TARGET`."""

    def __init__(
        self,
        target: str,
        *,
        store: str,
        until_idle: bool = False,
        crash_at: str | None = None,
        pause_at: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        full = dict(os.environ)
        full.update(env or {})
        full.pop(CRASH_ENV, None)
        full.pop(PAUSE_ENV, None)
        if crash_at:
            full[CRASH_ENV] = crash_at
        if pause_at:
            full[PAUSE_ENV] = pause_at
        cmd = [sys.executable, "-m", "onceflow._worker", target, "--store", store]
        if until_idle:
            cmd.append("--until-idle")
        # stderr goes to a file, not a pipe: a child that logs more than a pipe buffer
        # holds (one line per dead letter, say) would block on a pipe nobody reads.
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the child
        self.proc = subprocess.Popen(
            cmd, env=full, cwd=cwd, stdout=subprocess.DEVNULL, stderr=self._err
        )

    def kill(self) -> None:
        """SIGKILL: no handler runs, no buffer is flushed, nothing is committed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 75.0) -> int:
        """SIGTERM, which makes the App commit and exit; SIGKILL if it does not. The
        last commit may first need a new transactional producer on Kafka (after an
        outage), whose init waits up to the client's 30 s timeout for the coordinator:
        on a loaded machine a clean stop takes longer than that."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def pause(self) -> None:
        """SIGSTOP from outside: every thread stops where it is, heartbeats included."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: a paused child goes on from where it stopped, a zombie if another
        process took over meanwhile."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def stopped(self) -> bool:
        """Whether the child is stopped (by SIGSTOP, its own at a pause point or ours)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                # The state follows the command name, which is in parentheses.
                return f.read().rpartition(")")[2].split()[0] == "T"
        except (FileNotFoundError, IndexError):
            return False

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    @property
    def killed(self) -> bool:
        return self.proc.returncode == -signal.SIGKILL

    def stderr(self) -> str:
        """What the child wrote to stderr so far."""
        try:
            self._err.seek(0)
            return self._err.read().decode(errors="replace")
        except ValueError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None


def wait_until(pred: object, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(pred) and pred():
            return True
        time.sleep(interval)
    return False

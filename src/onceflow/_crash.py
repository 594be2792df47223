"""Fault injection at named steps of the protocol: a crash (SIGKILL) or a pause.

Set `ONCEFLOW_CRASH_AT=<point>[:<n>]` to die the n-th time (default 1st) the runner
reaches `<point>`. Set `ONCEFLOW_PAUSE_AT=<point>[:<n>][@<seconds>]` to pause there
instead: without `@<seconds>` the process stops itself with SIGSTOP (every thread,
heartbeats included, as in a VM migration) until someone sends SIGCONT; with it, the
thread that reached the point stalls that long while the others go on (a GC pause, a
slow disk). A paused process that resumes after another took over is a zombie: every
durable write it then tries must be refused. The tests and `onceflow chaos` use both to
fault every step.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

CRASH_POINTS: tuple[str, ...] = (
    "after_poll",  # a batch is in memory, nothing processed
    "mid_batch",  # the epoch buffer holds part of an epoch
    "before_commit",  # the epoch is complete in memory, no transaction open
    "in_transaction",  # everything is written inside the open transaction, not committed
    "after_commit",  # the transaction is durable, after-commit work not done
    "sink_flush",  # an idempotent sink is half-way through delivering a committed epoch
    "sink_delivered",  # an idempotent sink delivered; its new position is not recorded yet
    "sink_prepared",  # an external sink prepared its transaction; the store has not committed
    "effect_called",  # a journalled effect was called; its response is not journalled yet
)

# Steps of the Kafka backend's restore, outside the commit protocol. Reached only when a
# worker rebuilds a partition's state, so `onceflow chaos` and the demo do not aim at them.
RESTORE_POINTS: tuple[str, ...] = (
    "restoring",  # offsets are stable and the changelogs' ends known; nothing read yet
)

CRASH_ENV = "ONCEFLOW_CRASH_AT"
PAUSE_ENV = "ONCEFLOW_PAUSE_AT"


class SimulatedCrash(BaseException):
    """Raised instead of SIGKILL by an in-process crash injector (`mode="raise"`).

    A BaseException, so that no `except Exception` in user or library code swallows it:
    like a kill, it ends `App.run()` wherever it happens, with no further commit.
    """


def _parse(spec: str, what: str) -> tuple[str, int, float | None]:
    """`<point>[:<n>][@<seconds>]` into (point, n, seconds or None)."""
    body, _, secs = spec.partition("@")
    point, _, n = body.partition(":")
    if point not in CRASH_POINTS + RESTORE_POINTS:
        from ._errors import ConfigError

        points = ", ".join(CRASH_POINTS + RESTORE_POINTS)
        raise ConfigError(f"{what} point {spec!r} is unknown; use one of {points}")
    try:
        nth = int(n) if n else 1
        seconds = float(secs) if secs else None
    except ValueError:
        from ._errors import ConfigError

        raise ConfigError(
            f"{what} {spec!r} is malformed; write <point>[:<n>]"
            + ("[@<seconds>]" if what == "pause" else "")
        ) from None
    return point, nth, seconds


class CrashInjector:
    """Called with each protocol step's name; crashes or pauses at the armed one.

    `mode="kill"` SIGKILLs the process, `mode="raise"` raises `SimulatedCrash` (for
    in-process tests). A pause calls `on_pause(point)` when given (an in-process test
    blocks the thread there until its successor is done), otherwise it stalls for the
    spec's seconds, or SIGSTOPs the whole process.
    """

    def __init__(
        self,
        spec: str | None,
        mode: str = "kill",
        *,
        pause: str | None = None,
        on_pause: Callable[[str], None] | None = None,
    ) -> None:
        self.mode = mode
        self.crashed = False
        self.paused = False
        self.point: str | None = None
        self.countdown = 0
        self.pause_point: str | None = None
        self.pause_countdown = 0
        self.pause_seconds: float | None = None
        self.on_pause = on_pause
        if spec:
            self.point, self.countdown, _ = _parse(spec, "crash")
        if pause:
            self.pause_point, self.pause_countdown, self.pause_seconds = _parse(pause, "pause")

    def __call__(self, point: str) -> None:
        if point == self.pause_point and not self.paused:
            self.pause_countdown -= 1
            if self.pause_countdown <= 0:
                self.paused = True
                self._pause(point)
        if point != self.point:
            return
        self.countdown -= 1
        if self.countdown <= 0:
            self.crashed = True
            if self.mode == "raise":
                raise SimulatedCrash(point)
            os.kill(os.getpid(), signal.SIGKILL)

    def _pause(self, point: str) -> None:
        if self.on_pause is not None:
            self.on_pause(point)
        elif self.pause_seconds is not None:
            time.sleep(self.pause_seconds)
        else:
            os.kill(os.getpid(), signal.SIGSTOP)


def from_env() -> CrashInjector:
    return CrashInjector(os.environ.get(CRASH_ENV), pause=os.environ.get(PAUSE_ENV))

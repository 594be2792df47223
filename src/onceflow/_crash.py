"""Crash-point injection: the process SIGKILLs itself at a named step of the protocol.

Set `ONCEFLOW_CRASH_AT=<point>[:<n>]` to die the n-th time (default 1st) the runner
reaches `<point>`. The tests and `onceflow chaos` use it to crash at every step.
"""

from __future__ import annotations

import os
import signal

CRASH_POINTS: tuple[str, ...] = (
    "after_poll",  # a batch is in memory, nothing processed
    "mid_batch",  # the epoch buffer holds part of an epoch
    "before_commit",  # the epoch is complete in memory, no transaction open
    "in_transaction",  # everything is written inside the open transaction, not committed
    "after_commit",  # the transaction is durable, after-commit work not done
    "sink_flush",  # an idempotent sink is half-way through delivering a committed epoch
    "sink_prepared",  # an external sink prepared its transaction; the store has not committed
    "effect_called",  # a journalled effect was called; its response is not journalled yet
)


class SimulatedCrash(BaseException):
    """Raised instead of SIGKILL by an in-process crash injector (`mode="raise"`).

    A BaseException, so that no `except Exception` in user or library code swallows it:
    like a kill, it ends `App.run()` wherever it happens, with no further commit.
    """


class CrashInjector:
    def __init__(self, spec: str | None, mode: str = "kill") -> None:
        self.mode = mode
        self.crashed = False
        self.point: str | None = None
        self.countdown = 0
        if spec:
            point, _, n = spec.partition(":")
            if point not in CRASH_POINTS:
                from ._errors import ConfigError

                points = ", ".join(CRASH_POINTS)
                raise ConfigError(f"crash point {spec!r} is unknown; use one of {points}")
            self.point = point
            self.countdown = int(n) if n else 1

    def __call__(self, point: str) -> None:
        if point != self.point:
            return
        self.countdown -= 1
        if self.countdown <= 0:
            self.crashed = True
            if self.mode == "raise":
                raise SimulatedCrash(point)
            os.kill(os.getpid(), signal.SIGKILL)


def from_env() -> CrashInjector:
    return CrashInjector(os.environ.get("ONCEFLOW_CRASH_AT"))

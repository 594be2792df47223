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
)


class CrashInjector:
    def __init__(self, spec: str | None) -> None:
        self.point: str | None = None
        self.countdown = 0
        if spec:
            point, _, n = spec.partition(":")
            if point not in CRASH_POINTS:
                from ._errors import ConfigError

                raise ConfigError(
                    f"ONCEFLOW_CRASH_AT={spec!r}: unknown point; use one of {', '.join(CRASH_POINTS)}"
                )
            self.point = point
            self.countdown = int(n) if n else 1

    def __call__(self, point: str) -> None:
        if point != self.point:
            return
        self.countdown -= 1
        if self.countdown <= 0:
            os.kill(os.getpid(), signal.SIGKILL)


def from_env() -> CrashInjector:
    return CrashInjector(os.environ.get("ONCEFLOW_CRASH_AT"))

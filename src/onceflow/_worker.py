"""`python -m onceflow._worker MODULE:APP [--store S] [--until-idle]`: a chaos child.

`--store` replaces the App's own store, so chaos runs a user's pipeline on a scratch
store and never on the one it uses in production. Exits 0 when stopped or idle,
`FENCED_EXIT` when another process took over (a `FencedError`: the store's lease, the
Kafka slot, or a sink's own fence), 1 on any other onceflow error.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

from ._errors import FencedError, OnceflowError
from ._loader import load_app

# Chaos tells a zombie or a twin that was fenced, as it must be, from one that failed.
FENCED_EXIT = 3


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if not argv:
        print("usage: python -m onceflow._worker MODULE:APP [--until-idle]", file=sys.stderr)
        return 2
    # A SIGTERM during import must stop the worker cleanly too, not kill it half-way:
    # it is remembered and handed to the App, whose run() then commits and returns.
    current: dict[str, Any] = {"app": None, "stopped": False}

    def on_term(*_: object) -> None:
        current["stopped"] = True
        if current["app"] is not None:
            current["app"].stop()

    signal.signal(signal.SIGTERM, on_term)
    try:
        app = load_app(argv[0])
        if "--store" in argv:
            app.store = argv[argv.index("--store") + 1]
        current["app"] = app
        if current["stopped"]:
            return 0  # stopped before it started: nothing to commit
        app.run(until_idle="--until-idle" in argv[1:])
    except FencedError as exc:
        print(f"onceflow: {exc}", file=sys.stderr)
        return FENCED_EXIT
    except OnceflowError as exc:
        print(f"onceflow: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The pipelines of `pipelines.py` with onceflow's INFO log on, for child processes whose
progress a test reads from their stderr (the test process itself is left as it is)."""

from __future__ import annotations

import logging

from . import pipelines

logging.getLogger("onceflow").setLevel(logging.INFO)

counts_app = pipelines.counts()

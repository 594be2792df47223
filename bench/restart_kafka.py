"""Restart cost: after a kill -9, how soon does the restarted App commit again?

    .venv/bin/python bench/restart_kafka.py              # 1,000,000 keys over 4 partitions
    .venv/bin/python bench/restart_kafka.py --quick      # 100,000 keys, 3 runs
    .venv/bin/python bench/restart_kafka.py --no-embedded

The App is the bench pipeline (running sum per key, `_common.build_pipeline`) over 4
partitions with one distinct key per event, so N events leave N keys of state: on Kafka
in the local stores of the partitions (SQLite files, kept across restarts) and their
changelogs, embedded in the SQLite store. Set-up (untimed): the N events through the App,
run until idle in this process; then one warm-up incarnation in a child process, killed
(SIGKILL) right after its first commit.

Each timed run: a few more events arrive (`--tail`), a new child process is launched
(`python -m onceflow._worker restart_kafka:app`), and the figure is the wall time from
just before its launch to the end of its first commit, which the child's hook records;
then that child is SIGKILLed too, so the next run restarts after a kill -9 again. Also
shown: when the child's App entered its poll loop (the `recovered` hook): the time spent
on the interpreter, imports, topics and the producer; on Kafka the group join and the
restore of the partitions' state come after it, inside the first polls.
Reported: the median of `--runs`, and every run. Kafka starts its own single-node broker
(infra/kafka_broker.py) in a temp dir and stops it at the end. Figures go to stdout and
to bench/out/restart.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import onceflow
from _common import build_pipeline, event_items, stderr_logger, summary_head, write_json
from onceflow import App, Hooks, Producer
from onceflow._supervisor import Child

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
OUT_JSON = BENCH_DIR / "out" / "restart.json"
PARTITIONS = 4
APP_NAME = "restart"
TARGET = "restart_kafka:app"
# Where the child writes when it recovered and when its first commit finished.
MARKS_ENV = "ONCEFLOW_BENCH_MARKS"

log = stderr_logger("bench-restart")


class Marks(Hooks):
    """Writes wall-clock times to the file named by ONCEFLOW_BENCH_MARKS: when the App
    entered its poll loop, and when its first commit finished."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.committed = False

    def _mark(self, what: str) -> None:
        with open(self.path, "a") as f:
            f.write(f"{what} {time.time():.6f}\n")

    def recovered(self, seconds: float, positions: dict[tuple[str, int], int]) -> None:
        self._mark("recovered")

    def commit_finished(
        self, epoch: int, records_in: int, records_out: int, seconds: float
    ) -> None:
        if not self.committed:
            self.committed = True
            self._mark("commit")


def app() -> App:
    """The App of every incarnation; the worker sets the store."""
    hooks: list[Hooks] = [Marks(os.environ[MARKS_ENV])] if os.environ.get(MARKS_ENV) else []
    a = App(APP_NAME, partitions=PARTITIONS, commit_interval=0.1, hooks=hooks)
    build_pipeline(a)
    return a


def send(store: str, start: int, stop: int, keys: int) -> None:
    """Events start..stop-1 over `keys` keys (event i has key acct-<i % keys>)."""
    with Producer(store, partitions=PARTITIONS) as p:
        for lo in range(start, stop, 50_000):
            p.send_batch("in", event_items(lo, min(stop, lo + 50_000), keys))


def read_marks(path: Path) -> dict[str, float]:
    try:
        return {k: float(v) for k, v in (line.split() for line in path.read_text().splitlines())}
    except FileNotFoundError:
        return {}


def incarnation(store: str, env: dict[str, str], marks: Path) -> tuple[float, float]:
    """Launch a child, wait for its first commit, SIGKILL it. Seconds from the launch
    to its poll loop and to the end of its first commit."""
    marks.unlink(missing_ok=True)
    t0 = time.time()
    child = Child(TARGET, store=store, env={**env, MARKS_ENV: str(marks)}, cwd=str(BENCH_DIR))
    try:
        deadline = time.monotonic() + 120
        while "commit" not in (m := read_marks(marks)):
            if not child.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the App did not commit:\n{child.stderr()[-3000:]}")
            time.sleep(0.002)
    finally:
        child.kill()
    return m["recovered"] - t0, m["commit"] - t0


def measure(
    name: str, store: str, env: dict[str, str], keys: int, runs: int, tail: int, work: Path
) -> dict[str, Any]:
    log(f"{name}: set-up, {keys:,} keys over {PARTITIONS} partitions")
    for k, v in env.items():
        os.environ[k] = v
    send(store, 0, keys, keys)
    t = time.monotonic()
    a = app()
    a.store = store
    a.run(until_idle=True)
    log(f"{name}: state built in {time.monotonic() - t:.1f}s; warm-up incarnation, kill -9")
    marks = work / f"{name}.marks"
    sent = keys
    send(store, sent, sent + tail, keys)
    sent += tail
    incarnation(store, env, marks)
    recovered, committed, load = [], [], []
    for i in range(runs):
        send(store, sent, sent + tail, keys)
        sent += tail
        load.append(os.getloadavg()[0])
        r, c = incarnation(store, env, marks)
        recovered.append(r)
        committed.append(c)
        log(
            f"{name} run {i + 1}: poll loop after {r:.3f}s, first commit after {c:.3f}s "
            f"(load average {load[-1]:.1f})"
        )
    return {
        "keys": keys,
        "median_first_commit_s": round(statistics.median(committed), 3),
        "median_poll_loop_s": round(statistics.median(recovered), 3),
        "first_commit_s": [round(x, 3) for x in committed],
        "poll_loop_s": [round(x, 3) for x in recovered],
        # Other work on the machine moves every figure: the 1-minute load average at the
        # start of each run.
        "load_average": [round(x, 1) for x in load],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--keys", type=int, default=None, help="keys of state (1,000,000)")
    p.add_argument("--runs", type=int, default=None, help="timed restarts per backend (5)")
    p.add_argument("--tail", type=int, default=2000, help="events sent before each restart")
    p.add_argument("--quick", action="store_true", help="100,000 keys, 3 runs")
    p.add_argument("--no-embedded", action="store_true")
    p.add_argument("--no-kafka", action="store_true")
    p.add_argument("--json", type=Path, default=OUT_JSON)
    args = p.parse_args(argv)
    keys = args.keys or (100_000 if args.quick else 1_000_000)
    runs = args.runs or (3 if args.quick else 5)
    # The children import this module from bench/ and onceflow from wherever we did.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(Path(onceflow.__file__).parent.parent), str(REPO), os.environ.get("PYTHONPATH", "")]
    )
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="onceflow-restart-") as tmp:
        work = Path(tmp)
        if not args.no_embedded:
            store = str(work / "store.db")
            figures["embedded"] = measure("embedded", store, {}, keys, runs, args.tail, work)
        if not args.no_kafka:
            sys.path.insert(0, str(REPO))
            from infra.kafka_broker import KafkaBroker

            with KafkaBroker(work / "kafka") as broker:
                store = f"kafka://{broker.bootstrap}/r{uuid.uuid4().hex[:8]}"
                env = {"ONCEFLOW_STATE_DIR": str(work / "state")}
                figures["kafka"] = measure("kafka", store, env, keys, runs, args.tail, work)
    print(f"\nRestart after kill -9: {keys:,} keys over {PARTITIONS} partitions, {runs} runs")
    if any(max(f["load_average"]) > (os.cpu_count() or 1) for f in figures.values()):
        print("(the load average exceeded the CPU count during runs: figures are inflated)")
    print(f"{'backend':<10}{'first commit (median)':>24}{'poll loop (median)':>22}   runs (s)")
    for name, f in figures.items():
        print(
            f"{name:<10}{f['median_first_commit_s']:>23.3f}s{f['median_poll_loop_s']:>21.3f}s"
            f"   {', '.join(f'{x:.3f}' for x in f['first_commit_s'])}"
        )
    summary = summary_head(onceflow.__version__)
    summary["params"] = {"keys": keys, "partitions": PARTITIONS, "runs": runs, "tail": args.tail}
    summary["figures"] = figures
    write_json(args.json, summary)
    print(json.dumps(figures, indent=2), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

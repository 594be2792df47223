"""Bytewax 0.21.1 baseline for the keyed running-sum workload.

Run with the interpreter from ``bench/make_baseline_venv.sh bytewax 0.21.1``
(``.venv-bytewax/bin/python``).
Standalone on purpose: it must not import onceflow, so the two engines never share a process
or a dependency set. It imports `_common.py` from its own folder (on ``sys.path`` as the
script's folder; stdlib-only at import), so its input lines and expected totals are the very
code of onceflow's bench.

Workload (kept byte-identical to the onceflow side of the comparison):

* input: N JSON lines, line i = ``{"id":i,"account":"acct-<i % K>","amount":(i*7919) % 1000}``
* pipeline: FileSource -> json.loads -> key on account -> stateful running sum of amount
  -> one output line per event, ``["<account>",<running_sum>]`` (compact JSON) -> FileSink
* recovery on: one recovery partition, ``RecoveryConfig``, ``epoch_interval`` = E ms

Prints one JSON object per epoch setting to stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import bytewax.operators as op
from bytewax.connectors.files import FileSink, FileSource
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import run_main

from _common import event_bytes
from _common import expected_totals as expected_totals_by_index

# bytewax 0.21 has no __version__ attribute, so ask the installed distribution.
BYTEWAX_VERSION = version("bytewax")
EXPECTED_VERSION = "0.21.1"
COMPACT = (",", ":")


def log(msg: str) -> None:
    print(f"[bytewax-baseline] {msg}", file=sys.stderr, flush=True)


def write_input(path: Path, events: int, keys: int) -> None:
    with path.open("wb") as f:
        for i in range(events):
            f.write(event_bytes(i, keys))
            f.write(b"\n")


def expected_totals(events: int, keys: int) -> dict[str, int]:
    # Computed independently of the input file so a corrupted input can't hide a wrong result.
    totals = expected_totals_by_index(events, keys)
    return {f"acct-{k}": total for k, total in enumerate(totals)}


def add_amount(total: int | None, event: dict[str, Any]) -> tuple[int, int]:
    # No per-event type checks: they would add cost the onceflow side doesn't pay.
    new_total = (total or 0) + event["amount"]
    return new_total, new_total


def format_output(item: tuple[str, int]) -> tuple[str, str]:
    # 0.21 sinks take (key, value) pairs for partition routing (FileSink's docstring says
    # plain strings, which is stale); only the value string is written to the file.
    return item[0], json.dumps(item, separators=COMPACT)


def build_flow(input_path: Path, output_path: Path) -> Dataflow:
    flow = Dataflow("running_sum")
    lines = op.input("inp", flow, FileSource(input_path))
    events = op.map("parse", lines, json.loads)
    keyed = op.key_on("key", events, lambda e: e["account"])
    sums = op.stateful_map("sum", keyed, add_amount)
    op.output("out", op.map("fmt", sums, format_output), FileSink(output_path))
    return flow


def verify(output_path: Path, events: int, expected: dict[str, int]) -> None:
    last: dict[str, int] = {}
    count = 0
    with output_path.open(encoding="utf-8") as f:
        for line in f:
            account, total = json.loads(line)
            last[account] = total
            count += 1
    if count != events:
        raise RuntimeError(f"output has {count} lines, expected {events}")
    if last != expected:
        bad = sorted(k for k in expected.keys() | last.keys() if last.get(k) != expected.get(k))
        raise RuntimeError(f"{len(bad)} keys have a wrong final sum, e.g. {bad[:5]}")


def run_once(workdir: Path, input_path: Path, epoch_ms: int, run: int) -> tuple[float, Path]:
    # Fresh recovery dir and output file per run: a leftover snapshot would make bytewax
    # resume instead of processing the whole input.
    run_dir = workdir / f"epoch{epoch_ms}-run{run}"
    shutil.rmtree(run_dir, ignore_errors=True)
    db_dir = run_dir / "recovery"
    db_dir.mkdir(parents=True)
    init_db_dir(db_dir, 1)
    output_path = run_dir / "out.jsonl"

    flow = build_flow(input_path, output_path)
    start = time.perf_counter()
    run_main(
        flow,
        epoch_interval=timedelta(milliseconds=epoch_ms),
        recovery_config=RecoveryConfig(db_dir),
    )
    return time.perf_counter() - start, output_path


def parse_epochs(values: list[str] | None) -> list[int]:
    raw = values or ["100,1000"]
    epochs = [int(part) for value in raw for part in value.split(",") if part.strip()]
    if not epochs or any(e <= 0 for e in epochs):
        raise argparse.ArgumentTypeError("--epoch-ms values must be positive integers")
    return epochs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--keys", type=int, default=1000)
    p.add_argument(
        "--epoch-ms",
        action="append",
        help="epoch interval in ms; repeatable or comma list (default 100,1000)",
    )
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workdir", type=Path, help="default: a temp dir removed afterwards")
    args = p.parse_args(argv)
    if args.events <= 0 or args.keys <= 0 or args.runs <= 0:
        p.error("--events, --keys and --runs must be positive")
    try:
        args.epoch_ms = parse_epochs(args.epoch_ms)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        p.error(str(exc))
    return args


def results(args: argparse.Namespace, workdir: Path) -> Iterator[dict[str, object]]:
    input_path = workdir / "input.jsonl"
    log(f"writing {args.events} events over {args.keys} keys to {input_path}")
    write_input(input_path, args.events, args.keys)
    expected = expected_totals(args.events, args.keys)

    for epoch_ms in args.epoch_ms:
        rates: list[float] = []
        for run in range(args.runs):
            seconds, output_path = run_once(workdir, input_path, epoch_ms, run)
            verify(output_path, args.events, expected)
            rates.append(args.events / seconds)
            log(f"epoch={epoch_ms}ms run {run + 1}: {seconds:.2f}s, {rates[-1]:,.0f} ev/s, ok")
        yield {
            "engine": "bytewax",
            "version": BYTEWAX_VERSION,
            "epoch_ms": epoch_ms,
            "events": args.events,
            "runs": [round(r, 1) for r in rates],
            "median_eps": round(statistics.median(rates), 1),
        }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if BYTEWAX_VERSION != EXPECTED_VERSION:
        log(f"warning: bytewax {BYTEWAX_VERSION} installed, expected {EXPECTED_VERSION}")

    with tempfile.TemporaryDirectory(prefix="bytewax-bench-") as tmp:
        workdir: Path = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            for row in results(args, workdir):
                print(json.dumps(row), flush=True)
        except RuntimeError as exc:
            log(f"verification failed: {exc}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

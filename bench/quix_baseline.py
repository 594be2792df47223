"""Quix Streams 3.x baseline for the keyed running-sum workload on a real Kafka broker.

Run with the interpreter from ``bench/make_baseline_venv.sh quixstreams 3.28.1``
(``.venv-quixstreams/bin/python``),
against a broker the caller started (``--bootstrap HOST:PORT``, e.g. from
``infra/kafka_broker.py start --dir D``). Standalone on purpose: it must not import onceflow,
so the two engines never share a process or a dependency set. It imports `_common.py` from
its own folder (on ``sys.path`` as the script's folder; stdlib-only at import), so its input,
producer and output check are the very code of onceflow's Kafka bench.

Workload (kept identical to onceflow's Kafka bench):

* input: topic ``quix-in-<uuid>``, 4 partitions, replication 1, pre-produced (untimed) by a
  plain confluent_kafka Producer: event i = ``{"id":i,"account":"acct-<i % K>","amount":
  (i*7919) % 1000}`` (compact JSON), key = the account (utf-8)
* pipeline: ``Application(processing_guarantee=G, commit_interval=S,
  auto_offset_reset="earliest")``, a stateful running sum of amount per key
  (``sdf.apply(fn, stateful=True)``), one output per event, ``["<account>",<running_sum>]``
  (JSON) to a fresh 4-partition output topic
* timed: ``app.run(count=N)`` from its call to its return. quixstreams stops the poll loop
  after the N-th output, then commits its checkpoint (``force=True``: the Kafka transaction
  under exactly-once, the producer flush and the offsets under at-least-once) and closes
  its consumer and state, so by the time ``run()`` returns all N outputs are committed.
  The consumer-group join, partition assignment and the transactional producer's init
  are inside the timer. quixstreams 3.28 checks and creates its topics eagerly, in
  ``app.topic()`` and in ``sdf.apply(stateful=True)`` (the changelog topic), i.e. before
  ``run()``: that setup is timed apart and reported as ``setup_s``, not in ``runs``.

Verified after each run (untimed) with a ``read_committed`` consumer on the output topic:
exactly N records, every key's n-th output equal to the sum of its first n amounts (no
loss, duplicate or reorder), so the last running sum of every key equals its expected total.
Any mismatch exits 1.

Prints one JSON object per invocation to stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal, cast

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic
from quixstreams import Application, State

from _common import (
    Mismatch,
    SumChecker,
    delete_kafka_topics,
    produce_kafka_input,
    read_committed,
)

QUIX_VERSION = version("quixstreams")
EXPECTED_MAJOR = "3."
PARTITIONS = 4

Guarantee = Literal["exactly-once", "at-least-once"]


def log(msg: str) -> None:
    print(f"[quix-baseline] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ topics


def create_topics(bootstrap: str, names: Iterable[str], partitions: int = PARTITIONS) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1) for name in names],
        operation_timeout=30,
        request_timeout=30,
    )
    for future in futures.values():
        future.result()


def delete_topics_containing(bootstrap: str, tag: str) -> None:
    """Delete every topic whose name holds ``tag``: ours and quixstreams' changelogs."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    names = [name for name in admin.list_topics(timeout=30).topics if tag in name]
    if not names:
        return
    delete_kafka_topics(admin, names, log)
    log(f"deleted {len(names)} topics")


# ---------------------------------------------------------------------------- pipeline


def running_sum(value: dict[str, Any], state: State[str, int]) -> list[Any]:
    # No per-event type checks: they would add cost the onceflow side doesn't pay.
    total: int = state.get("sum", 0) + value["amount"]
    state.set("sum", total)
    return [value["account"], total]


def build_app(
    bootstrap: str,
    in_topic: str,
    out_topic: str,
    group: str,
    guarantee: Guarantee,
    commit_interval: float,
    state_dir: Path,
    loglevel: str,
) -> Application:
    app = Application(
        broker_address=bootstrap,
        consumer_group=group,
        processing_guarantee=guarantee,
        commit_interval=commit_interval,
        auto_offset_reset="earliest",
        state_dir=state_dir,
        loglevel=cast(Any, loglevel),
    )
    sdf = app.dataframe(app.topic(in_topic, value_deserializer="json"))
    sdf = sdf.apply(running_sum, stateful=True)
    sdf.to_topic(app.topic(out_topic, value_serializer="json"))
    return app


# ------------------------------------------------------------------------------ verify


def verify(bootstrap: str, topic: str, events: int, keys: int, timeout: float = 120.0) -> None:
    """Read the committed output to its end and check it against a reference fold."""
    checker = SumChecker(keys)

    def check(msg: Any) -> None:
        account, total = json.loads(cast(bytes, msg.value()))
        if msg.key() != account.encode():
            raise Mismatch(f"output key {msg.key()!r} does not match value {account!r}")
        checker.feed(account, total)

    read_committed(bootstrap, topic, PARTITIONS, check, group_prefix="quix-verify", timeout=timeout)
    checker.finish(events)


# --------------------------------------------------------------------------------- run


def run_once(
    args: argparse.Namespace, tag: str, in_topic: str, run: int, tmp: Path
) -> tuple[float, float]:
    """One fresh pipeline (output topic, group, state dir); (setup s, run s)."""
    out_topic = f"quix-out-{tag}-{run}"
    group = f"quix-bench-{tag}-{run}"
    create_topics(args.bootstrap, [out_topic])
    state_dir = tmp / f"state-{run}"
    setup_start = time.perf_counter()
    app = build_app(
        args.bootstrap,
        in_topic,
        out_topic,
        group,
        args.guarantee,
        args.commit_interval,
        state_dir,
        args.quix_loglevel,
    )
    setup = time.perf_counter() - setup_start
    gc.collect()
    start = time.perf_counter()
    # The idle timeout is a safety net only: quixstreams stops after `idle_timeout` s with
    # no message consumed (plus 60 s for the first assignment); the count stops a good run.
    app.run(count=args.events, timeout=args.idle_timeout, collect=False)
    seconds = time.perf_counter() - start
    del app
    verify(args.bootstrap, out_topic, args.events, args.keys)
    return setup, seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--bootstrap", required=True, help="HOST:PORT of a running Kafka broker")
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--keys", type=int, default=1000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--commit-interval", type=float, default=0.1, help="seconds (quixstreams default 5)"
    )
    p.add_argument("--guarantee", choices=["exactly-once", "at-least-once"], default="exactly-once")
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        help="stop a stuck run after this many seconds without input (then verify fails)",
    )
    p.add_argument(
        "--quix-loglevel",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="quixstreams' own log level (its logs go to stderr)",
    )
    p.add_argument("--keep-topics", action="store_true", help="do not delete the bench topics")
    args = p.parse_args(argv)
    if args.events <= 0 or args.keys <= 0 or args.runs <= 0:
        p.error("--events, --keys and --runs must be positive")
    if args.commit_interval < 0 or args.idle_timeout <= 0:
        p.error("--commit-interval must be >= 0 and --idle-timeout > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if not QUIX_VERSION.startswith(EXPECTED_MAJOR):
        log(f"warning: quixstreams {QUIX_VERSION} installed, expected {EXPECTED_MAJOR}x")

    tag = uuid.uuid4().hex[:12]
    in_topic = f"quix-in-{tag}"
    rates: list[float] = []
    setups: list[float] = []
    try:
        with tempfile.TemporaryDirectory(prefix="quix-bench-") as tmp:
            create_topics(args.bootstrap, [in_topic])
            t = time.perf_counter()
            produce_kafka_input(args.bootstrap, in_topic, args.events, args.keys)
            log(
                f"produced {args.events} events over {args.keys} keys to {in_topic} "
                f"in {time.perf_counter() - t:.1f}s"
            )
            for run in range(args.runs):
                setup, seconds = run_once(args, tag, in_topic, run, Path(tmp))
                setups.append(setup)
                rates.append(args.events / seconds)
                log(
                    f"{args.guarantee} commit_interval={args.commit_interval}s run {run + 1}: "
                    f"run {seconds:.2f}s, {rates[-1]:,.0f} ev/s (setup {setup:.2f}s), ok"
                )
    except (RuntimeError, Mismatch) as exc:
        log(f"verification failed: {exc}")
        return 1
    finally:
        if not args.keep_topics:
            try:
                delete_topics_containing(args.bootstrap, tag)
            except KafkaException as exc:
                log(f"warning: topic cleanup failed: {exc}")
    row = {
        "engine": "quixstreams",
        "version": QUIX_VERSION,
        "guarantee": args.guarantee,
        "commit_interval": args.commit_interval,
        "events": args.events,
        "keys": args.keys,
        "runs": [round(r, 1) for r in rates],
        "median_eps": round(statistics.median(rates), 1),
        "setup_s": [round(t, 3) for t in setups],
    }
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

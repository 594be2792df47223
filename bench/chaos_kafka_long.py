"""The long chaos run on Kafka: 100,000 events, 2 workers, every fault kind of `onceflow
chaos` (10 worker kills at random and at every protocol step, pauses at every step with
a takeover, twin workers, twin producers, a starved CPU, 3 hard broker restarts, broker
outages past the group session, the broker paused in a commit), then the full audit.

    .venv/bin/python bench/chaos_kafka_long.py [--events 100000] [--kills 10] [--bounces 3]
        [--rounds 2] [--faults kill,pause,...] [--cluster]

Starts its own broker (infra/kafka_broker.py) in a temp dir and stops it at the end; with
`--cluster`, a three-node KRaft cluster (infra/kafka_cluster.py: replication factor 3,
min ISR 2) instead, where the broker faults hit one node at a time in turn (each is the
leader of some partitions and coordinators).
Exits 0 only when every audit check holds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from infra.kafka_broker import KafkaBroker  # noqa: E402
from infra.kafka_cluster import KafkaCluster  # noqa: E402
from rich.console import Console  # noqa: E402

from onceflow._chaos import render, run_chaos  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--kills", type=int, default=10, help="worker kills in all")
    ap.add_argument("--bounces", type=int, default=3, help="broker SIGKILL + restarts")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="times each other fault runs")
    ap.add_argument("--faults", default=None, help="comma-separated kinds (default: all)")
    ap.add_argument("--cluster", action="store_true", help="three KRaft nodes, RF 3")
    ap.add_argument("--seed", type=int, default=2026)
    args = ap.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="onceflow-chaos-long-") as tmp:
        server: KafkaBroker | KafkaCluster
        if args.cluster:
            cluster = KafkaCluster(Path(tmp) / "cluster")
            server, broker = cluster, cluster.faults(seed=args.seed)
        else:
            server = broker = KafkaBroker(Path(tmp) / "kafka")
        server.start()
        try:
            os.chdir(REPO / "examples")
            t0 = time.monotonic()
            # Five of the kills are at the protocol steps; the rest at random moments.
            result = run_chaos(
                "wallets:app",
                events=args.events,
                kills=max(0, args.kills - 5),
                seed=args.seed,
                workdir=str(Path(tmp) / "chaos"),
                store=f"kafka://{server.bootstrap}",
                workers=args.workers,
                broker=broker,
                broker_kills=args.bounces,
                faults=args.faults.split(",") if args.faults else None,
                rounds=args.rounds,
                progress=lambda msg: console.log(msg),
            )
            render(result, console)
            console.print(f"wall time {time.monotonic() - t0:.0f} s")
        finally:
            server.stop()
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())

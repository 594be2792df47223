"""A real three-node Apache Kafka 4.x KRaft cluster on loopback, for tests and chaos runs
that need broker faults a single broker cannot survive: a leader SIGKILLed, a broker
paused while the others fence it, an outage of one node while the cluster goes on.

Same jars, Java and readiness rules as the single broker (``infra.kafka_broker``);
each node is a combined broker+controller JVM, so three JVMs make both a Raft quorum of
three voters and three brokers holding three replicas of every partition (min ISR 2):

    with KafkaCluster(tmp_path / "cluster") as cluster:
        producer = Producer({"bootstrap.servers": cluster.bootstrap, ...})
        victim = cluster.node(cluster.leader("events", 0))
        victim.kill()                  # SIGKILL the partition's leader
        cluster.wait_for_leader("events", 0, not_on={victim.node_id})
        victim.start()                 # same ports and log dir; back once it serves
        cluster.wait_healthy()         # every partition has its full ISR again
        with cluster.node(2).paused(): # SIGSTOP ... SIGCONT
            ...

Manual use: ``python infra/kafka_cluster.py start --dir /tmp/cluster`` (see
docs/kafka-broker.md).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Self

if not __package__:
    # Run as a script (`python infra/kafka_cluster.py`): `infra` is not importable yet.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra._process import is_stopped, pick_port, wait_until
from infra.kafka_broker import (
    _BASE_CONFIG,
    KafkaBroker,
    KafkaBrokerError,
    _confluent_kafka,
    _new_cluster_id,
    answers_requests,
    coordinator_partition,
    coordinator_partitions,
    find_java,
    quiet_client_config,
    resolve,
    wait_transactions,
)

__all__ = ["NODES", "KafkaCluster", "KafkaNode", "NodeFaults"]

#: Nodes in a cluster: the fewest with which one can die (SIGKILL, pause, outage) while
#: the Raft quorum keeps a majority and every partition keeps min.insync.replicas.
NODES = 3

_log = logging.getLogger("onceflow.infra.kafka")

# What the cluster changes in the single broker's settings (infra.kafka_broker's
# _BASE_CONFIG, which says why the others are there). Tests can override any of them
# (server_config=).
_CLUSTER_CONFIG: dict[str, str] = {
    # Every partition, the internal ones included, on all three nodes, and a write
    # acknowledged (acks=all, which transactional producers use) only once two of them
    # hold it: one node can die at any instant and no acknowledged record, committed
    # offset or transaction state is lost, while the two left still take writes.
    "default.replication.factor": str(NODES),
    "min.insync.replicas": str(NODES - 1),
    "offsets.topic.replication.factor": str(NODES),
    "transaction.state.log.replication.factor": str(NODES),
    "transaction.state.log.min.isr": str(NODES - 1),
    "share.coordinator.state.topic.replication.factor": str(NODES),
    "share.coordinator.state.topic.min.isr": str(NODES - 1),
    # The default, pinned because the guarantee rests on it: a replica that fell out of
    # the ISR never becomes leader, so a failover cannot drop acknowledged records.
    "unclean.leader.election.enable": "false",
}

# Heap per node. Three of them run beside the suite's own broker and PostgreSQL; an
# idle node at this size has a resident set of about 320 MB.
DEFAULT_HEAP = "384m"

# Nodes started and not yet stopped, for the module's atexit handler (stopped all at
# once: see _stop_all).
_nodes: weakref.WeakSet[KafkaBroker] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    with contextlib.suppress(Exception):
        _stop_all(list(_nodes), timeout=10)


def _stop_all(nodes: Iterable[KafkaBroker], timeout: float | None) -> None:
    """Stop nodes in parallel. One after the other, the last ones would have no quorum
    left to acknowledge their controlled shutdown and sit out the whole timeout."""
    threads = [
        threading.Thread(target=node.stop, args=(timeout,), name=f"stop-{node.bootstrap}")
        for node in nodes
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


# Seconds per try of a wait's metadata request. A client sends it to any node it is
# connected to, a paused one included, which holds it until this timeout: short tries,
# and the next one likely goes elsewhere.
_TRY_S = 2.0


class _NotYet(Exception):
    """A health probe's reason to try again."""


class KafkaNode(KafkaBroker):
    """One combined broker+controller node of a ``KafkaCluster``: a ``KafkaBroker`` with
    the pause, outage and kill of one (``pause()``, ``paused()``, ``down()``,
    ``outage()``, ``kill()``).

    ``start()`` on a node of a running cluster returns once this node, the new
    incarnation, serves requests (it re-registered and caught up with the metadata);
    its replicas may still be catching up: ``cluster.wait_healthy()`` waits for those.
    """

    _what = "Kafka node"
    _running = _nodes
    _defaults = {**_BASE_CONFIG, **_CLUSTER_CONFIG}
    # C1 only: three JVMs booting at once on two cores spend a third of their start-up
    # CPU in the C2 compiler (measured: 6 s instead of 9 s of CPU per node to ready, 4.5
    # instead of 7 s for a restart), and test traffic never needs C2's peak speed.
    _extra_jvm_flags = ("-XX:TieredStopAtLevel=1",)

    def __init__(
        self,
        cluster: KafkaCluster,
        node_id: int,
        workdir: Path,
        ports: tuple[int, int],
        *,
        heap: str,
        ready_timeout: float,
        stop_timeout: float,
        server_config: Mapping[str, str | int] | None,
        die_with_parent: bool,
    ) -> None:
        self.node_id = node_id
        self._cluster = cluster
        self._ports = ports
        super().__init__(
            workdir,
            ports[0],
            heap=heap,
            ready_timeout=ready_timeout,
            wait_transactions=False,  # the cluster probes transactions, once for all nodes
            stop_timeout=stop_timeout,
            server_config=server_config,
            die_with_parent=die_with_parent,
        )

    def __repr__(self) -> str:
        state = "paused" if self.is_paused() else "running" if self.is_running() else "stopped"
        return f"KafkaNode({self.node_id}, bootstrap={self.bootstrap!r}, {state})"

    @property
    def _ready_what(self) -> str:
        return f"Kafka node {self.node_id}"

    def _identity(self, state: Mapping[str, Any], port: int | None) -> tuple[str, int, int]:
        # Chosen by the cluster (cluster.json): every node's config names every voter.
        return self._cluster.cluster_id, self._ports[0], self._ports[1]

    def _node_settings(self) -> dict[str, str]:
        settings = super()._node_settings()
        # A static quorum of all nodes (kraft.version 0), formatted without flags: the
        # same voter set in every node's config, and no dynamic-quorum bootstrap.
        del settings["controller.quorum.bootstrap.servers"]
        settings["node.id"] = str(self.node_id)
        settings["controller.quorum.voters"] = self._cluster.voters
        return settings

    def _format_flags(self) -> list[str]:
        return []

    def _become_ready(self) -> None:
        if self._cluster._launching:
            # The first nodes of a cluster cannot serve before the others form the
            # quorum: the cluster waits for all of them once all are launched.
            self._check_alive()
            return
        self._wait_for(
            lambda: answers_requests(self.port) or None,
            self._started_at + self.ready_timeout,
            0.2,
            f"node {self.node_id} does not serve on {self.bootstrap}",
            pending="not serving yet: registering with the controller and catching up",
        )
        self.timings["boot"] = time.monotonic() - self._launched_at


class KafkaCluster:
    """Three KRaft nodes (``node-1`` .. ``node-3`` under ``workdir``) on 127.0.0.1.

    ``workdir/cluster.json`` keeps the cluster id and every node's two ports, so a
    restart, and a new KafkaCluster on the same workdir, come back on the same ports
    and data. ``start()`` returns once every node serves, a transaction with consumer
    offsets has committed on every coordinator partition (``wait_transactions``) and
    every partition has its full ISR.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        heap: str = DEFAULT_HEAP,
        ready_timeout: float = 120.0,
        wait_transactions: bool = True,
        stop_timeout: float = 30.0,
        server_config: Mapping[str, str | int] | None = None,
        die_with_parent: bool = True,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.ready_timeout = ready_timeout
        self.wait_transactions = wait_transactions
        #: Seconds spent in each phase of the last start(): launch (all JVMs spawned,
        #: formatting included), serving (every node answers), transactions, healthy,
        #: total.
        self.timings: dict[str, float] = {}
        self._launching = False
        self._lock = threading.RLock()
        self._admin_client: Any = None
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._state_path = self.workdir / "cluster.json"
        state = self._load_state()
        self.cluster_id: str = state.get("cluster_id") or _new_cluster_id()
        ports = state.get("nodes") or self._pick_ports()
        self.nodes: list[KafkaNode] = [
            KafkaNode(
                self,
                node_id,
                self.workdir / f"node-{node_id}",
                (int(ports[str(node_id)][0]), int(ports[str(node_id)][1])),
                heap=heap,
                ready_timeout=ready_timeout,
                stop_timeout=stop_timeout,
                server_config=server_config,
                die_with_parent=die_with_parent,
            )
            for node_id in range(1, NODES + 1)
        ]
        self._save_state()

    # -------------------------------------------------------------- public surface

    @property
    def bootstrap(self) -> str:
        """``bootstrap.servers`` naming every node, so a client starts with any one down."""
        return ",".join(node.bootstrap for node in self.nodes)

    @property
    def voters(self) -> str:
        """``controller.quorum.voters``: ``1@127.0.0.1:PORT,...``."""
        return ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes)

    def node(self, node_id: int) -> KafkaNode:
        """The node with this id (1..3), e.g. ``cluster.node(cluster.leader(topic))``."""
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise KafkaBrokerError(f"no node {node_id} in {self.workdir} (nodes 1-{NODES})")

    def is_running(self) -> bool:
        """Whether every node's JVM is alive (paused counts as alive)."""
        return all(node.is_running() for node in self.nodes)

    def start(self) -> Self:
        """Start every node that is not running and wait until the cluster is ready.

        On the first start all three are launched before any can serve (a quorum needs
        two); on a later one the missing nodes join the running ones. On failure every
        node this call started is killed and KafkaBrokerError carries their log tails.
        """
        with self._lock:
            if self.is_running():
                raise KafkaBrokerError(f"Kafka cluster in {self.workdir} is already running")
            started = time.monotonic()
            self.timings = {}
            deadline = started + self.ready_timeout
            missing = [node for node in self.nodes if not node.is_running()]
            self._launching = len(missing) == len(self.nodes)
            try:
                self._format(missing)
                for node in missing:
                    node.start()
            except BaseException:
                self._launching = False
                for node in missing:
                    node.kill()
                raise
            self._launching = False
            self.timings["launch"] = time.monotonic() - started
            try:
                self._wait_ready(deadline)
            except BaseException:
                for node in missing:
                    node.kill()
                raise
            self.timings["total"] = time.monotonic() - started
            _log.info("Kafka cluster ready at %s (%s)", self.bootstrap, self.timings)
            return self

    def stop(self, timeout: float | None = None) -> None:
        """Controlled shutdown of every node at once (SIGTERM; SIGKILL after ``timeout``,
        default stop_timeout); a paused node is resumed first."""
        with self._lock:
            _stop_all(self.nodes, timeout)

    def kill(self) -> None:
        """SIGKILL every node: the whole cluster crashes at once (start() brings it back)."""
        for node in self.nodes:
            node.kill()

    def restart(self) -> Self:
        """stop() if running, then start(): same ports and data."""
        if any(node.is_running() for node in self.nodes):
            self.stop()
        return self.start()

    def leader(self, topic: str, partition: int = 0, *, timeout: float = 10.0) -> int | None:
        """The id of the node leading ``topic``/``partition``, as the cluster's metadata
        says now (None while it has no leader). Right after a node dies the metadata may
        still name it until the controller fences it: use wait_for_leader to wait for a
        new one."""
        try:
            return self._leader(topic, partition, timeout)
        except _NotYet as exc:
            raise KafkaBrokerError(f"{exc} on {self.bootstrap}") from None

    def _leader(self, topic: str, partition: int, timeout: float) -> int | None:
        ck = _confluent_kafka()
        metadata = self._admin().list_topics(topic, timeout=timeout)
        found = metadata.topics.get(topic)
        if found is None or found.error is not None:
            # Also right after it was created: each node applies the metadata log in
            # its own time, and the client asks any of them.
            raise _NotYet(f"no topic {topic!r}: {found.error if found else 'not listed'}")
        meta = found.partitions.get(partition)
        if meta is None:
            raise _NotYet(f"topic {topic!r} has no partition {partition}")
        if meta.error is not None and meta.error.code() != ck.KafkaError.LEADER_NOT_AVAILABLE:
            raise KafkaBrokerError(f"{topic}[{partition}]: {meta.error}")
        return int(meta.leader) if meta.leader >= 0 else None

    def wait_for_leader(
        self,
        topic: str,
        partition: int = 0,
        *,
        not_on: Collection[int] = (),
        timeout: float = 60.0,
    ) -> int:
        """Wait until ``topic``/``partition`` is led by a running, unpaused node that is
        not in ``not_on`` (say, the node just killed or paused); return its id."""

        def elected() -> int | None:
            # Short tries: the client may ask a paused node, which never answers.
            leader = self._leader(topic, partition, _TRY_S)
            if leader is None or leader in not_on:
                return None
            node = self.node(leader)
            if node.pid is None:  # not our child (the CLI's fault commands): trust the metadata
                return leader
            return leader if node.is_running() and not node.is_paused() else None

        why = f"no new leader for {topic}[{partition}] off nodes {sorted(not_on)}"
        # No liveness check: the node just killed is expected dead.
        leader: int = self._wait(elected, timeout, why, pending="the old one is still named")
        return leader

    def elect_preferred(self, topic: str, partition: int = 0, *, timeout: float = 60.0) -> int:
        """Give ``topic``/``partition`` back to its preferred replica (the first of its
        replica list), as Kafka's own rebalance does only every 5 minutes: after a
        failover, the node that came back leads again, so a test can show it serves.
        Returns that node's id once the metadata names it leader."""
        ck = _confluent_kafka()
        meta = self._admin().list_topics(topic, timeout=10).topics[topic].partitions[partition]
        preferred = int(meta.replicas[0])
        # No timeout arguments: confluent-kafka 2.16's binding rejects both (a bug in
        # its argument parsing); the default is socket.timeout.ms, 60 s.
        future = self._admin().elect_leaders(
            ck.ElectionType.PREFERRED, [ck.TopicPartition(topic, partition)]
        )
        for error in future.result().values():
            # ELECTION_NOT_NEEDED: it leads already.
            if error is not None and error.args[0].code() != ck.KafkaError.ELECTION_NOT_NEEDED:
                raise KafkaBrokerError(f"preferred election of {topic}[{partition}]: {error}")
        others = {node.node_id for node in self.nodes} - {preferred}
        leader: int = self.wait_for_leader(topic, partition, not_on=others, timeout=timeout)
        return leader

    def controller(self) -> int:
        """The id of the active controller (the quorum's Raft leader)."""
        cluster = self._admin().describe_cluster(request_timeout=10).result()
        if cluster.controller is None:
            raise KafkaBrokerError(f"no active controller on {self.bootstrap}")
        return int(cluster.controller.id)

    def transaction_coordinator(self, transactional_id: str) -> int | None:
        """The node coordinating ``transactional_id`` (leading its partition of
        __transaction_state), e.g. to kill or pause it in the middle of a commit."""
        partitions = coordinator_partitions(self.nodes[0]._config(), "transaction")
        return self.leader(
            "__transaction_state", coordinator_partition(transactional_id, partitions)
        )

    def wait_healthy(self, timeout: float | None = None) -> None:
        """Wait until every node serves and every partition of every topic (internal
        ones included) has a leader and its full ISR, all replicas in sync.

        Fails at once if a node is not running or is paused: start or resume it first.
        """
        self._wait(
            self._healthy,
            self.ready_timeout if timeout is None else timeout,
            "not healthy",
            check=self._check_nodes_up,
        )

    def faults(
        self, topic: str | None = None, partition: int = 0, *, seed: int | None = None
    ) -> NodeFaults:
        """One node at a time for a chaos run (``kill()`` / ``restart()``): see NodeFaults."""
        return NodeFaults(self, topic, partition, seed=seed)

    def log_tail(self, n: int = 50) -> str:
        """The last ``n`` lines of every node's server log, one section per node."""
        return "\n".join(f"--- node {node.node_id} ---\n{node.log_tail(n)}" for node in self.nodes)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"KafkaCluster({str(self.workdir)!r}, nodes={self.nodes})"

    # -------------------------------------------------------------------- internals

    def _format(self, nodes: list[KafkaNode]) -> None:
        """Format the new nodes' log dirs in parallel: a JVM each, seconds each."""
        new = [node for node in nodes if not (node.data_dir / "meta.properties").exists()]
        if not new:
            return
        java, classpath = find_java(), resolve()
        errors: list[BaseException] = []

        def prepare(node: KafkaNode) -> None:
            try:
                node._prepare(java, classpath)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=prepare, args=(node,)) for node in new]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def _pick_ports(self) -> dict[str, list[int]]:
        taken: list[int] = []
        for _ in range(2 * NODES):
            taken.append(pick_port(KafkaBrokerError, exclude=taken))
        return {str(i + 1): taken[2 * i : 2 * i + 2] for i in range(NODES)}

    def _load_state(self) -> dict[str, Any]:
        try:
            loaded = json.loads(self._state_path.read_text())
        except FileNotFoundError:
            return {}
        return loaded if isinstance(loaded, dict) else {}

    def _save_state(self) -> None:
        state = {
            "cluster_id": self.cluster_id,
            "nodes": {str(n.node_id): [n.port, n.controller_port] for n in self.nodes},
        }
        self._state_path.write_text(json.dumps(state, indent=2) + "\n")

    def _admin(self) -> Any:
        if self._admin_client is None:
            from confluent_kafka.admin import AdminClient

            self._admin_client = AdminClient(quiet_client_config(self.bootstrap))
        return self._admin_client

    def _wait_ready(self, deadline: float) -> None:
        t = time.monotonic()
        self._wait_until(self._all_serve, deadline, "not every node serves")
        self.timings["serving"] = time.monotonic() - t
        if self.wait_transactions:
            t = time.monotonic()
            wait_transactions(
                self._admin(),
                quiet_client_config(self.bootstrap),
                self.nodes[0]._config(),
                deadline,
                check=self._check_alive,
                fail=self._fail,
            )
            self.timings["transactions"] = time.monotonic() - t
        t = time.monotonic()
        self._wait_until(self._healthy, deadline, "not healthy")
        self.timings["healthy"] = time.monotonic() - t

    def _all_serve(self) -> bool:
        waiting = [n.node_id for n in self.nodes if not answers_requests(n.port)]
        if waiting:
            raise _NotYet(f"nodes {waiting} do not serve yet")
        return True

    def _check_nodes_up(self) -> None:
        for node in self.nodes:
            if not node.is_running():
                raise KafkaBrokerError(
                    f"node {node.node_id} is not running, so the cluster cannot become "
                    "healthy: start it first"
                )
            if node.is_paused():
                raise KafkaBrokerError(
                    f"node {node.node_id} is paused, so the cluster cannot become healthy: "
                    "resume it first"
                )

    def _healthy(self) -> bool:
        self._all_serve()
        metadata = self._admin().list_topics(timeout=_TRY_S)
        registered = set(metadata.brokers)
        wanted = {node.node_id for node in self.nodes}
        if registered != wanted:
            raise _NotYet(f"brokers {sorted(registered)} registered, not {sorted(wanted)}")
        for name, topic in sorted(metadata.topics.items()):
            if topic.error is not None:
                raise _NotYet(f"topic {name}: {topic.error}")
            for p, meta in sorted(topic.partitions.items()):
                if meta.leader < 0 or sorted(meta.isrs) != sorted(meta.replicas):
                    raise _NotYet(
                        f"{name}[{p}] leader {meta.leader}, "
                        f"ISR {sorted(meta.isrs)} of replicas {sorted(meta.replicas)}"
                    )
        return True

    def _wait(
        self,
        probe: Callable[[], Any],
        timeout: float,
        why: str,
        *,
        pending: str | None = None,
        check: Callable[[], None] = lambda: None,
    ) -> Any:
        def fail(reason: str) -> NoReturn:
            raise KafkaBrokerError(
                f"Kafka cluster in {self.workdir}: {reason} within {timeout:.0f}s\n"
                f"{self._fail_logs()}"
            )

        return wait_until(
            probe,
            time.monotonic() + timeout,
            0.2,
            why,
            check=check,
            fail=fail,
            retry_on=(_NotYet, _confluent_kafka().KafkaException),
            pending=pending,
        )

    def _wait_until(self, probe: Callable[[], Any], deadline: float, why: str) -> None:
        wait_until(
            probe,
            deadline,
            0.2,
            why,
            check=self._check_alive,
            fail=self._fail,
            retry_on=(_NotYet, _confluent_kafka().KafkaException),
        )

    def _check_alive(self) -> None:
        for node in self.nodes:
            if not node.is_running():
                # A node some test or chaos thread killed on purpose is not this
                # wait's failure, but it does mean the wait cannot succeed.
                proc = node._proc
                code = None if proc is None else proc.returncode
                self._fail(f"node {node.node_id}'s JVM is not running (exit {code})")

    def _fail(self, why: str) -> NoReturn:
        raise KafkaBrokerError(
            f"Kafka cluster in {self.workdir} did not become ready "
            f"(ready_timeout={self.ready_timeout:.0f}s): {why}\n{self._fail_logs()}"
        )

    def _fail_logs(self) -> str:
        return "\n".join(node._fail_logs() for node in self.nodes)


class NodeFaults:
    """What a chaos run needs of a broker it may crash (``kill()``, ``restart()``), on a
    cluster: one node at a time, the leader of ``topic``/``partition`` if given (a
    leader SIGKILL), else each node in turn from a seeded random start.

    ``restart()`` starts the killed node and returns once the cluster is healthy again,
    so the next kill never takes a second replica of anything. ``pause()`` /
    ``resume()`` do the same with SIGSTOP / SIGCONT.
    """

    def __init__(
        self,
        cluster: KafkaCluster,
        topic: str | None = None,
        partition: int = 0,
        *,
        seed: int | None = None,
    ) -> None:
        self.cluster = cluster
        self.topic = topic
        self.partition = partition
        self._turn = (seed or 0) % NODES
        #: The node the last kill() or pause() hit.
        self.victim: KafkaNode | None = None

    def kill(self) -> None:
        self.victim = self._choose()
        self.victim.kill()

    def restart(self) -> None:
        if self.victim is None:
            raise KafkaBrokerError("restart() without a kill() first")
        self.victim.start()
        self.cluster.wait_healthy()

    def pause(self) -> None:
        self.victim = self._choose()
        self.victim.pause()

    def resume(self) -> None:
        if self.victim is None:
            raise KafkaBrokerError("resume() without a pause() first")
        self.victim.resume()
        self.cluster.wait_healthy()

    def _choose(self) -> KafkaNode:
        if self.topic is not None:
            leader = self.cluster.wait_for_leader(self.topic, self.partition)
            return self.cluster.node(leader)
        self._turn = self._turn % NODES + 1
        return self.cluster.node(self._turn)


# ------------------------------------------------------------------------------- CLI


def _pids_path(workdir: Path) -> Path:
    # Written by a running `start` only: a KafkaCluster made elsewhere on the same dir
    # (the fault commands make one) must not erase the pids of JVMs it does not own.
    return workdir / "pids.json"


def _pid_of(workdir: Path, selector: str) -> tuple[int, int]:
    """(node id, pid) of the node a CLI selector names: N, leader:TOPIC[:P], controller."""
    try:
        pids = json.loads(_pids_path(workdir).read_text())
    except FileNotFoundError:
        raise KafkaBrokerError(f"no cluster runs in {workdir} (no pids.json)") from None
    if selector.isdigit():
        node_id = int(selector)
    else:
        cluster = KafkaCluster(workdir)  # only reads cluster.json; starts nothing
        if selector == "controller":
            node_id = cluster.controller()
        elif selector.startswith("leader:"):
            topic, _, part = selector.removeprefix("leader:").partition(":")
            node_id = cluster.wait_for_leader(topic, int(part or 0))
        else:
            raise KafkaBrokerError(f"bad node {selector!r}: N, leader:TOPIC[:P] or controller")
    pid = pids.get(str(node_id))
    if not pid:
        raise KafkaBrokerError(f"node {node_id} has no pid in {workdir}/cluster.json")
    return node_id, int(pid)


def _serve(cluster: KafkaCluster, revive_after: float | None) -> int:
    """The CLI's ``start``: run until Ctrl-C/SIGTERM, starting dead nodes again."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def save_pids() -> None:
        pids = {str(node.node_id): node.pid for node in cluster.nodes}
        _pids_path(cluster.workdir).write_text(json.dumps(pids) + "\n")

    with cluster:
        save_pids()
        print(f"bootstrap.servers={cluster.bootstrap}", flush=True)
        for node in cluster.nodes:
            print(f"node {node.node_id}: pid {node.pid}, log {node.server_log}", flush=True)
        print("(Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(0.5)
                dead = [node for node in cluster.nodes if not node.is_running()]
                if dead and revive_after is None:
                    print(f"node {dead[0].node_id} died:\n{dead[0].log_tail(40)}", file=sys.stderr)
                    return 1
                for node in dead:
                    print(f"node {node.node_id} died; starting it in {revive_after}s", flush=True)
                    time.sleep(revive_after or 0.0)
                    node.start()
                    save_pids()
                    print(f"node {node.node_id} serves again: pid {node.pid}", flush=True)
        except KeyboardInterrupt:
            print("stopping...", flush=True)
            return 0
        finally:
            _pids_path(cluster.workdir).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python infra/kafka_cluster.py",
        description="Run onceflow's three-node Kafka cluster by hand, and inject faults.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="run the cluster in the foreground until Ctrl-C")
    start.add_argument("--dir", required=True, type=Path, help="work dir (kept across runs)")
    start.add_argument("--heap", default=DEFAULT_HEAP, help=f"heap per node ({DEFAULT_HEAP})")
    start.add_argument(
        "--revive-after",
        type=float,
        default=None,
        metavar="S",
        help="start a node that died (say, `kill` below) again S seconds later, instead of exiting",
    )
    for name, what in [
        ("kill", "SIGKILL a node of a running `start`"),
        ("pause", "SIGSTOP a node"),
        ("resume", "SIGCONT a node"),
    ]:
        sub = commands.add_parser(name, help=what)
        sub.add_argument("--dir", required=True, type=Path)
        sub.add_argument("node", help="N (1-3), leader:TOPIC[:PARTITION] or controller")
    healthy = commands.add_parser("wait-healthy", help="wait until every ISR is full")
    healthy.add_argument("--dir", required=True, type=Path)
    healthy.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "start":
            return _serve(KafkaCluster(args.dir, heap=args.heap), args.revive_after)
        if args.command == "wait-healthy":
            _wait_healthy_from_outside(args.dir, args.timeout)
            return 0
        node_id, pid = _pid_of(args.dir, args.node)
        sig = {"kill": signal.SIGKILL, "pause": signal.SIGSTOP, "resume": signal.SIGCONT}
        os.kill(pid, sig[args.command])
        if args.command == "pause":
            while not is_stopped(pid):
                time.sleep(0.005)
        print(f"node {node_id} (pid {pid}): {sig[args.command].name}")
        return 0
    except (KafkaBrokerError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _wait_healthy_from_outside(workdir: Path, timeout: float) -> None:
    # Another process owns the JVMs: judge what the cluster serves, not our children.
    cluster = KafkaCluster(workdir)
    cluster._wait(cluster._healthy, timeout, "not healthy")


if __name__ == "__main__":
    sys.exit(main())

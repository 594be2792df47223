"""A real single-node Apache Kafka 4.x broker (KRaft, loopback only) for tests, benches
and chaos runs, with no Docker and no release tarball.

The jars come from Maven Central (``infra/kafka/pom.xml``, resolved once into a cache
by ``resolve()``) and run on the machine's Java 17+, the way the official scripts do:
``kafka-storage.sh format`` is ``java kafka.tools.StorageTool format ...`` and
``kafka-server-start.sh`` is ``java kafka.Kafka server.properties``.

    with KafkaBroker(tmp_path / "kafka") as broker:
        producer = Producer({"bootstrap.servers": broker.bootstrap, ...})
        broker.kill()      # SIGKILL: a hard broker crash
        broker.restart()   # same ports, same log dir: committed data survives
        with broker.paused():  # SIGSTOP for the block, SIGCONT after it
            ...
        broker.outage(5)   # SIGKILL, 5 s, start (how="stop" / "pause" for the others)

A three-node cluster with the same faults per node is ``infra.kafka_cluster``.
Manual use: ``python infra/kafka_broker.py start --dir /tmp/kafka`` (see
docs/kafka-broker.md).
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
import weakref
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, NoReturn

if not __package__:
    # Run as a script (`python infra/kafka_broker.py`): `infra` is not importable yet.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra._process import (
    ManagedServer,
    pick_port,
    run_in_foreground,
    tail,
    tail_section,
    unread_bytes,
)

__all__ = [
    "KAFKA_POM",
    "KafkaBroker",
    "KafkaBrokerError",
    "KafkaUnavailable",
    "cache_dir",
    "kafka_version",
    "resolve",
]

KAFKA_POM = Path(__file__).resolve().parent / "kafka" / "pom.xml"

ENABLE_HINT = (
    "Kafka tests need Java 17+ and Maven to run the official broker from Maven Central "
    "(Debian/Ubuntu: `apt-get install openjdk-17-jre-headless maven`; or point JAVA_HOME "
    "at a JDK 17+), plus the Python client (`.venv/bin/pip install confluent-kafka`)."
)

# Topic, and prefix of the transactional and group ids, used only by the transaction
# readiness probe (see KafkaBroker._wait_transactions).
READINESS_TOPIC = "_onceflow_readiness"
READINESS_TXN_ID = "onceflow-readiness"

_log = logging.getLogger("onceflow.infra.kafka")
# librdkafka's own log lines from the readiness clients (critical ones only; see
# _wait_ready).
_client_log = logging.getLogger("onceflow.infra.kafka.client")


class KafkaBrokerError(RuntimeError):
    """The broker could not be resolved, formatted, started or made ready."""


class KafkaUnavailable(KafkaBrokerError):
    """A prerequisite (Java 17+, Maven, confluent-kafka) is missing on this machine.

    The test suite turns this into a skip locally and a failure under CI
    (ONCEFLOW_REQUIRE_INFRA=1); the message says how to enable Kafka tests.
    """


# --------------------------------------------------------------------------- resolve


def kafka_version(pom: Path = KAFKA_POM) -> str:
    """The ``kafka.version`` property of the pom: the one place the version is set."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = ET.parse(pom).getroot().find("m:properties/m:kafka.version", ns)
    if node is None or not (node.text or "").strip():
        raise KafkaBrokerError(f"{pom} has no <kafka.version> property")
    return (node.text or "").strip()


def cache_dir(pom: Path = KAFKA_POM) -> Path:
    """Where resolved jars live: $ONCEFLOW_KAFKA_CACHE, else ~/.cache/onceflow/kafka-<v>.

    The version is in the default path so that bumping the pom never reuses (or deletes)
    another version's jars while a different checkout still uses them.
    """
    override = os.environ.get("ONCEFLOW_KAFKA_CACHE")
    if override:
        return Path(override).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "onceflow" / f"kafka-{kafka_version(pom)}"


def resolve(pom: Path = KAFKA_POM, cache: Path | None = None) -> str:
    """Copy the broker's jars from Maven into ``<cache>/lib`` once; return the classpath.

    Idempotent and safe to call from concurrent processes (pytest-xdist workers, a
    bench next to a test run): a file lock serialises the Maven run, and the marker
    file, written last, holds a hash of the pom, so an interrupted copy or an edited pom
    both lead to a clean re-resolve. Maven is needed only when the cache is not complete.
    """
    cache = cache if cache is not None else cache_dir(pom)
    lib = cache / "lib"
    marker = cache / "resolved.ok"
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()
    if _marker_matches(marker, digest):
        return _classpath(lib)
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaUnavailable(f"`mvn` not found on PATH. {ENABLE_HINT}")
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / ".lock"):
        if _marker_matches(marker, digest):  # another process finished while we waited
            return _classpath(lib)
        marker.unlink(missing_ok=True)
        shutil.rmtree(lib, ignore_errors=True)  # never mix jars of two pom versions
        cmd = [
            mvn,
            "-q",
            "-B",  # batch mode: no colour codes or progress bars in captured output
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={lib}",
        ]
        started = time.monotonic()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except subprocess.TimeoutExpired as exc:
            raise KafkaBrokerError(f"Maven did not finish in {exc.timeout:.0f}s: {cmd}") from exc
        if done.returncode != 0:
            # Not KafkaUnavailable: a failed resolve is a real error (a bad pin, no route
            # to Maven Central) and must not silently turn into a skip.
            output = (done.stdout + done.stderr).strip()[-4000:]
            raise KafkaBrokerError(
                f"Maven could not resolve the Kafka broker ({' '.join(cmd)}), "
                f"exit {done.returncode}:\n{output}"
            )
        if not any(lib.glob("kafka_2.13-*.jar")):
            raise KafkaBrokerError(f"Maven finished but {lib} holds no kafka_2.13 jar")
        marker.write_text(f"{digest}\n{kafka_version(pom)}\n")
        _log.info("resolved Kafka jars into %s in %.1fs", lib, time.monotonic() - started)
    return _classpath(lib)


def _marker_matches(marker: Path, digest: str) -> bool:
    try:
        return marker.read_text().split("\n", 1)[0] == digest
    except FileNotFoundError:
        return False


def _classpath(lib: Path) -> str:
    # Explicit jars, sorted, rather than `lib/*`: the classpath is the same string on
    # every machine and readable in `ps` output and in error messages.
    jars = sorted(lib.glob("*.jar"))
    if not jars:
        raise KafkaBrokerError(f"{lib} holds no jars; delete its parent folder and retry")
    return os.pathsep.join(str(jar) for jar in jars)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------ java


def find_java() -> str:
    """The ``java`` to run: $JAVA_HOME/bin/java if set, else the one on PATH."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.access(Path(java_home) / "bin" / "java", os.X_OK):
        java = str(Path(java_home) / "bin" / "java")
    else:
        found = shutil.which("java")
        if found is None:
            raise KafkaUnavailable(f"`java` not found on PATH. {ENABLE_HINT}")
        java = found
    _check_java_version(java)
    return java


@functools.cache
def _check_java_version(java: str) -> None:
    # Kafka 4 brokers need Java 17; an older JVM fails with UnsupportedClassVersionError
    # deep in a log, so say it up front.
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except OSError as exc:
        raise KafkaUnavailable(f"cannot run {java}: {exc}. {ENABLE_HINT}") from exc
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if match is None:
        raise KafkaUnavailable(f"cannot tell the version of {java}. {ENABLE_HINT}")
    major = int(match.group(1))
    if major == 1:  # "1.8.0_x" style
        major = int(match.group(2) or 0)
    if major < 17:
        raise KafkaUnavailable(f"{java} is Java {major}; Kafka 4 needs 17+. {ENABLE_HINT}")


def _confluent_kafka() -> Any:
    try:
        import confluent_kafka
    except ImportError as exc:
        raise KafkaUnavailable(f"the confluent-kafka package is missing. {ENABLE_HINT}") from exc
    return confluent_kafka


# ------------------------------------------------------------------------ cluster


def _new_cluster_id() -> str:
    # Same shape as `kafka-storage.sh random-uuid` (Uuid.randomUuid: url-safe base64 of
    # 16 random bytes, no padding, never starting with "-" so it cannot look like a
    # flag), without paying for a JVM start.
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


# ---------------------------------------------------------------------------- broker

# Brokers still running at interpreter exit are stopped, so a test run that forgets
# one does not leave a JVM behind (die_with_parent covers the exits that skip atexit).
_running: weakref.WeakSet[KafkaBroker] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for broker in list(_running):
        with contextlib.suppress(Exception):
            broker.stop(timeout=10)


# Why each setting is there. Tests can override or add any of them (server_config=).
_BASE_CONFIG: dict[str, str] = {
    # One combined KRaft node: the broker is its own (single-voter) controller.
    "process.roles": "broker,controller",
    "node.id": "1",
    "controller.listener.names": "CONTROLLER",
    "inter.broker.listener.name": "PLAINTEXT",
    "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
    # A single broker cannot hold more than one replica of anything: internal topics
    # default to replication factor 3 and would never be created.
    "offsets.topic.replication.factor": "1",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    "default.replication.factor": "1",
    "min.insync.replicas": "1",
    "num.partitions": "1",
    # 50 partitions per internal topic is the default; creating and loading them is
    # most of the first-transaction latency on a 2-core machine.
    "offsets.topic.num.partitions": "4",
    "transaction.state.log.num.partitions": "4",
    # The 3 s default delays every first consumer-group join, in every test.
    "group.initial.rebalance.delay.ms": "0",
    # Lets chaos tests use short session timeouts, so partitions of a SIGKILLed
    # consumer move within seconds (the broker default floor is 6 s).
    "group.min.session.timeout.ms": "1000",
    # Tests create every topic they use, so a typo fails instead of silently working.
    "auto.create.topics.enable": "false",
    # After a SIGKILL the restarted controller still holds the dead incarnation's
    # broker session and refuses the new registration (DuplicateBrokerRegistration)
    # until it expires: 9 s by default, retried every 2 s heartbeat, so ~11 s extra on
    # every chaos restart. 3 s / 0.5 s cut that to ~3 s; heartbeats are in-process on
    # loopback, so only a multi-second GC pause could fence the broker spuriously.
    "broker.session.timeout.ms": "3000",
    "broker.heartbeat.interval.ms": "500",
}

_LOG4J2 = """\
# Written by infra/kafka_broker.py on every start: the whole server log in one file.
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {path}
appender.file.append = true
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
# Per-request authorizer and state-change chatter, quiet as in Kafka's own config.
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
"""


class KafkaBroker(ManagedServer):
    """A single-node KRaft Kafka broker in ``workdir``, listening on 127.0.0.1 only.

    ``workdir`` holds ``server.properties``, ``log4j2.properties``, ``server.log`` (the
    broker's log), ``console.log`` (the JVM's stdout/stderr), ``data/`` (the log dir,
    formatted on first start) and ``broker.json`` (cluster id and ports, so restart(),
    and a new KafkaBroker on the same workdir, come back on the same ports).

    ``start()`` returns once a client can list topics and, with ``wait_transactions``
    (default), once a transactional produce with consumer offsets has committed: the
    transaction and group coordinators are then loaded and the first test transaction
    does not race them.

    Faults besides kill(): ``pause()`` / ``resume()`` / ``paused()`` (SIGSTOP, SIGCONT),
    ``down()`` and ``outage(seconds)`` (see infra._process.ManagedServer), and
    ``unread_bytes()`` to see a request waiting at a paused broker.
    """

    _error = KafkaBrokerError
    _what = "Kafka broker"
    _process_what = "the broker JVM"
    _running = _running
    _log = _log
    #: The settings under the node's own (listeners, quorum, log dir) and the caller's
    #: server_config; a cluster node has its own.
    _defaults: ClassVar[Mapping[str, str]] = _BASE_CONFIG
    #: JVM flags after the standard ones (kafka-run-class.sh's).
    _extra_jvm_flags: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        port: int | None = None,
        *,
        heap: str = "512m",
        ready_timeout: float = 90.0,
        wait_transactions: bool = True,
        stop_timeout: float = 30.0,
        server_config: Mapping[str, str | int] | None = None,
        die_with_parent: bool = True,
    ) -> None:
        super().__init__(
            workdir,
            ready_timeout=ready_timeout,
            stop_timeout=stop_timeout,
            die_with_parent=die_with_parent,
        )
        self.data_dir = self.workdir / "data"
        self.config_path = self.workdir / "server.properties"
        self.log4j_path = self.workdir / "log4j2.properties"
        self.server_log = self.workdir / "server.log"
        self.console_log = self.workdir / "console.log"
        self._state_path = self.workdir / "broker.json"
        self.heap = heap
        self.wait_transactions = wait_transactions
        self.server_config = {k: str(v) for k, v in (server_config or {}).items()}
        #: Seconds spent in each phase of the last start(): checks (java, client),
        #: resolve, format (first start only), boot (JVM launch to metadata served),
        #: transactions (the readiness transaction), total.
        self.timings: dict[str, float] = {}

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cluster_id, self.port, self.controller_port = self._identity(self._load_state(), port)
        self._save_state()

    # -------------------------------------------------------------- public surface

    @property
    def bootstrap(self) -> str:
        """``bootstrap.servers`` for clients: ``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    @property
    def _address(self) -> str:
        return self.bootstrap

    def unread_bytes(self) -> int:
        """Bytes clients sent to the broker that it has not read yet (see pause()): while
        it is paused, a value above 0 means a request is waiting for it."""
        return unread_bytes([self.port])

    def start(self) -> KafkaBroker:
        """Format the log dir if new, launch the JVM and wait until it is ready.

        On any failure the JVM is killed and KafkaBrokerError carries the log tail;
        KafkaUnavailable means a prerequisite is missing (see ENABLE_HINT).
        """
        return super().start()

    def _launch(self) -> None:
        java = find_java()
        _confluent_kafka()  # fail as unavailable now, not after a JVM start
        t = time.monotonic()
        self.timings["checks"] = t - self._started_at
        classpath = resolve()
        self.timings["resolve"] = time.monotonic() - t
        self._prepare(java, classpath)
        self._spawn_jvm(java, classpath)

    def _prepare(self, java: str, classpath: str) -> None:
        """Write the config, and format the log dir on its first start."""
        self._write_config()
        if not (self.data_dir / "meta.properties").exists():
            t = time.monotonic()
            self._format(java, classpath)
            self.timings["format"] = time.monotonic() - t

    def _become_ready(self) -> None:
        self._wait_ready(self._started_at + self.ready_timeout)

    def stop(self, timeout: float | None = None) -> int | None:
        """Controlled shutdown: SIGTERM, then SIGKILL after ``timeout`` seconds.

        Returns the JVM's exit status (None if it was not running).
        """
        return super().stop(timeout)

    def kill(self) -> int | None:
        """SIGKILL the JVM: a hard broker crash (no controlled shutdown, no flush).

        What is in the OS page cache survives, as after a real process crash; this does
        not simulate a power loss. Returns the exit status (-9), or None if no JVM.
        Safe to call from another thread while start() is waiting for readiness (a
        chaos thread): that start() then fails promptly with KafkaBrokerError.
        """
        return super().kill()

    def log_tail(self, n: int = 50) -> str:
        """The last ``n`` lines of server.log (console.log if the server log is empty)."""
        text = tail(self.server_log, n)
        return text if text.strip() else tail(self.console_log, n)

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"KafkaBroker({str(self.workdir)!r}, bootstrap={self.bootstrap!r}, {state})"

    # -------------------------------------------------------------------- internals

    def _identity(self, state: Mapping[str, Any], port: int | None) -> tuple[str, int, int]:
        """The cluster id, client port and controller port, kept from ``state`` if any."""
        cluster_id: str = state.get("cluster_id") or _new_cluster_id()
        # The controller port is written into the log dir at format time (the voter's
        # endpoint in the bootstrap checkpoint), so once chosen it never changes.
        client: int = port or state.get("port") or pick_port(KafkaBrokerError)
        controller: int = state.get("controller_port") or pick_port(
            KafkaBrokerError, exclude=[client]
        )
        if controller == client:
            raise KafkaBrokerError(f"port {port} is this workdir's controller port")
        return cluster_id, client, controller

    def _load_state(self) -> dict[str, Any]:
        try:
            loaded = json.loads(self._state_path.read_text())
        except FileNotFoundError:
            return {}
        return loaded if isinstance(loaded, dict) else {}

    def _save_state(self) -> None:
        state = {
            "cluster_id": self.cluster_id,
            "port": self.port,
            "controller_port": self.controller_port,
            "kafka_version": kafka_version(),
        }
        self._state_path.write_text(json.dumps(state, indent=2) + "\n")

    def _node_settings(self) -> dict[str, str]:
        """This node's listeners, quorum and log dir."""
        endpoints = (
            f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
        )
        return {
            "listeners": endpoints,
            "advertised.listeners": endpoints,
            # KIP-853 dynamic quorum, as in Kafka 4's config/server.properties: with
            # `format --standalone`, controller.quorum.voters must NOT be set.
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
            "log.dirs": str(self.data_dir),
        }

    def _format_flags(self) -> list[str]:
        # Node 1 as the only voter of a dynamic quorum (see _node_settings).
        return ["--standalone"]

    def _config(self) -> dict[str, str]:
        return {**self._defaults, **self._node_settings(), **self.server_config}

    def _write_config(self) -> None:
        # Rewritten on every start, so a changed server_config or a moved workdir
        # applies on restart; only the controller port must stay as formatted.
        lines = ["# Written by infra/kafka_broker.py on every start; edits are lost."]
        lines += [f"{key}={value}" for key, value in self._config().items()]
        self.config_path.write_text("\n".join(lines) + "\n")
        self.log4j_path.write_text(_LOG4J2.format(path=self.server_log))

    def _jvm_base(self, java: str, heap: str) -> list[str]:
        return [
            java,
            f"-Xmx{heap}",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.log4j_path}",
            # kafka-run-class.sh sets it; some of Kafka's own code reads it.
            f"-Dkafka.logs.dir={self.workdir}",
        ]

    def _format(self, java: str, classpath: str) -> None:
        # kafka-storage.sh format -t <id> -c server.properties [--standalone]: writes
        # meta.properties and the bootstrap checkpoint (with --standalone, one making
        # node 1 the only voter).
        cmd = [
            *self._jvm_base(java, "256m"),
            # A run of seconds: C2 would compile nothing it gets to use (measured: the
            # format JVM takes 2.5-3.7 s of CPU with it on the 2-core dev machine).
            "-XX:TieredStopAtLevel=1",
            "-cp",
            classpath,
            "kafka.tools.StorageTool",
            "format",
            "--cluster-id",
            self.cluster_id,
            "--config",
            str(self.config_path),
            *self._format_flags(),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise KafkaBrokerError(
                f"kafka.tools.StorageTool format failed (exit {done.returncode}):\n"
                f"{(done.stdout + done.stderr).strip()[-4000:]}"
            )
        # Its stdout ends with "Formatting dynamic metadata voter directory ... with
        # metadata.version X"; the lines before dump the bootstrap feature records.
        _log.info("%s", done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "")

    def _spawn_jvm(self, java: str, classpath: str) -> None:
        cmd = [
            *self._jvm_base(java, self.heap),
            f"-Xms{min(128, _megabytes(self.heap))}m",
            # kafka-run-class.sh's KAFKA_JVM_PERFORMANCE_OPTS.
            "-server",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:InitiatingHeapOccupancyPercent=35",
            "-XX:+ExplicitGCInvokesConcurrent",
            # A broker out of heap must die and be seen dead, not limp on.
            "-XX:+ExitOnOutOfMemoryError",
            *self._extra_jvm_flags,
            "-cp",
            classpath,
            "kafka.Kafka",
            str(self.config_path),
        ]
        self._spawn(cmd, self.console_log, f"starting {cmd[-2:]}", cwd=self.workdir)

    def _wait_ready(self, deadline: float) -> None:
        ck = _confluent_kafka()
        from confluent_kafka.admin import AdminClient

        quiet = quiet_client_config(self.bootstrap)
        self._wait_port(deadline)
        admin = AdminClient(quiet)

        def brokers_listed() -> bool | None:
            metadata = admin.list_topics(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            return bool(metadata.brokers) or None

        self._wait_for(
            brokers_listed,
            deadline,
            0.2,
            f"no metadata from {self.bootstrap}",
            retry_on=(ck.KafkaException,),
            pending="metadata lists no broker yet",
        )
        self.timings["boot"] = time.monotonic() - self._launched_at
        if self.wait_transactions:
            t = time.monotonic()
            wait_transactions(
                admin, quiet, self._config(), deadline, check=self._check_alive, fail=self._fail
            )
            self.timings["transactions"] = time.monotonic() - t

    def _wait_port(self, deadline: float) -> None:
        # A plain TCP probe first: cheaper than a client, and no librdkafka log storm.
        def listening() -> bool | None:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.settimeout(1.0)
                return sock.connect_ex(("127.0.0.1", self.port)) == 0 or None

        self._wait_for(listening, deadline, 0.1, f"nothing listens on {self.bootstrap}")

    def _fail_logs(self) -> str:
        console = tail(self.console_log, 20).strip()
        return tail_section(self.server_log, 40) + (
            f"\n--- {self.console_log} (tail) ---\n{console}" if console else ""
        )


def quiet_client_config(bootstrap: str) -> dict[str, Any]:
    """Config for the controllers' own clients (readiness, health, leader lookups)."""
    # librdkafka logs every refused connection while a JVM boots or is down (at error
    # level, several per second): keep only critical lines, and send them to our logger
    # instead of the test's stderr. Failures still surface as exceptions.
    return {
        "bootstrap.servers": bootstrap,
        "log_level": 2,
        "logger": _client_log,
        "error_cb": lambda err: _log.debug("infra client: %s", err),
    }


def wait_transactions(
    admin: Any,
    quiet: Mapping[str, Any],
    config: Mapping[str, str],
    deadline: float,
    *,
    check: Callable[[], None],
    fail: Callable[[str], NoReturn],
) -> None:
    """Commit a transaction with a record and consumer offsets on every coordinator.

    Right after a first start or a crash, each partition of __transaction_state and
    __consumer_offsets answers COORDINATOR_LOAD_IN_PROGRESS / NOT_COORDINATOR until
    it is created and loaded, partition by partition. Clients retry that, but a
    test's first transaction then takes seconds and short client timeouts fail at
    random. So: one transactional id and one group id per coordinator partition
    (picked by Kafka's own hash), each pair committing a record plus offsets, which
    is everything an EOS v2 commit touches, markers included.

    ``config`` is the broker's (for the partition counts); ``check`` raises when a
    server died, ``fail`` raises the readiness error.
    """
    ck = _confluent_kafka()
    # The documented import; the 2.x stubs re-export it without marking it public.
    from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

    # The broker's default replication factor: 1 on one broker, all replicas on a
    # cluster, so the probe's own topic never is the partition that stays unhealthy.
    futures = admin.create_topics([NewTopic(READINESS_TOPIC, 1)], operation_timeout=30)
    for future in futures.values():
        try:
            future.result()
        except ck.KafkaException as exc:
            if exc.args[0].code() != ck.KafkaError.TOPIC_ALREADY_EXISTS:
                fail(f"cannot create {READINESS_TOPIC}: {exc}")
    txn_ids = one_id_per_partition(READINESS_TXN_ID, coordinator_partitions(config, "transaction"))
    group_ids = one_id_per_partition(READINESS_TXN_ID, coordinator_partitions(config, "offsets"))
    for i in range(max(len(txn_ids), len(group_ids))):
        _probe_transaction(
            txn_ids[i % len(txn_ids)],
            group_ids[i % len(group_ids)],
            quiet,
            deadline,
            check=check,
            fail=fail,
        )


def _probe_transaction(
    txn_id: str,
    group_id: str,
    quiet: Mapping[str, Any],
    deadline: float,
    *,
    check: Callable[[], None],
    fail: Callable[[str], NoReturn],
) -> None:
    ck = _confluent_kafka()
    last: object = None
    while time.monotonic() < deadline:
        check()
        # Bounded per attempt, so a JVM that dies meanwhile is noticed within seconds
        # rather than at the overall deadline; librdkafka retries
        # COORDINATOR_LOAD_IN_PROGRESS inside each attempt.
        remaining = max(1.0, min(5.0, deadline - time.monotonic()))
        producer = ck.Producer({**quiet, "transactional.id": txn_id})
        consumer = ck.Consumer({**quiet, "group.id": group_id})
        try:
            producer.init_transactions(remaining)
            producer.begin_transaction()
            producer.produce(READINESS_TOPIC, b"ready")
            offsets = [ck.TopicPartition(READINESS_TOPIC, 0, 0)]
            group = consumer.consumer_group_metadata()
            producer.send_offsets_to_transaction(offsets, group, remaining)
            producer.commit_transaction(remaining)
            return
        except ck.KafkaException as exc:
            last = exc  # a fresh producer next round fences this one's transaction
        finally:
            consumer.close()
        time.sleep(0.5)
    fail(f"transactions not ready for {txn_id}/{group_id} ({last})")


def coordinator_partitions(config: Mapping[str, str], internal_topic: str) -> int:
    """Partitions of __transaction_state ("transaction") or __consumer_offsets ("offsets")."""
    key = {
        "transaction": "transaction.state.log.num.partitions",
        "offsets": "offsets.topic.num.partitions",
    }[internal_topic]
    # Kafka's default (50) if a caller removed ours; the probe stays correct.
    return int(config.get(key, "50"))


def coordinator_partition(coordinator_id: str, partitions: int) -> int:
    """The partition of __transaction_state / __consumer_offsets that coordinates a
    transactional id / group id: ``Utils.abs(id.hashCode()) % partitions`` in Kafka
    (Utils.abs maps MIN_VALUE to 0)."""
    h = _java_string_hash(coordinator_id)
    return (0 if h == -(1 << 31) else abs(h)) % partitions


def answers_requests(port: int, timeout: float = 1.0) -> bool:
    """Whether the broker on ``port`` itself serves requests: an ApiVersions round trip.

    A client library cannot say this of one given broker (its metadata comes from any
    broker it knows, and may still list a dead incarnation). A KRaft broker binds its
    port before it has caught up and been unfenced, but reads requests only after, so
    an answer means this very process is registered and serving.
    """
    # ApiVersions v0: size, api_key 18, api_version 0, correlation id, client id.
    client_id = b"onceflow-infra"
    body = struct.pack(">hhih", 18, 0, 0x0F1CE, len(client_id)) + client_id
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            head = b""
            while len(head) < 8:
                chunk = sock.recv(8 - len(head))
                if not chunk:
                    return False
                head += chunk
    except OSError:  # refused, reset, or timed out (not serving yet, or paused)
        return False
    # Any answer with our correlation id counts, even an error (a version it no longer
    # supports is answered with UNSUPPORTED_VERSION): the broker is reading requests.
    correlation: int = struct.unpack(">ii", head)[1]
    return correlation == 0x0F1CE


def _java_string_hash(text: str) -> int:
    """Java's String.hashCode (32-bit signed), for ids made of BMP characters."""
    h = 0
    for char in text:
        h = (31 * h + ord(char)) & 0xFFFFFFFF
    return h - (1 << 32) if h >= 1 << 31 else h


def one_id_per_partition(prefix: str, partitions: int) -> list[str]:
    """Ids ``prefix-N``, one landing on each coordinator partition (list index)."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < partitions:
        name = f"{prefix}-{n}"
        found.setdefault(coordinator_partition(name, partitions), name)
        n += 1
    return [found[p] for p in range(partitions)]


def _megabytes(size: str) -> int:
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", size)
    if match is None:
        raise KafkaBrokerError(f"bad heap size {size!r}; use e.g. 512m or 1g")
    unit = {"": 1 / (1 << 20), "k": 1 / 1024, "m": 1, "g": 1024}[match.group(2).lower()]
    return max(1, int(int(match.group(1)) * unit))


# ------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python infra/kafka_broker.py",
        description="Run onceflow's single-node Kafka broker by hand.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="run a broker in the foreground until Ctrl-C")
    start.add_argument("--dir", required=True, type=Path, help="work dir (kept across runs)")
    start.add_argument("--port", type=int, help="client port (default: kept from --dir)")
    start.add_argument("--heap", default="512m", help="JVM max heap (default 512m)")
    start.add_argument(
        "--no-wait-transactions",
        action="store_true",
        help="return as soon as metadata works, without the transaction probe",
    )
    commands.add_parser("resolve", help="resolve the jars (once) and print the classpath")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        if args.command == "resolve":
            print(resolve())
            return 0
        broker = KafkaBroker(
            args.dir,
            args.port,
            heap=args.heap,
            wait_transactions=not args.no_wait_transactions,
        )
        lines = [
            f"bootstrap.servers={broker.bootstrap}",
            f"server log: {broker.server_log}  (Ctrl-C to stop)",
        ]
        return run_in_foreground(broker, lambda: lines, "broker")
    except KafkaBrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

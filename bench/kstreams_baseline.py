"""The Kafka Streams (Java) baseline of bench_kafka.py: built on first use, run, stopped.

`bench/kstreams/` is a small Maven project: `pom.xml` (kafka-streams at the broker's Kafka
version, Jackson for the JSON decode, slf4j-simple) and one class, `KStreamsBench`, with
two workloads: `sum` (the keyed running sum, one output per input, the record cache off)
and `window` (a tumbling-window sum with `suppress(untilWindowCloses)`). See its javadoc
for the timer.

`build()` copies the project into a cache folder ($ONCEFLOW_KSTREAMS_CACHE, else
`~/.cache/onceflow/kstreams-bench-<hash of the project>`), runs
`mvn package dependency:copy-dependencies` there once and returns the `java` classpath; the
folder's name holds a hash of the pom and the sources, so an edit builds anew and a
stale jar is never run. Nothing is written into the work tree.

Standard library only (plus `infra`, imported in the functions that need it), so that
bench_kafka's top level stays importable by its App child processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

BENCH_DIR = Path(__file__).resolve().parent
PROJECT = BENCH_DIR / "kstreams"
POM = PROJECT / "pom.xml"
MAIN_CLASS = "dev.onceflow.bench.KStreamsBench"
JAR_NAME = "kstreams-bench.jar"

# What each onceflow guarantee is called in Kafka Streams' processing.guarantee.
GUARANTEES = {"exactly-once": "exactly_once_v2", "at-least-once": "at_least_once"}

HINT = (
    "The Kafka Streams baseline needs a JDK 17+ (`java` and `javac`; Debian/Ubuntu: "
    "`apt-get install openjdk-17-jdk-headless`, or JAVA_HOME pointing at one) and Maven "
    "(`apt-get install maven`), which fetches its jars from Maven Central on first use. "
    "Run without it: --no-kstreams."
)

# A modest heap: the machine is shared, and the unbounded suppress buffer of the window
# workload holds at most one window per key (1000 keys) at a time.
JVM_FLAGS = (
    "-Xms256m",
    "-Xmx1g",
    "-Djava.awt.headless=true",
    # slf4j-simple logs INFO by default: Kafka Streams' config dumps would fill the
    # captured stderr and hide the warning that explains a failure.
    "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
)

Mode = Literal["sum", "window"]


class KStreamsUnavailable(Exception):
    """Java or Maven is missing: the baseline cannot be built here (not a failure)."""


class KStreamsFailed(Exception):
    """The build or a run failed; the message carries the tool's own output."""


# -- build --------------------------------------------------------------------------------


def kafka_streams_version(pom: Path = POM) -> str:
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = ET.parse(pom).getroot().find("m:properties/m:kafka.version", ns)
    if node is None or not (node.text or "").strip():
        raise KStreamsFailed(f"{pom} has no <kafka.version> property")
    return (node.text or "").strip()


def project_digest(project: Path = PROJECT) -> str:
    """A hash of the pom and every source file (paths and contents)."""
    h = hashlib.sha256()
    files = [project / "pom.xml", *sorted((project / "src").rglob("*"))]
    for f in files:
        if f.is_file():
            h.update(str(f.relative_to(project)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def cache_dir(project: Path = PROJECT) -> Path:
    override = os.environ.get("ONCEFLOW_KSTREAMS_CACHE")
    if override:
        return Path(override).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "onceflow" / f"kstreams-bench-{project_digest(project)[:16]}"


def find_tools() -> tuple[str, str]:
    """(java, mvn), checked: Java 17+, a compiler next to it, Maven on PATH."""
    import sys

    repo = str(BENCH_DIR.parent)
    if repo not in sys.path:
        sys.path.insert(0, repo)
    from infra.kafka_broker import ENABLE_HINT, KafkaUnavailable, find_java

    try:
        java = find_java()
    except KafkaUnavailable as exc:
        # Its hint is the broker's (a JRE is enough there); ours names the JDK.
        raise KStreamsUnavailable(f"{str(exc).replace(ENABLE_HINT, '').strip()} {HINT}") from exc
    javac = Path(java).resolve().parent / "javac"
    if not os.access(javac, os.X_OK) and shutil.which("javac") is None:
        raise KStreamsUnavailable(f"{java} has no `javac` beside it (a JRE, not a JDK). {HINT}")
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KStreamsUnavailable(f"`mvn` not found on PATH. {HINT}")
    return java, mvn


def classpath(cache: Path) -> str:
    jars = [cache / JAR_NAME, *sorted((cache / "lib").glob("*.jar"))]
    return os.pathsep.join(str(j) for j in jars)


def build(log: Any = None, project: Path = PROJECT) -> tuple[str, str]:
    """Build the baseline once into its cache folder; return (java, classpath).

    A file lock serialises concurrent builds (two benches at once); `built.ok`, written
    last, marks a complete build, so an interrupted one is redone.
    """
    java, mvn = find_tools()
    cache = cache_dir(project)
    marker = cache / "built.ok"
    if marker.exists():
        return java, classpath(cache)
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / ".lock"):
        if marker.exists():
            return java, classpath(cache)
        src = cache / "project"
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(cache / "lib", ignore_errors=True)
        shutil.copytree(project, src, ignore=shutil.ignore_patterns("target"))
        cmd = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(src / "pom.xml"),
            "package",
            "dependency:copy-dependencies",
            "-Dmaven.test.skip=true",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={cache / 'lib'}",
        ]
        if log is not None:
            log(f"building the Kafka Streams baseline with Maven into {cache} (first use only)")
        started = time.monotonic()
        env = {**os.environ, "JAVA_HOME": str(Path(java).resolve().parent.parent)}
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
        except subprocess.TimeoutExpired as exc:
            raise KStreamsFailed(f"Maven did not finish in {exc.timeout:.0f}s: {cmd}") from exc
        if done.returncode != 0:
            out = (done.stdout + done.stderr).strip()[-4000:]
            raise KStreamsFailed(
                f"Maven could not build the Kafka Streams baseline ({' '.join(cmd)}), "
                f"exit {done.returncode}:\n{out}"
            )
        shutil.copy2(src / "target" / JAR_NAME, cache / JAR_NAME)
        marker.write_text(f"{project_digest(project)}\n{kafka_streams_version()}\n")
        if log is not None:
            log(f"built the Kafka Streams baseline in {time.monotonic() - started:.0f}s")
    return java, classpath(cache)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- run ----------------------------------------------------------------------------------


def command(
    java: str,
    cp: str,
    mode: Mode,
    *,
    bootstrap: str,
    input_topic: str,
    output_topic: str,
    app_id: str,
    state_dir: Path,
    interval: float,
    guarantee: str,
    cache_max_bytes: int | None,
    window_ms: int = 1000,
    grace_ms: int = 0,
    serve: bool = False,
    timeout_s: float = 1800,
) -> list[str]:
    cmd = [
        java,
        *JVM_FLAGS,
        "-cp",
        cp,
        MAIN_CLASS,
        mode,
        "--bootstrap",
        bootstrap,
        "--input",
        input_topic,
        "--output",
        output_topic,
        "--app-id",
        app_id,
        "--state-dir",
        str(state_dir),
        "--commit-interval-ms",
        str(round(interval * 1000)),
        "--guarantee",
        GUARANTEES[guarantee],
        "--cache-max-bytes",
        str(-1 if cache_max_bytes is None else cache_max_bytes),
        "--timeout-s",
        str(round(timeout_s)),
    ]
    if mode == "window":
        cmd += ["--window-ms", str(window_ms), "--grace-ms", str(grace_ms)]
    if serve:
        cmd.append("--serve")
    return cmd


def _spawn(cmd: list[str], stderr: IO[bytes]) -> subprocess.Popen[bytes]:
    from infra._process import pdeathsig_preexec

    # stdin stays open for the child's whole life: the Java side ends when it closes,
    # so a bench that dies (even by SIGKILL) never leaves a JVM behind.
    return subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        preexec_fn=pdeathsig_preexec(),
    )


def run_timed(cmd: list[str]) -> dict[str, Any]:
    """Run one timed KStreamsBench; its JSON row. Raises KStreamsFailed on any failure."""
    with tempfile.TemporaryFile() as err:
        proc = _spawn(cmd, err)
        assert proc.stdout is not None and proc.stdin is not None
        out = proc.stdout.read().decode()
        rc = proc.wait()
        proc.stdin.close()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    rows: list[dict[str, Any]] = [
        json.loads(line) for line in out.splitlines() if line.startswith("{")
    ]
    if rc != 0 or not rows or rows[-1].get("error"):
        why = rows[-1].get("error") if rows else None
        raise KStreamsFailed(
            f"KStreamsBench {cmd[cmd.index(MAIN_CLASS) + 1]} exited {rc}"
            f"{f' ({why})' if why else ''}: {stderr[-3000:]}"
        )
    return rows[-1]


class KStreamsApp:
    """A long-running KStreamsBench (`--serve`), for the latency figure: the interface of
    onceflow's supervisor `Child` that the latency measurement uses."""

    def __init__(self, cmd: list[str]) -> None:
        # Open for the child's whole life (it writes there), closed with the object.
        self._err = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = _spawn(cmd, self._err)
        self.row: dict[str, Any] | None = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 60.0) -> int:
        """Close its stdin: Kafka Streams closes (a last commit) and the JVM exits."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        out = self.proc.stdout.read().decode()
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        self.row = rows[-1] if rows else None
        return rc

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read().decode(errors="replace")

"""The faults of `onceflow chaos` beyond a SIGKILL: the plan, the workers, the feeder.

Each fault kind is a named entry of the plan (`FAULTS`); `Faults` runs one entry:

- `kill`: a worker SIGKILLed at a random moment, and once at every protocol step;
- `pause`: a worker stops itself (SIGSTOP) at a protocol step, a successor takes over
  (a second process on the embedded store, which takes the lease; on Kafka a new
  incarnation of the slot, or for `in_transaction` the other workers, once the group
  let the paused member's session expire), then the zombie resumes: everything it then
  writes must be refused;
- `twin`: two processes of one worker slot started at once; one must stop, fenced;
- `producer-twin`: two `Producer`s of one producer id send a chunk by turns. On the
  embedded store each new session fences the older one, which opens a new session
  and re-sends what was not acknowledged; on Kafka neither is fenced;
- `starve`: a CPU-bound process beside the workers, every one of their threads and
  it pinned to one core, for a stretch;
- `broker-kill`: the Kafka broker SIGKILLed and restarted;
- `broker-outage`: the broker down (killed, or paused if it can be) for longer than the
  group session;
- `broker-pause-commit`: a worker paused just before its commit, the broker SIGSTOPped,
  the worker resumed so that its commit hangs, the broker resumed later;
- `pg-restart`: the PostgreSQL server of the sinks restarted.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ._errors import OnceflowError, ProducerFencedError
from ._kafka import SESSION_TIMEOUT_S
from ._kafka_common import is_kafka
from ._producer import Producer
from ._supervisor import Child
from ._worker import FENCED_EXIT
from .testing import Event

FAULTS: tuple[str, ...] = (
    "kill",
    "pause",
    "twin",
    "producer-twin",
    "starve",
    "broker-kill",
    "broker-outage",
    "broker-pause-commit",
    "pg-restart",
)
_BROKER_FAULTS = ("broker-kill", "broker-outage", "broker-pause-commit")

# How long a child started with a crash or pause point may take to reach it before it is
# killed anyway: a point the pipeline never passes (no FileSink, say) must not stall it.
STEP_WAIT_S = 8.0
# Bounds on the waits of a fault on the embedded store (Kafka: 5 times them): a
# successor's first commit, a fenced process's exit. Past them the fault goes on as it
# is, so that a pipeline with no input in flight at that moment cannot stall the run.
# None of them decides a check.
_TAKEOVER_S = 6.0
_EXIT_S = 6.0


class BrokerControl(Protocol):
    """What chaos needs of a Kafka broker it may crash: a hard kill and a restart."""

    def kill(self) -> None: ...

    def restart(self) -> None: ...


@runtime_checkable
class PausableBroker(Protocol):
    """A broker that can also be frozen (SIGSTOP) and resumed: for `broker-pause-commit`."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...


class PostgresControl(Protocol):
    """What chaos needs of the PostgreSQL server of the sinks: a restart."""

    def restart(self) -> None: ...


class ShellBroker:
    """A broker controlled by shell commands (`--broker-kill`, `--broker-start`)."""

    def __init__(self, kill_cmd: str, start_cmd: str) -> None:
        self.kill_cmd, self.start_cmd = kill_cmd, start_cmd

    def kill(self) -> None:
        subprocess.run(self.kill_cmd, shell=True, check=True)

    def restart(self) -> None:
        subprocess.run(self.start_cmd, shell=True, check=True)


class ShellPausableBroker(ShellBroker):
    """Also `--broker-pause` and `--broker-resume` (say, kill -STOP / -CONT of its pid)."""

    def __init__(self, kill_cmd: str, start_cmd: str, pause_cmd: str, resume_cmd: str) -> None:
        super().__init__(kill_cmd, start_cmd)
        self.pause_cmd, self.resume_cmd = pause_cmd, resume_cmd

    def pause(self) -> None:
        subprocess.run(self.pause_cmd, shell=True, check=True)

    def resume(self) -> None:
        subprocess.run(self.resume_cmd, shell=True, check=True)


class ShellPostgres:
    """A PostgreSQL server restarted by a shell command (`--postgres-restart`)."""

    def __init__(self, restart_cmd: str) -> None:
        self.restart_cmd = restart_cmd

    def restart(self) -> None:
        subprocess.run(self.restart_cmd, shell=True, check=True)


def applicable(
    on_kafka: bool, broker: BrokerControl | None, postgres: PostgresControl | None
) -> tuple[str, ...]:
    """The fault kinds this run can inject: the default plan."""
    out = ["kill", "pause", "twin", "producer-twin", "starve"]
    if on_kafka and broker is not None:
        out += ["broker-kill", "broker-outage"]
        if isinstance(broker, PausableBroker):
            out.append("broker-pause-commit")
    if postgres is not None:
        out.append("pg-restart")
    return tuple(out)


def choose(
    asked: Sequence[str] | None,
    on_kafka: bool,
    broker: BrokerControl | None,
    postgres: PostgresControl | None,
) -> tuple[str, ...]:
    """The faults asked for (all that apply when None), refusing any that cannot run."""
    can = applicable(on_kafka, broker, postgres)
    if asked is None:
        return can
    unknown = [f for f in asked if f not in FAULTS]
    if unknown:
        raise ValueError(f"unknown fault {', '.join(unknown)}; use some of {', '.join(FAULTS)}")
    cannot = [f for f in asked if f not in can]
    if cannot:
        raise ValueError(
            f"fault {', '.join(cannot)} cannot run here: broker faults need a Kafka store and "
            "broker control (broker-pause-commit: a broker that can be paused), pg-restart "
            "a PostgreSQL server control"
        )
    return tuple(dict.fromkeys(asked))


Entry = tuple[str, str | None]
Check = tuple[str, bool, str]


def plan(
    faults: Sequence[str],
    points: Sequence[str],
    *,
    kills: int,
    broker_kills: int,
    rounds: int,
    rng: random.Random,
) -> list[Entry]:
    """The shuffled plan: (kind, protocol step or None) per entry."""
    out: list[Entry] = []
    for kind in faults:
        if kind == "kill":
            out += [("kill", p) for p in points] + [("kill", None)] * kills
        elif kind == "pause":
            out += [("pause", p) for p in points] * rounds
        elif kind == "broker-kill":
            out += [("broker-kill", None)] * broker_kills
        else:
            out += [(kind, None)] * rounds
    rng.shuffle(out)
    return out


@dataclass
class FaultLog:
    """What the faults did, for the result and its checks."""

    counts: Counter[str] = field(default_factory=Counter)
    step_kills: list[str] = field(default_factory=list)
    pauses: list[str] = field(default_factory=list)
    # How each zombie and each pair of twins ended: "fenced", "rejoined", "idle".
    zombies: Counter[str] = field(default_factory=Counter)
    twins: Counter[str] = field(default_factory=Counter)
    producer_fences: int = 0
    # Workers that stopped by themselves (not by a fence chaos provoked): what they said.
    died: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def audit(log: FaultLog, kinds: Sequence[str], on_kafka: bool) -> list[Check]:
    """What the faults themselves saw: no process stopped other than by a fence chaos
    provoked, every zombie and twin that stopped was fenced, producers kept their word."""
    checks: list[Check] = []
    checks.append(
        (
            "no worker stopped by itself (every worker alive at the end)",
            not log.died and not log.errors,
            "; ".join(log.died + log.errors)[:800] or "none",
        )
    )
    if "pause" in kinds:
        checks.append(
            (
                "every zombie resumed after a takeover was fenced or rejoined",
                log.zombies["error"] == 0,
                _outcomes(log.zombies, f"{len(log.pauses)} pauses"),
            )
        )
    if "twin" in kinds:
        checks.append(
            (
                "of two processes of one worker slot, one stopped fenced and one ran on",
                log.twins["error"] == 0 and log.twins["both stopped"] == 0,
                _outcomes(log.twins, f"{log.counts['twin']} pairs"),
            )
        )
    if "producer-twin" in kinds:
        # Embedded: a new session fences the older one, which must re-send. Kafka: each
        # Producer is a session of its own, and neither is fenced (docs/guide.md).
        fenced = log.producer_fences
        checks.append(
            (
                "two Producers of one producer_id: neither fenced, both stored what they sent"
                if on_kafka
                else "two Producers of one producer_id: the older fenced, and re-sent",
                fenced == 0 if on_kafka else fenced > 0,
                f"{fenced} sends fenced and re-sent from a new session",
            )
        )

    return checks


def _outcomes(counts: Counter[str], total: str) -> str:
    return ", ".join([total] + [f"{n} {what}" for what, n in sorted(counts.items())])


# -- workers ------------------------------------------------------------------------


def _fenced(child: Child) -> bool:
    """Whether the child stopped with a FencedError (of the store, the slot or a sink)."""
    return child.proc.returncode == FENCED_EXIT


class Workers:
    """The App's worker processes: one on the embedded store, one per slot on Kafka."""

    def __init__(
        self, target: str, store: str, count: int, workdir: str, log: FaultLog | None = None
    ) -> None:
        self.target, self.store, self.count = target, store, count
        self.log = log if log is not None else FaultLog()
        self.env = {"ONCEFLOW_STATE_DIR": os.path.join(workdir, "state")}
        self.children: dict[int, Child] = {}
        self.restarts = 0
        # Applied to every child as it starts (the `starve` fault pins them to one core).
        self.cpus: set[int] | None = None

    def start(
        self,
        slot: int,
        crash_at: str | None = None,
        until_idle: bool = False,
        pause_at: str | None = None,
        replace: bool = True,
    ) -> Child:
        child = Child(
            self.target,
            store=self.store,
            crash_at=crash_at,
            pause_at=pause_at,
            until_idle=until_idle,
            env={**self.env, "ONCEFLOW_WORKER": str(slot)},
        )
        if self.cpus is not None:
            pin(child.proc.pid, self.cpus)
        if replace:
            self.children[slot] = child
        return child

    def start_all(self) -> None:
        for slot in range(self.count):
            self.start(slot)

    def revive(self) -> None:
        """Restart every worker that died on its own, remembering why it died."""
        for slot, child in list(self.children.items()):
            if not child.alive():
                self.restarts += 1
                self.log.died.append(
                    f"worker {slot} exited {child.proc.returncode}: {child.stderr()[-300:]}"
                )
                self.start(slot)

    def kill_all(self) -> None:
        for child in self.children.values():
            child.kill()


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` on `cpus` (os.sched_setaffinity(pid) moves one thread only)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        tids = [str(pid)]
    for tid in tids:
        with contextlib.suppress(OSError):  # the thread (or process) is gone
            os.sched_setaffinity(int(tid), cpus)


def wait_for(pred: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


# -- progress markers ---------------------------------------------------------------


# Asked of Kafka in a child process: librdkafka 2.16 aborts the whole process when an
# admin request to a group coordinator times out or loses its broker (librdkafka#4605),
# which chaos provokes on purpose; a child that dies that way only means "cannot tell".
_GROUP_PROBE = """
import sys
from onceflow._kafka_status import Cluster
store, app, what = sys.argv[1:4]
cluster = Cluster(store)
if what == "committed":
    print(sum(cluster.committed(app).values()))
else:
    members = cluster.members(app)
    print("none" if members is None else members)
"""


def _ask_group(store: str, app: str, what: str) -> int | None:
    try:
        out = subprocess.run(
            [sys.executable, "-c", _GROUP_PROBE, store, app, what],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or not lines or not lines[-1].isdigit():
        return None
    return int(lines[-1])


def committed_total(store: str, app: str, topics: Sequence[str]) -> int | None:
    """The App's committed input offsets, summed (None: the store cannot tell now)."""
    try:
        if is_kafka(store):
            return _ask_group(store, app, "committed")
        from ._sqlite import SQLiteStore

        st = SQLiteStore(store)
        try:
            return sum(sum(st.committed(app, t).values()) for t in topics)
        finally:
            st.close()
    except OnceflowError:
        return None


def group_settled_without(store: str, app: str, members: int) -> bool:
    """Whether the Kafka group is stable with `members` members (a paused one left)."""
    return _ask_group(store, app, "members") == members


# -- the feeder ---------------------------------------------------------------------


class Feeder(threading.Thread):
    """The producer beside the faults: one chunk of the events per plan entry, trickled
    so that one incarnation polls several times. A chunk is sent by one session per
    producer id, or in `producer-twin` by two of each by turns."""

    def __init__(
        self, store: str, events: list[Event], chunks: int, log: FaultLog, pace: float
    ) -> None:
        super().__init__(name="chaos-producer", daemon=True)
        self.store, self.events, self.log, self.pace = store, events, log, pace
        self.chunk = max(1, -(-len(events) // chunks))
        self._turns: list[tuple[bool, threading.Event]] = []
        self._ready = threading.Semaphore(0)
        self.sessions: dict[str, Producer] = {}
        self.error: BaseException | None = None

    def release(self, twin: bool = False) -> threading.Event:
        """Let the next chunk go; the event is set once it is sent."""
        done = threading.Event()
        self._turns.append((twin, done))
        self._ready.release()
        return done

    def run(self) -> None:
        try:
            for start in range(0, len(self.events), self.chunk):
                self._ready.acquire()
                twin, done = self._turns.pop(0)
                part = self.events[start : start + self.chunk]
                if twin:
                    self._send_twin(part)
                else:
                    self._send_trickled(part)
                done.set()
        except BaseException as exc:
            self.error = exc
        finally:
            _close(self.sessions)
            for _, done in self._turns:
                done.set()

    def _steps(self, part: list[Event]) -> list[list[Event]]:
        step = max(1, self.chunk // 10)
        return [part[i : i + step] for i in range(0, len(part), step)]

    def _send_trickled(self, part: list[Event]) -> None:
        for step in self._steps(part):
            self._send(self.sessions, step)
            time.sleep(self.pace)

    def _send_twin(self, part: list[Event]) -> None:
        """Two sessions of each producer id send the chunk's steps by turns, in order (the
        reference sends them in order too); the second opens while the first sends."""
        twin: dict[str, Producer] = {}
        ids = sorted({e.producer for e in part})
        opener = threading.Thread(
            target=lambda: [self._open(twin, pid) for pid in ids], name="chaos-twin", daemon=True
        )
        opener.start()
        try:
            for i, step in enumerate(self._steps(part)):
                if i % 2:
                    opener.join()
                self._send(twin if i % 2 else self.sessions, step)
        finally:
            opener.join()
            _close(twin)

    def _open(self, sessions: dict[str, Producer], pid: str) -> Producer:
        old = sessions.pop(pid, None)
        if old is not None:
            _close({pid: old})
        p = sessions[pid] = Producer(self.store, producer_id=pid)
        return p

    def _send(self, sessions: dict[str, Producer], events: list[Event]) -> None:
        for run in _runs(events):
            first = run[0]
            seqs = [e.sequence for e in run]
            while True:
                p = sessions.get(first.producer) or self._open(sessions, first.producer)
                try:
                    p.send_batch(
                        first.topic,
                        [(e.key, e.value, e.id) for e in run],
                        sequences=None if seqs[0] is None else [int(s or 0) for s in seqs],
                    )
                    break
                except ProducerFencedError:
                    # A newer session of this id (the twin) fenced this one, and the
                    # send was not stored: a new session re-sends it, as a client must.
                    self.log.producer_fences += 1
                    self._open(sessions, first.producer)


def _runs(events: list[Event]) -> list[list[Event]]:
    """Consecutive events of one producer id and topic, one send_batch each."""
    out: list[list[Event]] = []
    for ev in events:
        if (
            out
            and out[-1][0].producer == ev.producer
            and out[-1][0].topic == ev.topic
            and (out[-1][0].sequence is None) == (ev.sequence is None)
        ):
            out[-1].append(ev)
        else:
            out.append([ev])
    return out


def _close(sessions: dict[str, Producer]) -> None:
    for p in sessions.values():
        with contextlib.suppress(OnceflowError):  # a fenced session may refuse its flush
            p.close()
    sessions.clear()


# -- the faults ---------------------------------------------------------------------


@dataclass
class Faults:
    """Runs plan entries against the workers; everything it saw goes into `log`."""

    pool: Workers
    app: str
    topics: list[str]
    on_kafka: bool
    rng: random.Random
    log: FaultLog
    progress: Callable[[str], None]
    broker: BrokerControl | None = None
    postgres: PostgresControl | None = None
    broker_pause_s: float = 35.0

    def run(self, kind: str, point: str | None, feeder: Feeder) -> None:
        """One entry: its chunk of input is released first (all of it, for a twin)."""
        done = feeder.release(twin=kind == "producer-twin")
        slot = self.rng.randrange(self.pool.count)
        if kind == "kill":
            self.kill(slot, point)
        elif kind == "pause":
            assert point is not None
            self.pause(slot, point)
        elif kind == "twin":
            self.twin(slot)
        elif kind == "producer-twin":
            self.producer_twin(done)
        elif kind == "starve":
            self.starve()
        elif kind == "broker-kill":
            self.broker_kill()
        elif kind == "broker-outage":
            self.broker_outage()
        elif kind == "broker-pause-commit":
            self.broker_pause_commit(slot)
        elif kind == "pg-restart":
            self.pg_restart()
        self.log.counts[kind] += 1

    def _step_wait(self) -> float:
        return STEP_WAIT_S * (3 if self.on_kafka else 1)

    def _bound(self, seconds: float) -> float:
        return seconds * (5 if self.on_kafka else 1)

    def kill(self, slot: int, point: str | None) -> None:
        if point is None:
            time.sleep(self.rng.uniform(0.3, 1.5) if self.on_kafka else self.rng.uniform(0.2, 1.2))
            self.pool.children[slot].kill()
            self.pool.start(slot)
            self.progress(f"random kill (worker {slot})")
            return
        self.pool.children[slot].kill()
        child = self.pool.start(slot, crash_at=f"{point}:{self.rng.randint(1, 2)}")
        if not wait_for(lambda: not child.alive(), self._step_wait(), 0.02):
            # It never reached the point: kill it anyway, as a random kill.
            child.kill()
            self._not_reached(child, point)
        elif child.killed:
            self.log.step_kills.append(point)
            self.progress(f"killed at {point} (worker {slot})")
        else:
            self._exited(child)
        self.pool.start(slot)

    def pause(self, slot: int, point: str) -> None:
        """A zombie at `point`: stopped there while a successor takes over, then resumed."""
        self.pool.children[slot].kill()
        zombie = self.pool.start(slot, pause_at=f"{point}:{self.rng.randint(1, 2)}")
        if not wait_for(lambda: zombie.stopped() or not zombie.alive(), self._step_wait(), 0.02):
            zombie.kill()
            self.pool.start(slot)
            self._not_reached(zombie, point)
            return
        if not zombie.alive():
            self._exited(zombie)
            self.pool.start(slot)
            return
        self.log.pauses.append(point)
        # On Kafka with other workers, a zombie paused with its transaction open has its
        # partitions taken by them (hole 1 of issue 8); elsewhere its slot restarts.
        rebalance = self.on_kafka and self.pool.count > 1 and point == "in_transaction"
        took = self._take_over(slot, rebalance)
        how = "the other workers" if rebalance else "a successor"
        self.progress(
            f"paused at {point} (worker {slot}); {how} "
            + ("took over" if took else "made no commit meanwhile")
            + "; zombie resumed"
        )
        zombie.resume()
        if rebalance:
            # No other process holds its slot: it must drop its epoch, rejoin and go on.
            self.pool.children[slot] = zombie
            self.log.zombies["rejoined"] += 1
            return
        self._await_fence(zombie, self.log.zombies, slot)

    def _take_over(self, slot: int, rebalance: bool) -> bool:
        """A successor for the paused worker of `slot`; whether it committed meanwhile."""
        before = committed_total(self.pool.store, self.app, self.topics) or 0
        if rebalance:
            del self.pool.children[slot]
            wait_for(
                lambda: group_settled_without(self.pool.store, self.app, self.pool.count - 1),
                SESSION_TIMEOUT_S + self._bound(_TAKEOVER_S),
                0.5,
            )
        else:
            self.pool.start(slot)
        # A zombie holding the embedded store's write lock (in_transaction) blocks every
        # successor: the bound lets it go on and commit, as a slow disk's owner would.
        return wait_for(
            lambda: (committed_total(self.pool.store, self.app, self.topics) or 0) > before,
            self._bound(_TAKEOVER_S),
            0.1,
        )

    def twin(self, slot: int) -> None:
        """Two processes of one slot (one store) at once: one stops, fenced."""
        self.pool.children[slot].kill()
        first = self.pool.start(slot, replace=False)
        second = self.pool.start(slot, replace=False)
        wait_for(lambda: not first.alive() or not second.alive(), self._bound(_EXIT_S * 2), 0.1)
        alive = [c for c in (first, second) if c.alive()]
        gone = [c for c in (first, second) if not c.alive()]
        if len(alive) == 2:
            # Neither noticed the other yet (no commit attempted): the second stays.
            first.kill()
            self.log.twins["idle"] += 1
            self.pool.children[slot] = second
        elif len(alive) == 1:
            self.pool.children[slot] = alive[0]
            self._count_exit(gone[0], self.log.twins)
        else:
            self.log.twins["both stopped"] += 1
            self.log.errors.append(
                "two processes of one worker slot both stopped: "
                + " | ".join(c.stderr()[-300:] for c in gone)
            )
            self.pool.start(slot)
        self.progress(f"two processes of worker {slot} at once: {dict(self.log.twins)}")

    def producer_twin(self, done: threading.Event) -> None:
        fences = self.log.producer_fences
        done.wait(600)
        self.progress(f"two producers of one id: {self.log.producer_fences - fences} fenced")

    def starve(self) -> None:
        """A CPU-bound competitor, it and every worker thread pinned to one core."""
        everywhere = os.sched_getaffinity(0)
        core = {min(everywhere)}
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            pin(hog.pid, core)
            self.pool.cpus = core
            for child in self.pool.children.values():
                pin(child.proc.pid, core)
            seconds = self.rng.uniform(6, 12) if self.on_kafka else self.rng.uniform(3, 6)
            self.progress(f"CPU starved for {seconds:.0f}s (one core, with a competitor)")
            time.sleep(seconds)
        finally:
            hog.kill()
            hog.wait()
            self.pool.cpus = None
            for child in self.pool.children.values():
                pin(child.proc.pid, everywhere)

    def broker_kill(self) -> None:
        assert self.broker is not None
        time.sleep(self.rng.uniform(0.5, 1.5))
        self.broker.kill()
        self.progress("broker killed (SIGKILL)")
        time.sleep(1.0)
        self.broker.restart()
        self.progress("broker restarted")

    def broker_outage(self) -> None:
        """Down longer than the group session: every member's session ends."""
        assert self.broker is not None
        seconds = SESSION_TIMEOUT_S + self.rng.uniform(2.0, 5.0)
        time.sleep(self.rng.uniform(0.5, 1.5))
        if isinstance(self.broker, PausableBroker) and self.rng.random() < 0.5:
            self.broker.pause()
            self.progress(f"broker paused (SIGSTOP) for {seconds:.0f}s")
            time.sleep(seconds)
            self.broker.resume()
        else:
            self.broker.kill()
            self.progress(f"broker killed, down for {seconds:.0f}s")
            time.sleep(seconds)
            self.broker.restart()
        self.progress("broker back")

    def broker_pause_commit(self, slot: int) -> None:
        """The broker frozen while a worker's commit is on its way to it."""
        broker = self.broker
        assert isinstance(broker, PausableBroker)
        self.pool.children[slot].kill()
        child = self.pool.start(slot, pause_at=f"in_transaction:{self.rng.randint(1, 2)}")
        if not wait_for(lambda: child.stopped() or not child.alive(), self._step_wait(), 0.02):
            child.kill()
            self.pool.start(slot)
            self._not_reached(child, "in_transaction")
            return
        broker.pause()
        child.resume()
        self.progress(f"broker paused in worker {slot}'s commit for {self.broker_pause_s:.0f}s")
        time.sleep(self.broker_pause_s)
        broker.resume()
        self.progress("broker resumed")

    def pg_restart(self) -> None:
        assert self.postgres is not None
        time.sleep(self.rng.uniform(0.3, 1.0))
        self.postgres.restart()
        self.progress("PostgreSQL restarted")

    def _not_reached(self, child: Child, point: str) -> None:
        last = child.stderr().strip().splitlines()[-1:] or ["nothing"]
        self.progress(f"{point} not reached (it said: {last[0][:200]}); killed at random")

    def _await_fence(self, zombie: Child, outcomes: Counter[str], slot: int | None = None) -> None:
        """A resumed zombie must stop, fenced, at its next write; one with nothing to write
        before the bound is killed (it would be fenced at its first). On Kafka a zombie
        whose producer was fenced takes its partitions over again from the changelog, and
        if it joins the group first its successor of `slot` is the one fenced: one of
        the two stops, fenced, and the other runs on."""
        successor = self.pool.children.get(slot) if slot is not None else None
        if successor is zombie:
            successor = None

        def settled() -> bool:
            return not zombie.alive() or (successor is not None and not successor.alive())

        if not wait_for(settled, self._bound(_EXIT_S), 0.05):
            zombie.kill()
            outcomes["idle"] += 1
        elif not zombie.alive() or successor is None:
            self._count_exit(zombie, outcomes)
        elif _fenced(successor):
            assert slot is not None
            self.pool.children[slot] = zombie
            outcomes["took the slot back"] += 1
        else:
            self._count_exit(successor, outcomes)

    def _count_exit(self, child: Child, outcomes: Counter[str]) -> None:
        if _fenced(child):
            outcomes["fenced"] += 1
        else:
            outcomes["error"] += 1
            self._exited(child)

    def _exited(self, child: Child) -> None:
        code = child.proc.returncode
        if code not in (0, None):
            self.log.errors.append(f"exit {code}: {child.stderr()[-500:]}")

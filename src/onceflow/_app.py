"""App: the entry object. It owns the dataflow, builds it, and runs the epoch loop."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ._backend import TP, Session, SessionOptions, open_backend
from ._checkpoint import AfterCommitError, Checkpoint, EpochFailed, is_outage
from ._crash import CrashInjector, from_env
from ._dataflow import STATEFUL, Step, Stream, signature, validate
from ._effects import EffectSink
from ._errors import (
    CommitError,
    ConfigError,
    FencedError,
    SinkGuaranteeError,
    UnavailableError,
    UserFunctionError,
)
from ._hooks import Hooks, _Fanout
from ._runtime import Batch, DedupStep, Epoch, Executor
from ._serde import Encoding, decoder_for
from ._settings import Settings
from ._sinks import Sink, SinkContext
from ._sqlite import validate_topic_name
from ._state import StepState

log = logging.getLogger("onceflow")

Guarantee = Literal["exactly-once", "at-least-once"]

# Waits between attempts during an outage: from the first to the longest, doubling,
# with jitter so that the workers of a cluster do not all retry at one moment. The
# longest is short enough that a Kafka worker still polls its consumer (it stays in
# its group) and that an outage's end is noticed soon.
_BACKOFF_FIRST_S = 0.05
_BACKOFF_MAX_S = 5.0
# The statement of a commit that no record's content can make fail: a failure there is
# an outage whatever the exception says (step 5b of `_checkpoint.py`).
_NOT_A_RECORD = ("commit:begin", "commit:fence", "commit:offsets")


class _Outage:
    """Waits out an outage (step 5b): says so once when it starts and once when it is
    over, backs off, and returns at once when the App is asked to stop."""

    def __init__(self, app: str, stop: threading.Event) -> None:
        self.app = app
        self.stop = stop
        self.since: float | None = None
        self.attempts = 0

    def wait(self, exc: BaseException) -> None:
        self.attempts += 1
        if self.since is None:
            self.since = time.monotonic()
            # Our own wrappers say what failed and why; others need their type.
            ours = isinstance(exc, (CommitError, AfterCommitError))
            what = str(exc) if ours else f"{type(exc).__name__}: {exc}"
            log.warning(
                "app '%s' cannot go on: %s. It is waiting and retrying with backoff, as long "
                "as it takes; nothing is lost or repeated. Operator action: bring back the "
                "store, broker or service named above",
                self.app,
                what,
            )
        else:
            log.debug("app '%s': attempt %d failed: %s", self.app, self.attempts, exc)
        delay = min(_BACKOFF_MAX_S, _BACKOFF_FIRST_S * 2 ** min(self.attempts - 1, 16))
        deadline = time.monotonic() + delay * random.uniform(0.5, 1.0)
        # Short sleeps, not Event.wait: stop() comes from a signal handler, and
        # Event.set in a handler that interrupted Event.wait in the same thread can
        # deadlock on the event's lock.
        while not self.stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.05, left))

    def over(self) -> None:
        if self.since is not None:
            log.warning(
                "app '%s' is back after %.1fs and %d failed attempts; resuming",
                self.app,
                time.monotonic() - self.since,
                self.attempts,
            )
            self.since = None
            self.attempts = 0


@dataclass
class _Narrowing:
    """Step 5c under way: epochs of at most `size` records, until the record whose epoch
    fails alone is found, or `left` more records committed without a failure (the
    failure did not come back). `batches` are the current epoch's, to name the record."""

    size: int
    left: int
    batches: list[Batch] = field(default_factory=list)


class _Rebalance:
    """The App's side of partitions moving (`_backend.RebalanceListener`): sinks recover
    on partitions this process gets, the epoch in flight commits before partitions go
    (or is dropped when they are lost), and caches forget them after."""

    def __init__(
        self,
        app: App,
        session: Session,
        sinks: dict[str, Sink],
        cp: Checkpoint,
        executor: Executor,
    ) -> None:
        self.app = app
        self.session = session
        self.sinks = sinks
        self.cp = cp
        self.executor = executor

    def assigned(self, parts: list[TP]) -> dict[TP, int]:
        floors: dict[TP, int] = {}
        wanted = set(parts)
        for sink in self.sinks.values():
            # A sink that recorded offsets ahead of the store (the store was restored
            # from a backup, say) is where the partition resumes.
            for tp, off in (sink.partitions_assigned(parts) or {}).items():
                if tp in wanted:
                    floors[tp] = max(off, floors.get(tp, 0))
        return floors

    def revoking(self, parts: list[TP]) -> None:
        try:
            self.app._commit(self.cp, self.executor.epoch)
        except CommitError as exc:
            log.error("commit before a rebalance failed: %s", exc)

    def lost(self, parts: list[TP]) -> None:
        self.cp.abort()

    def revoked(self, parts: list[TP]) -> None:
        for sink in self.sinks.values():
            sink.partitions_revoked(parts)
        cp = self.cp
        # After partitions went away, once their epoch was committed (revoking) or
        # dropped (lost). Anything still uncommitted here would lose its state and dedup
        # changes while its outputs went on: drop the whole epoch instead.
        if (
            self.executor.epoch.records_in
            or any(st.dirty for st in cp.states.values())
            or any(d.new for d in cp.dedups.values())
        ):
            log.error("assignment changed with an uncommitted epoch; dropping it")
            cp.abort()
            self.session.rewind()
            return
        for st in cp.states.values():
            st.reset()
        for d in cp.dedups.values():
            d.reset()


@dataclass
class RunStats:
    """What one `App.run()` did, counted from committed epochs only."""

    records_in: int = 0
    records_out: int = 0
    commits: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    seconds: float = 0.0


class App:
    """A stream-processing application with an exactly-once guarantee.

        >>> from onceflow import App
        >>> app = App("doubler", store="demo.db")                     # doctest: +SKIP
        >>> app.source("numbers").map(lambda v: v * 2).to("doubled")  # doctest: +SKIP
        >>> app.run(until_idle=True)                                  # doctest: +SKIP

    Arguments left as None come from `ONCEFLOW_*` environment variables (see
    `onceflow --help`), then from the defaults.
    """

    def __init__(
        self,
        name: str,
        *,
        store: str | os.PathLike[str] | None = None,
        guarantee: Guarantee = "exactly-once",
        commit_interval: float | None = None,
        commit_every: int | None = None,
        max_batch: int | None = None,
        partitions: int | None = None,
        dead_letter_topic: str | None = None,
        on_error: Literal["dead-letter", "stop"] = "dead-letter",
        hooks: Sequence[Hooks] = (),
        state_cache_keys: int = 200_000,
        gc_tuning: bool = True,
        worker: int | None = None,
        state_dir: str | None = None,
    ) -> None:
        settings = Settings.from_env()
        validate_topic_name(name)
        if guarantee not in ("exactly-once", "at-least-once"):
            raise ConfigError(
                f"guarantee must be 'exactly-once' or 'at-least-once', got {guarantee!r}"
            )
        if on_error not in ("dead-letter", "stop"):
            raise ConfigError(f"on_error must be 'dead-letter' or 'stop', got {on_error!r}")
        self.name = name
        self.store = os.fspath(store) if store is not None else settings.store
        self.guarantee = guarantee
        self.commit_interval = (
            commit_interval if commit_interval is not None else settings.commit_interval
        )
        self.commit_every = commit_every if commit_every is not None else settings.commit_every
        self.max_batch = max_batch if max_batch is not None else settings.max_batch
        self.partitions = partitions if partitions is not None else settings.partitions
        if self.commit_interval <= 0:
            raise ConfigError(f"commit_interval must be > 0 seconds, got {self.commit_interval}")
        if self.commit_every < 1 or self.max_batch < 1 or self.partitions < 1:
            raise ConfigError("commit_every, max_batch and partitions must be at least 1")
        self.dead_letter_topic = dead_letter_topic or f"{name}.dead-letters"
        validate_topic_name(self.dead_letter_topic)
        self.on_error = on_error
        self.hooks = list(hooks)
        self.state_cache_keys = state_cache_keys
        self.gc_tuning = gc_tuning
        self.worker = worker
        self.state_dir = state_dir
        self._sources: list[Step] = []
        self._steps: list[Step] = []
        self._ids = 0
        self._stop = threading.Event()
        # Set by onceflow.testing to crash in-process instead of by SIGKILL.
        self._crash: CrashInjector | None = None
        self.stats = RunStats()

    # -- building -------------------------------------------------------------------

    def source(
        self,
        topic: str,
        *,
        value: Encoding | Callable[[bytes], Any] = "json",
        schema: type | None = None,
        partitions: int | None = None,
    ) -> Stream:
        """A stream of the committed records of `topic`, decoded by `value` (and validated
        against a msgspec `schema` if given). Records that fail go to the dead letters."""
        validate_topic_name(topic)
        if any(s.options["topic"] == topic for s in self._sources):
            raise ConfigError(f"topic '{topic}' is already a source of app '{self.name}'")
        step = Step(
            "source",
            f"source-{topic}",
            None,
            decoder_for(value, schema),
            {"topic": topic, "partitions": partitions},
        )
        self._sources.append(step)
        return Stream(self, step)

    def _next_step_id(self) -> int:
        self._ids += 1
        return self._ids

    def _register(self, step: Step) -> None:
        self._steps.append(step)

    def _sinks(self) -> dict[str, Sink]:
        sinks: dict[str, Sink] = {}
        for step in self._steps:
            if step.kind == "sink":
                if step.name in sinks and sinks[step.name] is not step.fn:
                    raise ConfigError(f"two sinks are named '{step.name}'; pass name= to one")
                sinks[step.name] = step.fn
        return sinks

    def build(self) -> None:
        """Check the dataflow without running it; `run()` calls this first."""
        if not self._sources:
            raise ConfigError(f"app '{self.name}' has no source; call app.source('topic')")
        validate(self._sources)
        if self.guarantee == "exactly-once":
            for sink in self._sinks().values():
                if sink.guarantee == "at-least-once":
                    raise SinkGuaranteeError(
                        f"sink '{sink.name}' ({type(sink).__name__}) is at-least-once, and app "
                        f"'{self.name}' promises exactly-once. Operator action: use a "
                        "transactional or idempotent sink (to(topic), SQLiteTableSink, FileSink)"
                        ", or build the App with guarantee='at-least-once'"
                    )
        backend = open_backend(self.store)
        on_store = [name for name, s in self._sinks().items() if s.needs_store]
        if not backend.has_sql_store and on_store:
            names = ", ".join(on_store)
            raise ConfigError(
                f"sinks {names} write into the embedded store's own tables and cannot run on "
                f"the {backend.name} backend; operator action: write to a topic with to(), use "
                "PostgresSink for a table or EffectSink for a side effect, or run on a "
                "SQLite store"
            )
        if backend.several_workers:
            self._check_effect_sources()

    def _check_effect_sources(self) -> None:
        """With several workers an effect sink's journal lives in the state of one input
        topic's partitions; a sink fed by two sources would journal half its intents
        nowhere."""
        # Only a sink object used twice can be reached from two sources: no operator
        # merges streams, so a stateful step always has one.
        for name, topics in self._partitioned_steps().items():
            if len(topics) > 1:
                raise ConfigError(
                    f"effect sink '{name}' is fed by sources {sorted(topics)}; on Kafka its "
                    "journal is partitioned like one input topic. Operator action: give each "
                    "source its own effect sink (name=...)"
                )

    def stop(self) -> None:
        """Ask `run()` to commit what it has and return. Safe from any thread."""
        self._stop.set()

    # -- running --------------------------------------------------------------------

    def run(self, *, until_idle: bool = False, timeout: float | None = None) -> RunStats:
        """Process until `stop()`, SIGTERM/SIGINT, or (with `until_idle`) until every source
        is drained and committed. Returns what the committed epochs did."""
        self.build()
        t_start = time.monotonic()
        deadline = None if timeout is None else t_start + timeout
        hooks = _Fanout(self.hooks)
        crash = self._crash or from_env()
        self.stats = RunStats()
        restore = self._install_signals()
        gc_restore = self._tune_gc()
        outage = _Outage(self.name, self._stop)
        restarting = False
        try:
            while True:
                try:
                    self._run_session(hooks, crash, until_idle, deadline, outage, t_start)
                    break
                except Exception as exc:
                    # At start (a broker, a database not reachable yet), or after a commit
                    # whose follow-up failed: start over as a restart would, which also
                    # recovers what the follow-up left (outbox, prepared transactions,
                    # local state stores). Until a session ran, only an UnavailableError
                    # is waited for: another failure to start is a configuration's.
                    if isinstance(exc, AfterCommitError):
                        if not exc.outage:
                            raise
                        restarting = True
                    elif not (isinstance(exc, UnavailableError) or (restarting and is_outage(exc))):
                        raise
                    if self._stop.is_set():
                        break
                    outage.wait(exc)
                    if self._stop.is_set() or (
                        deadline is not None and time.monotonic() > deadline
                    ):
                        break
        finally:
            gc_restore()
            restore()
            # Cleared at the end, not the start: a stop() that came before run() counts.
            self._stop.clear()
        self.stats.seconds = time.monotonic() - t_start
        return self.stats

    def _run_session(
        self,
        hooks: _Fanout,
        crash: Callable[[str], None],
        until_idle: bool,
        deadline: float | None,
        outage: _Outage,
        t_start: float,
    ) -> None:
        """One session on the store: start (acquire, recover), the epoch loop, stop."""
        session: Session | None = None
        sinks: dict[str, Sink] = {}
        done = False
        try:
            backend = open_backend(self.store)
            session = self._open_session()
            session.ensure_topics(self._topics())
            session.check_topology(
                signature(self._sources),
                f"onceflow reset {self.name} --store {self.store}",
                self._config(),
            )
            states = {
                s.name: StepState(s.name, session.load_state, self.state_cache_keys)
                for s in self._steps
                if s.kind in ("reduce", "process")
            }
            dedups = {
                s.name: DedupStep(
                    s.name,
                    s.options["ttl"],
                    s.options["max_keys"],
                    s.options["replay_to"],
                    self.state_cache_keys,
                )
                for s in self._steps
                if s.kind == "dedupe"
            }
            sinks = self._sinks()
            context = SinkContext(
                app=self.name,
                backend=backend.name,
                session=session,
                crash=crash,
                stopping=self._stop.is_set,
                dead_letter_topic=self.dead_letter_topic,
            )
            for sink in sinks.values():
                sink.open(context)
            executor = Executor(
                app_name=self.name,
                dead_letter_topic=self.dead_letter_topic,
                on_error=self.on_error,
                states=states,
                dedups=dedups,
                load_dedup=session.load_dedup,
                partitions_of=session.partitions_of,
                partition_for=session.partition_for,
                hooks=hooks,
            )
            cp = Checkpoint(
                session=session,
                executor=executor,
                states=states,
                dedups=dedups,
                sinks=sinks,
                crash=crash,
                hooks=hooks,
                exactly_once=self.guarantee == "exactly-once",
            )
            session.acquire(
                [s.options["topic"] for s in self._sources],
                _Rebalance(self, session, sinks, cp, executor),
            )
            positions = session.committed_positions()
            cp.committed_positions = dict(positions)
            outage.over()
            hooks.recovered(time.monotonic() - t_start, dict(positions))
            roots = {s.options["topic"]: s for s in self._sources}
            self._loop(session, executor, cp, roots, positions, crash, until_idle, deadline, outage)
            done = True
            for sink in sinks.values():
                sink.close()
        finally:
            if not done and sinks and not self._stop.is_set():
                # Opened again by the next session of this run.
                for sink in sinks.values():
                    with contextlib.suppress(Exception):
                        sink.close()
            if session is not None:
                session.close()

    def _open_session(self) -> Session:
        """A session on the backend the store names."""
        settings = Settings.from_env()
        return open_backend(self.store).session(
            SessionOptions(
                app=self.name,
                owner=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
                worker=self.worker if self.worker is not None else settings.worker,
                state_dir=self.state_dir or settings.state_dir,
                commit_interval=self.commit_interval,
                step_topics=self._step_topics(),
                topic_partitions=self.partitions,
            )
        )

    def _partitioned_steps(self) -> dict[str, set[str]]:
        """Each step partitioned like its input (stateful steps and effect sinks) and
        the source topics that reach it."""
        out: dict[str, set[str]] = {}
        for src in self._sources:
            stack = list(src.children)
            while stack:
                step = stack.pop()
                if step.kind in STATEFUL or (
                    step.kind == "sink" and isinstance(step.fn, EffectSink)
                ):
                    out.setdefault(step.name, set()).add(src.options["topic"])
                stack.extend(step.children)
        return out

    def _step_topics(self) -> dict[str, str]:
        """The input topic of each stateful step: its state is partitioned like it. An
        effect sink's journal is partitioned the same way (one source each on Kafka,
        checked by `build`)."""
        return {name: min(topics) for name, topics in self._partitioned_steps().items()}

    def _config(self) -> dict[str, Any]:
        """What `onceflow status` shows of this App beside its steps."""
        return {
            "guarantee": self.guarantee,
            "commit_interval": self.commit_interval,
            "sources": [s.options["topic"] for s in self._sources],
            "outputs": sorted({s.options["topic"] for s in self._steps if s.kind == "to"}),
            "dead_letter_topic": self.dead_letter_topic,
            "retention": {
                s.name: {"ttl": s.options["ttl"], "max_keys": s.options["max_keys"]}
                for s in self._steps
                if s.kind == "dedupe"
            },
            # Where `onceflow status` finds each effect sink's journal on Kafka.
            "effect_sinks": {
                name: min(topics)
                for name, topics in self._partitioned_steps().items()
                if isinstance(self._sinks().get(name), EffectSink)
            },
        }

    def _topics(self) -> dict[str, int]:
        topics = {self.dead_letter_topic: self.partitions}
        for s in self._sources:
            topics[s.options["topic"]] = s.options["partitions"] or self.partitions
        for s in self._steps:
            if s.kind == "to":
                topics.setdefault(s.options["topic"], self.partitions)
            if s.kind == "dedupe" and s.options["replay_to"]:
                topics.setdefault(s.options["replay_to"], self.partitions)
        return topics

    def _loop(
        self,
        session: Session,
        executor: Executor,
        cp: Checkpoint,
        roots: dict[str, Step],
        positions: dict[tuple[str, int], int],
        crash: Callable[[str], None],
        until_idle: bool,
        deadline: float | None,
        outage: _Outage,
    ) -> None:
        """Steps 1-3 of the protocol, and step 5 after a failure (`_checkpoint.py`)."""
        last_commit = time.monotonic()
        narrowing: _Narrowing | None = None
        rewind = False
        ep = executor.epoch
        while not self._stop.is_set():
            if deadline is not None and time.monotonic() > deadline:
                break
            try:
                if rewind:
                    positions.clear()
                    positions.update(session.rewind())
                    rewind = False
                limit = self.max_batch
                if narrowing is not None:
                    limit = max(1, min(limit, narrowing.size - executor.epoch.records_in))
                batches = session.poll(positions, limit)
                if batches:
                    crash("after_poll")
                    for i, b in enumerate(batches):
                        root = roots[b.topic]
                        executor.run(root, b, root.fn)
                        if i == 0:
                            crash("mid_batch")
                    if narrowing is not None:
                        narrowing.batches.extend(batches)
                    positions.update(executor.epoch.positions)
                ep = executor.epoch
                every = self.commit_every if narrowing is None else narrowing.size
                due = (
                    ep.records_in >= every or time.monotonic() - last_commit >= self.commit_interval
                )
                if ep.records_in and (due or not batches):
                    self._commit(cp, ep)
                    outage.over()
                    last_commit = time.monotonic()
                    if narrowing is not None:
                        narrowing.batches = []
                        narrowing.left -= ep.records_in
                        if narrowing.left <= 0:
                            log.info("app '%s': the failure did not come back", self.name)
                            narrowing = None
                elif not batches:
                    if until_idle and session.idle():
                        break
                    for sink in cp.sinks.values():
                        sink.retry_pending()
                    session.wait_for_data(min(0.05, self.commit_interval), self._stop)
            except EpochFailed as exc:
                # Step 4 is done: the epoch was rewound in memory; the positions follow.
                rewind = True
                last_commit = time.monotonic()
                if exc.outage or exc.step in _NOT_A_RECORD:
                    if narrowing is not None:
                        narrowing.batches = []
                    outage.wait(exc)
                else:
                    narrowing = self._narrow(narrowing, exc, ep, executor, cp, outage)
            except (FencedError, UserFunctionError, AfterCommitError):
                raise
            except Exception as exc:
                # Polling or running failed (a store read, a broker), not a commit.
                if not cp.is_outage(exc):
                    raise
                cp.abort()
                rewind = True
                if narrowing is not None:
                    narrowing.batches = []
                outage.wait(exc)
        if rewind:
            return  # stopped while waiting: nothing in memory to commit
        try:
            self._commit(cp, executor.epoch)
        except EpochFailed as exc:
            # Stopping: no waiting. Its records are read again by the next run.
            log.warning("app '%s' stops with its last epoch uncommitted: %s", self.name, exc)

    def _narrow(
        self,
        narrowing: _Narrowing | None,
        exc: EpochFailed,
        failed: Epoch,
        executor: Executor,
        cp: Checkpoint,
        outage: _Outage,
    ) -> _Narrowing | None:
        """Step 5c after an epoch failed for what may be a record: halve the epochs, and
        once an epoch of one record failed, commit that record as a dead letter."""
        n = failed.records_in
        if (
            narrowing is not None
            and n == 1
            and len(narrowing.batches) == 1
            and len(narrowing.batches[0].offs) == 1
        ):
            batch = narrowing.batches[0]
            narrowing.batches = []
            if self._dead_letter_epoch(batch, exc, executor, cp, outage):
                return None
            return narrowing
        if narrowing is None:
            log.warning(
                "app '%s': an epoch of %d records fails to commit at %s (%s); committing its "
                "records in smaller epochs to find the one that causes it",
                self.name,
                n,
                exc.step,
                exc.__cause__ or exc,
            )
        # One record alone (not seen alone yet) runs once more on its own: a record
        # becomes a dead letter only after it failed an epoch by itself.
        return _Narrowing(size=max(1, n // 2), left=max(n, 1))

    def _dead_letter_epoch(
        self, batch: Batch, exc: EpochFailed, executor: Executor, cp: Checkpoint, outage: _Outage
    ) -> bool:
        """The record of `batch` failed an epoch alone: commit it as a dead letter with
        its offset, and nothing else of it. Whether that committed."""
        cause = exc.__cause__ or exc
        error = f"{type(cause).__name__}: {cause}"
        step, _, what = exc.step.rpartition(":")
        where = f"{batch.topic}[{batch.parts[0]}]@{batch.offs[0]}"
        if self.on_error == "stop":
            raise UserFunctionError(
                exc.step, batch.topic, batch.parts[0], batch.offs[0], cause
            ) from exc
        log.error(
            "app '%s': record %s fails every commit at %s (%s); it goes to '%s' and the "
            "pipeline goes on. Operator action: fix the record or the pipeline, then "
            "re-send it from the dead letters",
            self.name,
            where,
            exc.step,
            error,
            self.dead_letter_topic,
        )
        executor.epoch = Epoch()
        executor.dead_letter(batch, 0, step, what, error)
        try:
            self._commit(cp, executor.epoch)
        except EpochFailed as again:
            # Not the record then: the store or a service is failing (step 5b).
            outage.wait(again)
            return False
        return True

    def _commit(self, cp: Checkpoint, ep: Epoch) -> None:
        n_in, dups, dead = ep.records_in, ep.duplicates, ep.dead_letters
        n_out = ep.records_out - dead
        if cp.commit():
            self.stats.records_in += n_in
            self.stats.records_out += n_out
            self.stats.duplicates += dups
            self.stats.dead_letters += dead
            self.stats.commits += 1

    def _tune_gc(self) -> Callable[[], None]:
        """Raise the young-generation threshold while the App runs.

        An epoch holds up to a second of outputs in memory, and with the default
        threshold (700) full collections keep walking them: measured, 21-37% of the time
        of a keyed pipeline. Objects loaded before `run()` are frozen out of collection.
        The previous settings come back when `run()` returns.
        """
        if not self.gc_tuning:
            return lambda: None
        before = gc.get_threshold()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)

        def restore() -> None:
            gc.set_threshold(*before)
            gc.unfreeze()

        return restore

    def _install_signals(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {}

        def handler(signum: int, frame: Any) -> None:
            self.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)

        def restore() -> None:
            for sig, h in previous.items():
                signal.signal(sig, h)

        return restore

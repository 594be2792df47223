"""`onceflow demo --store kafka://...`: the payments demo on a Kafka cluster.

The pipeline, the producer process and the audit are those of the embedded demo
(`_demo`). Kafka adds to the fault model:

* the pipeline runs as several worker processes sharing the partitions, each with its
  worker slot's transactional id; a random SIGKILL hits one worker, a crash point kills
  one inside the commit protocol, and the killed worker is restarted at once;
* the broker itself is SIGKILLed and restarted while payments flow (a `BrokerControl`,
  from `--broker-kill`/`--broker-start` on the command line);
* a read_committed consumer reads outcomes and ledger during the run: it must never see
  a payment twice, and everything it saw must be in the final topics at the same offsets
  (a reader may not see what is later aborted);
* at the end no transaction may be left open on any of the run's topics.

Each run gets a namespace of its own on the cluster (`<namespace>.demo-<tag>`): nothing
is wiped, and runs never see each other's topics, groups or transactional ids.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import time
import uuid
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._chaos import _Monitor
from ._chaos_faults import BrokerControl
from ._chaos_faults import Workers as _Workers
from ._demo import (
    APP_NAME,
    CHILD_TARGET,
    CREDITS,
    LEDGER,
    OUTCOMES,
    TRANSFERS,
    Audit,
    Check,
    DemoResult,
    Kill,
    StepValues,
    _entry,
    _outcome,
    _ProducerProcess,
    _Progress,
    held_back,
    make_app,
    plan_kills,
    prepare_dir,
    read_topic,
    run_audit,
)
from ._demo_postgres import DEMO_SINK_ENV, settled
from ._errors import StoreError
from ._kafka_common import KafkaURL
from ._records import Record
from ._serde import load_state

if TYPE_CHECKING:
    from rich.console import Console

# A worker armed with a crash point that has not reached it by then is SIGKILLed
# instead, so that an armed worker never stalls the run. The producer holds input back
# until the kills are done, so an armed worker has work; this only bounds a worker that
# gets no partition at all, and is generous because a loaded machine restores slowly.
ARMED_WAIT_S = 120.0
# Workers that die on their own (a broker outage can outlast a transaction) are
# restarted; this many such deaths means something is wrong beyond the planned faults.
MAX_UNPLANNED_DEATHS = 40
# How often the supervisor asks the cluster for progress: each look costs round trips.
LOOK_EVERY_S = 0.25
# A worker stopped sooner than this after its start may not have installed its SIGTERM
# handler yet (Python is still importing) and would die of the signal instead of
# stopping cleanly; the final stop waits for every worker to be this old.
SETTLE_S = 5.0


def scratch_store(store: str) -> str:
    """A fresh namespace for one run, under the store's own namespace if it has one."""
    url = KafkaURL.parse(store)
    ns = f"{url.namespace}." if url.namespace else ""
    return f"kafka://{url.bootstrap}/{ns}demo-{uuid.uuid4().hex[:8]}"


def committed_state(store: str) -> tuple[int, StepValues, StepValues]:
    """Dedup ids and the `debits` and `credits` state, folded from the changelogs: on
    Kafka the changelog, not any worker's local store, is the committed state."""
    latest: dict[tuple[str, int, bytes], bytes] = {}
    for source in (TRANSFERS, CREDITS):
        for rec in read_topic(store, f"{APP_NAME}.{source}.changelog"):
            latest[(source, rec.partition, (rec.key or "").encode())] = rec.value
    dedup_ids = 0
    steps: dict[str, StepValues] = {
        "debits": collections.defaultdict(list),
        "credits": collections.defaultdict(list),
    }
    for (_, _, raw), value in latest.items():
        if not value:
            continue  # a tombstone
        kind, _, rest = raw.partition(b"\x00")
        step, _, key = rest.partition(b"\x00")
        if kind == b"d" and step == b"payment-ids":
            dedup_ids += 1
        elif kind == b"s" and step.decode() in steps:
            steps[step.decode()][key.decode()].append(load_state(value))
    return dedup_ids, steps["debits"], steps["credits"]


def _identify(rec: Record) -> Hashable:
    """What must appear once: an outcome per payment, a ledger entry per payment side."""
    if rec.topic == OUTCOMES:
        return _outcome.decode(rec.value).id
    e = _entry.decode(rec.value)
    return (e.payment, e.side)


@dataclass
class BrokerKill:
    at: float
    done: bool = False


def plan_broker_kills(n: int, rng: random.Random) -> list[BrokerKill]:
    """Broker kills spread over the middle of the run, while payments flow."""
    return [BrokerKill(at) for at in sorted(rng.uniform(0.15, 0.8) for _ in range(n))]


def run_kafka_demo(
    *,
    store: str,
    payments: int,
    accounts: int,
    kills: int,
    seed: int,
    directory: str | os.PathLike[str],
    rate: float,
    workers: int,
    broker: BrokerControl | None,
    broker_kills: int,
    console: Console | None,
    timeout: float,
    sink: str | None = None,
) -> DemoResult:
    t0 = time.monotonic()
    workdir = Path(prepare_dir(Path(directory))).parent
    run_store = scratch_store(store)
    _create_topics(run_store)
    plan = plan_kills(kills, random.Random(seed ^ 0x5EED), sink=sink is not None)
    bplan = plan_broker_kills(broker_kills if broker is not None else 0, random.Random(seed))
    pool = _Workers(CHILD_TARGET, run_store, workers, str(workdir))
    # Always set, empty without a sink: one left in the shell must not add a sink.
    pool.env[DEMO_SINK_ENV] = sink or ""
    run = _KafkaRun(
        run_store,
        plan,
        bplan,
        payments=payments,
        pool=pool,
        broker=broker,
        rng=random.Random(seed ^ 0xC0FFEE),
        console=console,
    )
    run.sink = sink
    run.say(f"store {run_store} ({workers} workers)")
    args = {
        "store": run_store,
        "payments": payments,
        "accounts": accounts,
        "seed": seed,
        "rate": rate,
        "allowed": held_back(payments, [*plan, *bplan]),
    }
    try:
        run.start(args)
        with run.progress:
            while run.step():
                if time.monotonic() - t0 > timeout:
                    run.error = f"the demo did not finish within {timeout:.0f}s"
                    break
                time.sleep(0.05)
    finally:
        run.close()
    sent = run.producer.sent_counts() if run.producer is not None else {}
    if run.error:
        return DemoResult(Audit([], {}), plan, time.monotonic() - t0, run_store, sent, run.error)
    run.say("auditing the committed data (read_committed) ...")
    audit = run_audit(run_store, sink)
    audit.checks.extend(run.kafka_checks())
    audit.figures.update(
        broker_kills=sum(1 for b in bplan if b.done),
        workers=workers,
        worker_restarts=run.unplanned,
        live_records=len(run.monitor.records),
    )
    return DemoResult(audit, plan, time.monotonic() - t0, run_store, sent)


def _create_topics(store: str) -> None:
    """Every topic of the App with its partition count, before anyone sends: a topic
    created by the producer's first send would get the broker's default count."""
    app = make_app(store)
    session = app._open_session()
    try:
        session.ensure_topics(app._topics())
    finally:
        session.close()


class _KafkaRun:
    """Runs the producer and the workers, and carries out the worker and broker kills.

    `step()` is called every 50 ms and takes at most one action."""

    def __init__(
        self,
        store: str,
        plan: list[Kill],
        bplan: list[BrokerKill],
        *,
        payments: int,
        pool: _Workers,
        broker: BrokerControl | None,
        rng: random.Random,
        console: Console | None,
    ) -> None:
        self.store, self.plan, self.bplan = store, plan, bplan
        self.payments, self.pool, self.broker = payments, pool, broker
        self.rng, self.console = rng, console
        self.progress = _Progress(console, payments, len(plan) + len(bplan))
        self.monitor = _Monitor(store, [OUTCOMES, LEDGER], identify=_identify)
        self.producer: _ProducerProcess | None = None
        self.error = ""
        # The slot running with a crash point, and since when.
        self.armed: tuple[Kill, int, float] | None = None
        self.unplanned = 0
        self.processed = 0
        self.drained = False
        self._last_look = 0.0
        self._at_last_kill = -1
        self._kill_due: float | None = None
        self._born: dict[int, float] = {}
        self.sink: str | None = None

    def say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text)

    def start(self, args: dict[str, Any]) -> None:
        self.producer = _ProducerProcess(args)
        for slot in range(self.pool.count):
            self._start(slot)
        self.monitor.start()

    def _start(self, slot: int) -> None:
        """A new incarnation of `slot`, armed with the next crash point if that is the
        next kill and no other worker carries it. Not before the run moves: a worker
        armed at the very start may get no partition in the first assignment, and
        then never reach its point."""
        self._born[slot] = time.monotonic()
        pending = self._pending()
        moving = self.processed > 0
        if moving and self.armed is None and pending is not None and pending.how == "crash_at":
            self.armed = (pending, slot, time.monotonic())
            self.pool.start(slot, crash_at=f"{pending.point}:{pending.nth}")
        else:
            self.pool.start(slot)

    def close(self) -> None:
        self.pool.kill_all()
        if self.producer is not None:
            self.producer.close()
        self.monitor.stop_at = time.monotonic() + 3.0
        self.monitor.join(60)

    # -- the loop -------------------------------------------------------------------

    def _pending(self) -> Kill | None:
        return next((k for k in self.plan if not k.done), None)

    def _kills_done(self) -> int:
        return sum(1 for k in self.plan if k.done) + sum(1 for b in self.bplan if b.done)

    def _look(self) -> None:
        """Progress from the cluster: transfers committed, and whether both sources are
        fully committed. During a broker outage the last look stands."""
        from ._kafka_status import app_lag

        now = time.monotonic()
        if now - self._last_look < LOOK_EVERY_S:
            return
        self._last_look = now
        try:
            lags = app_lag(self.store, APP_NAME, [TRANSFERS, CREDITS])
        except StoreError:
            return
        self.processed = sum(p.committed_offset or 0 for p in lags if p.topic == TRANSFERS)
        self.drained = any(p.topic == TRANSFERS and p.end_offset > 0 for p in lags) and all(
            p.lag == 0 for p in lags
        )
        if self.drained and self.sink:
            self.drained = settled(self.sink, APP_NAME)
        if self.producer is not None:
            sent = self.producer.sent_counts().get("sent", 0)
            self.progress.update(sent, self.processed, self.producer.planned())
        self.progress.kills(self._kills_done())

    def step(self) -> bool:
        """One look at the world and at most one action. False once finished or failed."""
        assert self.producer is not None
        rc = self.producer.poll()
        if rc not in (None, 0):
            self.error = self.producer.failure()
            return False
        self._look()
        finished = rc == 0 and self.drained
        if not self._reap():
            return False
        broker_due = next((b for b in self.bplan if not b.done), None)
        self.producer.feed(self.drained, broker_due is not None or self._pending() is not None)
        if broker_due is not None and (self.processed >= broker_due.at * self.payments or finished):
            self._bounce_broker(broker_due)
            return True
        pending = self._pending()
        if pending is not None and pending.how == "crash_at":
            return self._armed_step(pending, finished)
        if pending is not None:
            return self._signal_step(pending, finished)
        if broker_due is None and finished:
            return self._finish()
        return True

    def _reap(self) -> bool:
        """Restart workers that died. A worker carrying a crash point that died of it is
        a planned kill; any other death is counted, and too many fail the run."""
        for slot, child in list(self.pool.children.items()):
            if child.alive():
                continue
            rc = child.wait()
            if self.armed is not None and self.armed[1] == slot and rc == -signal.SIGKILL:
                kill = self.armed[0]
                self.armed = None
                kill.done = "crash_at"
                self._announce(f"worker {slot} died at crash point [bold]{kill.point}[/]")
            else:
                self.unplanned += 1
                if self.unplanned > MAX_UNPLANNED_DEATHS:
                    self.error = (
                        f"workers died {self.unplanned} times on their own; the last "
                        f"(worker {slot}, exit {rc}):\n{child.stderr()[-2000:]}"
                    )
                    return False
                if self.armed is not None and self.armed[1] == slot:
                    self.armed = None
            self._start(slot)
        return True

    def _armed_step(self, pending: Kill, finished: bool) -> bool:
        if self.armed is None:
            if self.processed == 0:
                return True
            # Arm the next restart: kill a random worker now, as a random kill would.
            # With static membership its partitions wait for it, backlog included, so
            # the armed incarnation has work to die in.
            slot = self.rng.randrange(self.pool.count)
            self.pool.children[slot].kill()
            self._start(slot)
            return True
        _, slot, since = self.armed
        # The producer holds work back until the kills are done, so an armed worker runs
        # out of work only when the held-back share is out too (`finished`).
        if finished or time.monotonic() - since > ARMED_WAIT_S:
            # Idle, so it would never reach the point: a SIGKILL stands in.
            self.pool.children[slot].kill()
            self.armed = None
            pending.done = "signal"
            self._announce(f"SIGKILL of worker {slot}, idle before {pending.point}")
            self._start(slot)
        return True

    def _signal_step(self, pending: Kill, finished: bool) -> bool:
        # A kill waits until the run committed something since the last one, so that
        # the run moves forward however the kills fall.
        moved = self.processed > self._at_last_kill or finished
        now = time.monotonic()
        if self._kill_due is None and moved and self.processed >= pending.at * self.payments:
            self._kill_due = now + self.rng.uniform(0.0, 0.3)
        if self._kill_due is not None and now >= self._kill_due:
            self._kill_due = None
            slot = self.rng.randrange(self.pool.count)
            self.pool.children[slot].kill()
            pending.done = "signal"
            self._at_last_kill = self.processed
            self._announce(f"SIGKILL of worker {slot} with {self.processed:,} transfers committed")
            self._start(slot)
        return True

    def _bounce_broker(self, due: BrokerKill) -> None:
        assert self.broker is not None
        self.broker.kill()
        self.say(f"[yellow]broker SIGKILLed[/] with {self.processed:,} transfers committed")
        time.sleep(1.0)
        self.broker.restart()
        due.done = True
        self._announce("broker restarted")

    def _announce(self, note: str) -> None:
        self.say(f"[yellow]kill {self._kills_done()}/{len(self.plan) + len(self.bplan)}[/]: {note}")

    def _finish(self) -> bool:
        """Everything sent is committed: stop every worker with SIGTERM, once settled."""
        if any(time.monotonic() - born < SETTLE_S for born in self._born.values()):
            return True
        for slot, child in self.pool.children.items():
            rc = child.stop()
            if rc != 0:
                self.error = f"worker {slot} did not stop cleanly (exit {rc}):\n"
                self.error += child.stderr()[-2000:]
        return False

    # -- what only Kafka can be asked -------------------------------------------------

    def kafka_checks(self) -> list[Check]:
        from ._kafka_status import open_transactions

        checks = [self._live_check()]
        hanging = open_transactions(self.store)
        checks.append(
            Check(
                "no transaction left open",
                not hanging,
                ", ".join(f"{t.topic}[{t.partition}]" for t in hanging)
                or f"none on the run's topics ({self.pool.count} transactional ids)",
            )
        )
        return checks

    def _live_check(self) -> Check:
        name = "a read_committed reader during the run saw each payment once, all kept"
        if self.monitor.error is not None:
            return Check(name, False, f"the reader failed: {self.monitor.error!r}")
        live = self.monitor.records
        final: dict[tuple[str, int, int], Hashable] = {}
        for topic in (OUTCOMES, LEDGER):
            for rec in read_topic(self.store, topic):
                final[(rec.topic, rec.partition, rec.offset)] = _identify(rec)
        per_topic: dict[str, collections.Counter[Hashable]] = {
            OUTCOMES: collections.Counter(),
            LEDGER: collections.Counter(),
        }
        for (topic, _, _), ident in live.items():
            per_topic[topic][ident] += 1
        twice = [i for c in per_topic.values() for i, n in c.items() if n > 1]
        gone = [pos for pos, ident in live.items() if final.get(pos) != ident]
        detail = f"{len(live):,} records seen live of {len(final):,} committed"
        if twice:
            detail += f"; seen twice: {len(twice):,} ({', '.join(map(str, twice[:3]))})"
        if gone:
            detail += f"; seen live but not in the final topics: {len(gone):,}"
        return Check(name, not twice and not gone and bool(live), detail)

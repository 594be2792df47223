"""The commit protocol. Its steps are numbered here and nowhere else.

One epoch:

1. Poll a batch from the assigned partitions, from the in-memory positions.
2. Run the operators in memory. State writes, dedup keys, outputs, sink rows and dead
   letters go to the epoch buffer (`Epoch`, the `StepState` dirty sets, the `DedupStep`
   new ids); nothing durable changes.
3. Checkpoint, when the commit interval or the record count is reached, or on shutdown
   (sinks of other systems first write and prepare their part: two-phase commit):
   3a. open the backend transaction;
   3b. check the fencing epoch of every held partition (a zombie stops here);
   3c. write outputs and dead letters;
   3d. write state changes; apply dedup retention (on Kafka as changelog tombstones in
       this transaction, so that a restored partition forgets the same ids), then write
       the epoch's dedup keys;
   3e. let transactional and idempotent sinks write their rows (idempotent ones into
       the outbox);
   3f. write the input offsets, which only ever move forward;
   3g. commit.
   Then, once durable: idempotent sinks deliver from the outbox, caches are marked clean.
   A failure there does not undo the commit: the App reopens its session, as a restart
   would, and that recovers what was left (outbox, prepared transactions, local stores).
4. On any failure before 3g returns: abort, drop the epoch buffer, reload state and
   rewind positions to the last commit. If 3g itself raised, the outcome is unknown:
   re-read the committed offsets to find out what happened, never retry blindly.
5. Then, by the failure's cause (`is_outage`):
   5a. fenced (`FencedError`): stop, commit nothing more;
   5b. an outage (`UnavailableError`, a store or broker error, an OS error, a database's
       OperationalError): wait with backoff and run the epoch again, as long as it
       takes; the App says so once when it starts and once when it is over;
   5c. anything else may be a record's doing (state that cannot be encoded, a row a
       sink refuses): run the same inputs again in epochs of half the size, until an
       epoch of one record fails; commit that record alone as a dead letter, with the
       error, the step of the commit that failed and the source offset, and its offset;
       go on with full epochs. If that dead-letter epoch fails too, it was not the
       record: 5b.

The fenced-write rule. Every durable write a processor makes (outputs, state, dedup
ids, dead letters, input offsets, sink rows and their bookkeeping, file positions,
effect outcomes) takes effect only if the writer still owns the partition, and that is
checked inside the same transaction as the write, never before it: a process can be
paused between any two instructions and resume after a successor took over (a zombie).
- Inside an epoch (3a-3g) the check is the transaction itself: 3b on the embedded store
  (the lease epoch, read and compared in the write transaction), the producer epoch and
  the group generation on Kafka (the broker refuses a fenced producer's commit and a
  stale member's offsets), the prepared transaction's id (app, sink, partition, fence)
  in PostgreSQL.
- After the commit (deliveries from an outbox, a file sink's position, an effect's
  outcome) every update that settles something is a compare-and-set of what it settles
  (`Sink.fenced()`, `_effect_journal.py`): a settled row is never settled again, and a
  writer that finds its row settled or its fence moved stops as fenced.
- A sink or step never opens a transaction of its own on the store: it writes through
  the transaction the backend hands it (`Sink.write(txn, rows)`), so it cannot bypass
  the check. A new kind of write goes there, or is a compare-and-set.
Tests pause a process at each step (`ONCEFLOW_PAUSE_AT`, `_crash.py`), let a successor
take over, resume the zombie and audit the committed effects.

Paranoid checks: an epoch number commits at most once, and offsets never move back
(checked again inside the transaction by the store).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import NoReturn

from ._backend import Session
from ._crash import SimulatedCrash
from ._errors import CommitError, FencedError, OnceflowError, StoreError, UnavailableError
from ._hooks import _Fanout
from ._runtime import DedupStep, Epoch, Executor
from ._sinks import Sink
from ._state import StepState

log = logging.getLogger("onceflow")

# Causes that are the state of a system, not of a record (step 5b). A DB-API 2.0
# OperationalError (PEP 249: "not necessarily under the control of the programmer": a
# lost connection, a lock timeout, a full disk) counts too, from whichever driver.
_OUTAGES = (UnavailableError, StoreError, OSError)


def is_outage(exc: BaseException, extra: Callable[[BaseException], bool] | None = None) -> bool:
    """Whether a failure is an outage to wait out (5b) rather than possibly caused by a
    record (5c). The whole chain of causes counts: a clear error raised from a broker
    timeout is still the timeout. `extra` is a backend's own judgement of its errors."""
    e: BaseException | None = exc
    for _ in range(16):
        if e is None or isinstance(e, FencedError):
            return False
        if isinstance(e, _OUTAGES) or (extra is not None and extra(e)):
            return True
        if any(c.__name__ == "OperationalError" for c in type(e).__mro__):
            return True
        e = e.__cause__
    return False


class EpochFailed(CommitError):
    """An epoch did not commit and was rewound (step 4). `step` is where it failed
    (`<stateful step>:state`, `<sink>:write`, `commit:outputs`, ...), `outage` whether
    the cause is an outage (5b) rather than possibly a record (5c)."""

    def __init__(self, message: str, *, step: str, outage: bool) -> None:
        super().__init__(message)
        self.step = step
        self.outage = outage


class AfterCommitError(OnceflowError):
    """The epoch committed, but the work after the commit (a sink's delivery, the local
    state stores) failed. `outage` as in `EpochFailed`."""

    def __init__(self, message: str, *, outage: bool) -> None:
        super().__init__(message)
        self.outage = outage


class Checkpoint:
    """Commits the executor's epoch buffer through a backend session, atomically."""

    def __init__(
        self,
        *,
        session: Session,
        executor: Executor,
        states: dict[str, StepState],
        dedups: dict[str, DedupStep],
        sinks: dict[str, Sink],
        crash: Callable[[str], None],
        hooks: _Fanout,
        exactly_once: bool = True,
    ) -> None:
        self.exactly_once = exactly_once
        self.session = session
        self.executor = executor
        self.states = states
        self.dedups = dedups
        self.sinks = sinks
        self.crash = crash
        self.hooks = hooks
        self.epoch_no = 0
        self._last_committed_epoch = -1
        self.committed_positions: dict[tuple[str, int], int] = {}
        self.commits = 0
        self._purge_every = 50

    def is_outage(self, exc: BaseException) -> bool:
        return is_outage(exc, self.session.is_transient)

    def commit(self) -> bool:
        """Steps 3a-3g and the after-commit work. True when something was committed."""
        ep = self.executor.epoch
        if not ep.positions and not ep.records_out:
            return False
        epoch_no = self.epoch_no
        if epoch_no <= self._last_committed_epoch:
            raise AssertionError(f"epoch {epoch_no} would commit twice")
        for tp, off in ep.positions.items():
            if off < self.committed_positions.get(tp, 0):
                raise AssertionError(f"offset of {tp} would move back to {off}")
        self.hooks.commit_started(epoch_no, ep.records_in)
        t0 = time.monotonic()
        self.crash("before_commit")
        s = self.session
        if ep.sink_rows:
            self._prepare_sinks(ep, s, epoch_no)
        try:
            txn = s.transaction()  # 3a
        except BaseException as exc:
            self._raise_failed(epoch_no, exc, "commit:begin")
        committed = False
        step = "commit"
        outcomes: dict[str, dict[tuple[int, str], bytes | None]] = {}
        purged: dict[str, int] = {}
        try:
            if self.exactly_once:
                step = "commit:fence"
                txn.check_fence()  # 3b
            step = "commit:outputs"
            txn.write_outputs(ep.outputs)  # 3c, dead letters included
            for name, st in self.states.items():  # 3d
                if st.dirty:
                    step = f"{name}:state"
                    txn.write_state(name, st.drain())
            purge = self.commits % self._purge_every == 0
            for name, d in self.dedups.items():
                step = f"{name}:dedup"
                if purge:
                    # Before the epoch's ids: one seen again now has a new time, and its
                    # new record must outlive the purge of its old one.
                    purged[name] = txn.purge_dedup(name, d.ttl, d.max_keys)
                if d.new:
                    outcomes[name] = self.executor.outcomes(d)
                    txn.write_dedup(
                        name,
                        [
                            (p, i, seen, outcomes[name][(p, i)])
                            for (p, i), (seen, _) in d.new.items()
                        ],
                    )
            for name, rows in ep.sink_rows.items():  # 3e
                step = f"{name}:write"
                self.sinks[name].write(txn, rows)
            if self.exactly_once:
                step = "commit:offsets"
                txn.write_positions(ep.positions)  # 3f
            self.crash("in_transaction")
            step = "commit"
            try:
                txn.commit()  # 3g
                committed = True
            except FencedError:
                raise
            except Exception as exc:
                # Step 4's unknown outcome: the store, not a guess, says what happened.
                committed = s.outcome_of(ep.positions)
                if not committed:
                    raise CommitError(f"commit failed and did not land: {exc}") from exc
                log.warning("commit raised %s but landed; continuing", exc)
        except BaseException as exc:
            if not committed:
                txn.rollback()
                self._raise_failed(epoch_no, exc, step)
            raise
        if not self.exactly_once:
            # At-least-once: the offsets follow on their own, so a crash between the two
            # replays the epoch. This is the guarantee-off baseline.
            s.commit_offsets(ep.positions)
        self._last_committed_epoch = epoch_no
        self.epoch_no += 1
        self.commits += 1
        self.committed_positions.update(ep.positions)
        self.crash("after_commit")
        try:
            for name, d in self.dedups.items():
                d.committed(outcomes.get(name, {}), bool(purged.get(name)))
            s.after_commit()
            for st in self.states.values():
                st.committed()
            for name, rows in ep.sink_rows.items():
                self.sinks[name].after_commit(rows)
        except FencedError:
            raise
        except Exception as exc:
            raise AfterCommitError(
                f"epoch {epoch_no} committed, but the work after its commit failed "
                f"({type(exc).__name__}: {exc})",
                outage=self.is_outage(exc),
            ) from exc
        n_out = ep.records_out - ep.dead_letters
        self.executor.epoch = Epoch()
        self.hooks.commit_finished(epoch_no, ep.records_in, n_out, time.monotonic() - t0)
        return True

    def _prepare_sinks(self, ep: Epoch, s: Session, epoch_no: int) -> None:
        """Before 3a: sinks of other systems write and prepare (two-phase commit); the
        store's transaction then records what they prepared."""
        name = ""
        try:
            for name, rows in ep.sink_rows.items():
                self.sinks[name].prepare(rows, ep.positions, s.fence_token())
        except BaseException as exc:
            self._raise_failed(epoch_no, exc, f"{name}:prepare")
        self.crash("sink_prepared")

    def _raise_failed(self, epoch_no: int, exc: BaseException, step: str) -> NoReturn:
        """Step 4 for a failure before 3g returned (the transaction, if one was open,
        is rolled back already), then raise what the App decides by (step 5)."""
        self._abort_sinks()
        self.hooks.commit_failed(epoch_no, exc)
        self.abort()
        if isinstance(exc, (FencedError, SimulatedCrash)) or not isinstance(exc, Exception):
            raise exc
        raise EpochFailed(
            f"epoch {epoch_no} did not commit at {step} ({type(exc).__name__}: {exc}); "
            "rewound to the last commit",
            step=step,
            outage=self.is_outage(exc),
        ) from exc

    def _abort_sinks(self) -> None:
        for sink in self.sinks.values():
            try:
                sink.abort()
            except Exception as exc:
                log.warning("sink %s could not abort: %s", sink.name, exc)

    def abort(self) -> None:
        """Step 4: forget the epoch; the store's last commit is the only truth."""
        self.executor.epoch = Epoch()
        for st in self.states.values():
            st.reset()
        for d in self.dedups.values():
            d.reset()
        self.epoch_no += 1

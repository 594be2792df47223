"""The commit protocol. Its steps are numbered here and nowhere else.

One epoch:

1. Poll a batch from the assigned partitions, from the in-memory positions.
2. Run the operators in memory. State writes, dedup keys, outputs, sink rows and dead
   letters go to the epoch buffer (`Epoch`, the `StepState` dirty sets, the `DedupStep`
   new ids); nothing durable changes.
3. Checkpoint, when the commit interval or the record count is reached, or on shutdown:
   3a. open the backend transaction;
   3b. check the fencing epoch of every held partition (a zombie stops here);
   3c. write outputs and dead letters;
   3d. write state changes and dedup keys, and apply dedup retention;
   3e. let transactional and idempotent sinks write their rows (idempotent ones into
       the outbox);
   3f. write the input offsets, which only ever move forward;
   3g. commit.
   Then, once durable: idempotent sinks deliver from the outbox, caches are marked clean.
4. On any failure before 3g returns: abort, drop the epoch buffer, reload state and
   rewind positions to the last commit. If 3g itself raised, the outcome is unknown:
   re-read the committed offsets to find out what happened, never retry blindly.

Paranoid checks: an epoch number commits at most once, and offsets never move back
(checked again inside the transaction by the store).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ._crash import SimulatedCrash
from ._errors import CommitError, FencedError, UnavailableError
from ._runtime import DedupStep, Epoch, Executor
from ._sinks import Sink
from ._state import StepState

log = logging.getLogger("onceflow")


class Checkpoint:
    """Commits the executor's epoch buffer through a backend session, atomically."""

    def __init__(
        self,
        *,
        session: Any,
        executor: Executor,
        states: dict[str, StepState],
        dedups: dict[str, DedupStep],
        sinks: dict[str, Sink],
        crash: Callable[[str], None],
        hooks: Any,
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
            self._prepare_sinks(ep, s)
        conn = s.begin()  # 3a
        committed = False
        try:
            if self.exactly_once:
                s.check_fence(conn)  # 3b
            s.write_outputs(conn, ep.outputs)  # 3c, dead letters included
            for name, st in self.states.items():  # 3d
                if st.dirty:
                    s.write_state(conn, name, st.drain())
            outcomes: dict[str, dict[tuple[int, str], bytes | None]] = {}
            for name, d in self.dedups.items():
                if d.new:
                    outcomes[name] = self.executor.outcomes(d)
                    s.write_dedup(
                        conn,
                        name,
                        [
                            (p, i, seen, outcomes[name][(p, i)])
                            for (p, i), (seen, _) in d.new.items()
                        ],
                    )
                if self.commits % self._purge_every == 0:
                    s.purge_dedup(conn, name, d.ttl, d.max_keys)
            for name, rows in ep.sink_rows.items():  # 3e
                self.sinks[name].write(conn, rows)
            if self.exactly_once:
                s.write_positions(conn, ep.positions)  # 3f
            self.crash("in_transaction")
            try:
                s.commit(conn)  # 3g
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
                s.rollback(conn)
                self._abort_sinks()
                self.hooks.commit_failed(epoch_no, exc)
                self.abort()
                if isinstance(exc, (FencedError, CommitError, SimulatedCrash)):
                    raise
                raise CommitError(
                    f"epoch {epoch_no} did not commit ({type(exc).__name__}: {exc}); "
                    "rewound to the last commit"
                ) from exc
            raise
        if not self.exactly_once and hasattr(s, "commit_offsets"):
            # At-least-once on Kafka: offsets through the group after the transaction.
            s.commit_offsets(ep.positions)
        elif not self.exactly_once:
            # At-least-once: offsets follow in their own transaction, so a crash between
            # the two replays the epoch. This is the guarantee-off baseline.
            conn = s.begin()
            try:
                s.write_positions(conn, ep.positions)
                s.commit(conn)
            except BaseException:
                s.rollback(conn)
                raise
        self._last_committed_epoch = epoch_no
        self.epoch_no += 1
        self.commits += 1
        self.committed_positions.update(ep.positions)
        self.crash("after_commit")
        for name, d in self.dedups.items():
            for pk, (seen, _) in d.new.items():
                d.seen[pk] = (seen, outcomes.get(name, {}).get(pk))
            d.new.clear()
        s.after_commit()
        for st in self.states.values():
            st.committed()
        store_conn: Any = s.store.conn if hasattr(s, "store") else None
        for name, rows in ep.sink_rows.items():
            self.sinks[name].after_commit(store_conn, rows)
        n_out = ep.records_out - ep.dead_letters
        self.executor.epoch = Epoch()
        self.hooks.commit_finished(epoch_no, ep.records_in, n_out, time.monotonic() - t0)
        return True

    def _prepare_sinks(self, ep: Epoch, s: Any) -> None:
        """Before 3a: sinks of other systems write and prepare (two-phase commit); the
        store's transaction then records what they prepared."""
        try:
            for name, rows in ep.sink_rows.items():
                self.sinks[name].prepare(rows, ep.positions, s.fence_token())
        except BaseException as exc:
            self._abort_sinks()
            self.abort()
            # An outage is waited out by the App, not counted as a failed commit.
            if isinstance(exc, (FencedError, SimulatedCrash, UnavailableError)):
                raise
            raise CommitError(f"a sink could not prepare the epoch: {exc}") from exc
        self.crash("sink_prepared")

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

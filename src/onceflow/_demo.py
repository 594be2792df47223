"""`onceflow demo`: payments between accounts, with kill -9 and an audit.

Three things run at once:

* a producer **process** sends payments (`transfers`, keyed by payer, 4 partitions),
  re-sends about 5% of them (half as a retry with the same producer session and
  explicit sequence numbers, which the log drops; half from new producer sessions, which
  the pipeline's `dedupe` drops) and slips in a few malformed messages;
* the pipeline below runs in a child process (`onceflow._supervisor.Child`), which the
  demo SIGKILLs at random moments, and at named steps of the commit protocol through
  `crash_at=`, restarting it each time;
* this process shows progress and, once everything is processed, audits the committed
  data (`audit_payments`) and prints a table. The exit status is 1 if any check fails.

The pipeline (module-level `app`, so a child can load it as `onceflow._demo:app`):

    transfers ─ dedupe(payment-ids) ─ process(debits) ─┬─ outcomes
                                                       ├─ ledger   (debit entries)
                                                       └─ key_by(payee) ─ credits
    credits ─ process(credits) ─ ledger                               (credit entries)

An account has two sides. `debits` holds its spendable funds: the opening balance less
what it paid. `credits` holds what it received. A payment may spend only the payer's
spendable funds, so the overdraft decision reads state of the payer's own partition
only; that keeps each outcome a pure fold of the payer's committed transfers, which the
audit recomputes independently. The balance of an account is the sum of the two sides.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any, Literal, NamedTuple

import click
import msgspec

from ._app import App
from ._consumer import Consumer
from ._crash import CRASH_POINTS
from ._demo_postgres import DEMO_SINK_ENV, ledger_sink
from ._errors import ConfigError, OnceflowError
from ._kafka_common import is_kafka
from ._producer import Producer
from ._records import Record
from ._state import State
from ._supervisor import Child

if TYPE_CHECKING:
    from rich.console import Console

    from ._chaos_faults import BrokerControl

APP_NAME = "payments"
TRANSFERS = "transfers"
OUTCOMES = "outcomes"
CREDITS = "credits"
LEDGER = "ledger"
DEAD_LETTERS = f"{APP_NAME}.dead-letters"
# The producer's account of what it sent, read back by the audit: the audit needs the
# acknowledged sends, not only what the log happens to hold.
MANIFEST = "demo.manifest"
PARTITIONS = 4
OPENING_BALANCE = 10_000
# Far longer than any demo run: a payment id must be remembered for as long as a client
# may re-send it, and forgetting it early would be a duplicate, not a tidy-up.
DEDUP_TTL_S = 7 * 86_400
DEFAULT_RATE = 20_000
MALFORMED = 12
BATCH = 500
# The supervisor holds back this share of the payments until its kills are done, and
# lets it out a slice at a time (1/HOLD_SLICES of the run) while a kill waits for work.
HOLD_SHARE = 0.25
HOLD_SLICES = 50
# Re-sends, per mille of payments: retries within one producer session (dropped by the
# log's sequence numbers) and re-sends from a new session (dropped by `dedupe`).
RESEND_SAME_PERMILLE = 25
RESEND_NEW_PERMILLE = 25
# A new-session re-send arrives up to this many batches after the original, so that
# dedupe must remember ids across commits and restarts, not only within one epoch.
RESEND_MAX_DELAY_BATCHES = 40
SESSION_BATCHES = 20
MARKER = ".onceflow-demo"
CHILD_TARGET = "onceflow._demo:app"
STORE_FILE = "payments.db"


# -- the pipeline ---------------------------------------------------------------------


class Transfer(msgspec.Struct, frozen=True):
    """A payment as sent. Anything that does not decode into this is a dead letter."""

    id: str
    payer: str
    payee: str
    amount: Annotated[int, msgspec.Meta(gt=0)]


class Outcome(msgspec.Struct, frozen=True):
    id: str
    payer: str
    payee: str
    amount: int
    status: Literal["accepted", "rejected"]
    # The payer's spendable funds after the decision: lets a reader check the fold.
    available: int


class Credit(msgspec.Struct, frozen=True):
    """The instruction from stage 1 to stage 2 to credit the payee."""

    payment: str
    payer: str
    payee: str
    amount: int


class Entry(msgspec.Struct, frozen=True):
    """One ledger line. `total` is that side's running total after the entry: spendable
    funds after a debit, funds received after a credit."""

    payment: str
    account: str
    side: Literal["debit", "credit"]
    amount: int
    total: int


def debit(t: Transfer, state: State) -> list[Outcome | Entry | Credit]:
    """Stage 1, keyed by payer: accept the payment if the payer can cover it."""
    available: int = state.get(OPENING_BALANCE)
    if t.amount > available:
        return [Outcome(t.id, t.payer, t.payee, t.amount, "rejected", available)]
    available -= t.amount
    state.value = available
    return [
        Outcome(t.id, t.payer, t.payee, t.amount, "accepted", available),
        Entry(t.id, t.payer, "debit", t.amount, available),
        Credit(t.id, t.payer, t.payee, t.amount),
    ]


def credit(c: Credit, state: State) -> list[Entry]:
    """Stage 2, keyed by payee: add the amount to what the payee received."""
    received: int = state.get(0) + c.amount
    state.value = received
    return [Entry(c.payment, c.payee, "credit", c.amount, received)]


def make_app(store: str | None = None, sink: str | None = None) -> App:
    """The two-stage payments App; `store=None` takes ONCEFLOW_STORE or the default.

    With `sink` (a PostgreSQL URL) both stages also write their ledger entries, and
    with them the balances, into that database (`_demo_postgres`)."""
    app = App(APP_NAME, store=store, partitions=PARTITIONS)
    decided = (
        app.source(TRANSFERS, schema=Transfer, partitions=PARTITIONS)
        .dedupe(name="payment-ids", key=lambda t: t.id, ttl=DEDUP_TTL_S)
        .process(name="debits", fn=debit)
    )
    decided.filter(lambda v: type(v) is Outcome).to(OUTCOMES)
    debits = decided.filter(lambda v: type(v) is Entry).to(LEDGER)
    # A stateful step may not follow key_by in one stage, so the credits are re-keyed by
    # payee and go through a topic: stage 2 then finds each payee on one partition.
    decided.filter(lambda v: type(v) is Credit).key_by(lambda c: c.payee).to(CREDITS)
    credits = app.source(CREDITS, schema=Credit).process(name="credits", fn=credit).to(LEDGER)
    if sink:
        # One sink object for both stages: an epoch's entries of both go into one
        # PostgreSQL transaction, prepared and committed with the epoch.
        pg = ledger_sink(sink, OPENING_BALANCE)
        debits.sink(pg)
        credits.sink(pg)
    return app


# The supervisor names the run's database in the child's environment; unset or empty,
# the demo writes to topics only.
app = make_app(sink=os.environ.get(DEMO_SINK_ENV) or None)


# -- the producer process -------------------------------------------------------------


def _malformed(i: int, rng: random.Random, accounts: int) -> bytes | dict[str, Any]:
    """A message the pipeline must turn into a dead letter, never into a payment."""
    payer = _account(rng.randrange(accounts))
    variants: list[bytes | dict[str, Any]] = [
        b"\xff\xfe not json at all",
        b'{"id": "bad-' + str(i).encode() + b'", "payer": ',  # cut off mid-object
        {"id": f"bad-{i}", "payer": payer, "amount": 10},  # no payee
        {"id": f"bad-{i}", "payer": payer, "payee": payer},  # no amount
        {"id": f"bad-{i}", "payer": payer, "payee": payer, "amount": "12.50"},
        {"id": f"bad-{i}", "payer": payer, "payee": payer, "amount": -5},
    ]
    return variants[i % len(variants)]


def _account(i: int) -> str:
    return f"acct-{i:05d}"


def payment_id(i: int) -> str:
    return f"pay-{i:07d}"


def max_amount(payments: int, accounts: int) -> int:
    """Amounts average 1.1 times an account's opening balance over its share of the
    payments, so that accounts run dry towards the end and some payments are rejected."""
    return max(1, round(2.2 * OPENING_BALANCE * accounts / max(1, payments)))


def produce(
    store: str,
    *,
    payments: int,
    accounts: int,
    seed: int,
    rate: float,
    out: IO[str],
    gate: Callable[[], int] | None = None,
) -> dict[str, int]:
    """Send the demo's traffic; report progress to `out` as JSON lines; return the
    manifest, which is also sent to the manifest topic as the last record.

    `gate()` says how many payments may be sent so far: the supervisor holds back the
    last of them until its kills are done, so that a pipeline armed with a crash point
    always has work left to reach it with, however fast or slow the machine is."""
    rng = random.Random(seed)
    hi = max_amount(payments, accounts)
    picks = rng.sample(range(payments), min(payments, payments * 50 // 1000))
    # Kafka's idempotent producer retries within its session by itself and offers no
    # way to re-send with chosen sequence numbers, so on Kafka every re-send comes from
    # a new session and it is `dedupe` that must drop it.
    n_same = 0 if is_kafka(store) else payments * RESEND_SAME_PERMILLE // 1000
    resend_same = set(picks[:n_same])
    resend_new = picks[n_same:]
    malformed_after = sorted(rng.sample(range(payments), min(payments, MALFORMED)))
    # When each new-session re-send goes out, in batches; a batch past the end goes out
    # after the last one.
    due: dict[int, list[int]] = collections.defaultdict(list)
    for i in resend_new:
        due[i // BATCH + rng.randint(0, RESEND_MAX_DELAY_BATCHES)].append(i)
    plan = {
        "payments": payments,
        "resent_same_session": len(resend_same),
        "resent_new_session": len(resend_new),
        "malformed": len(malformed_after),
    }
    print(json.dumps({"plan": plan}), file=out, flush=True)

    def value(i: int) -> tuple[str, dict[str, Any], str]:
        r = random.Random(seed * 1_000_003 + i)  # re-sends must repeat the exact payment
        a = r.randrange(accounts)
        b = (a + 1 + r.randrange(accounts - 1)) % accounts if accounts > 1 else a
        pid = payment_id(i)
        payer = _account(a)
        return (
            payer,
            {"id": pid, "payer": payer, "payee": _account(b), "amount": r.randint(1, hi)},
            pid,
        )

    counts = dict.fromkeys(
        ("sent", "resent_same_session", "dropped_by_log", "resent_new_session", "malformed"), 0
    )
    sessions = 0
    session: Producer | None = None
    started = time.monotonic()
    bad = iter(malformed_after)
    next_bad = next(bad, None)
    with Producer(store, partitions=PARTITIONS) as p:
        n_batches = (payments + BATCH - 1) // BATCH
        batch_no = 0
        while batch_no < n_batches or due:
            lo, hi_i = batch_no * BATCH, min(payments, (batch_no + 1) * BATCH)
            while gate is not None and lo < payments and gate() < hi_i:
                time.sleep(0.01)
            items: list[tuple[str | None, Any, str | None]] = []
            for i in range(lo, hi_i):
                items.append(value(i))
                while next_bad is not None and next_bad == i:
                    k = counts["malformed"]
                    items.append(
                        (
                            _account(rng.randrange(accounts)),
                            _malformed(k, rng, accounts),
                            f"bad-{k}",
                        )
                    )
                    counts["malformed"] += 1
                    next_bad = next(bad, None)
            if items:
                _send_retrying(p, items, resend_same, counts)
                counts["sent"] += hi_i - lo
            # After the last batch, flush every re-send still scheduled.
            ready = [b for b in due if b <= batch_no or batch_no >= n_batches - 1]
            olds = [i for b in ready for i in due.pop(b)]
            if olds:
                if session is None or batch_no % SESSION_BATCHES == 0:
                    # A client that lost its session and reconnected: a new producer id,
                    # so the log's sequence numbers cannot recognise the re-send.
                    if session is not None:
                        session.close()
                    session = Producer(store, partitions=PARTITIONS)
                    sessions += 1
                session.send_batch(TRANSFERS, [value(i) for i in olds])
                counts["resent_new_session"] += len(olds)
            batch_no += 1
            print(json.dumps({"progress": counts}), file=out, flush=True)
            if rate > 0:
                ahead = counts["sent"] / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        if session is not None:
            session.close()
        manifest = {
            "payments": payments,
            "accounts": accounts,
            "opening_balance": OPENING_BALANCE,
            "seed": seed,
            "sessions": sessions,
            **counts,
        }
        p.send(MANIFEST, manifest)
    print(json.dumps({"done": manifest}), file=out, flush=True)
    return manifest


def _send_retrying(
    p: Producer,
    items: list[tuple[str | None, Any, str | None]],
    resend_same: set[int],
    counts: dict[str, int],
) -> None:
    """Send a batch, then re-send its `resend_same` payments in the same session with
    their sequence numbers: a retry after a lost acknowledgement, which the log drops."""
    if not resend_same:
        p.send_batch(TRANSFERS, items)
        return
    last = {part: p.last_sequence(TRANSFERS, part) for part in range(PARTITIONS)}
    results = p.send_batch(TRANSFERS, items)
    # Sequence numbers are consecutive per partition, so each item's number follows
    # from where it landed; a retry must reuse exactly that number.
    seqs: list[int] = []
    for r in results:
        last[r.partition] += 1
        seqs.append(last[r.partition])
    retry = [
        (item, seq)
        for item, seq in zip(items, seqs, strict=True)
        if item[2] is not None and _index(item[2]) in resend_same
    ]
    if retry:
        again = p.send_batch(TRANSFERS, [it for it, _ in retry], sequences=[s for _, s in retry])
        counts["resent_same_session"] += len(retry)
        counts["dropped_by_log"] += sum(1 for r in again if r.duplicate)


def _index(pid: str) -> int:
    return int(pid[4:]) if pid.startswith("pay-") else -1


def producer_main(argv: list[str]) -> int:
    """Entry of the producer process: one JSON argument with `produce`'s arguments."""
    args = json.loads(argv[0])
    allowed = [int(args.get("allowed", args["payments"]))]

    def read_allowances() -> None:
        # "allow N" lines from the supervisor; end of input means everything may go.
        for line in sys.stdin:
            word, _, n = line.partition(" ")
            if word == "allow":
                allowed[0] = max(allowed[0], int(n))
        allowed[0] = args["payments"]

    threading.Thread(target=read_allowances, daemon=True).start()
    produce(
        args["store"],
        payments=args["payments"],
        accounts=args["accounts"],
        seed=args["seed"],
        rate=args["rate"],
        out=sys.stdout,
        gate=lambda: allowed[0],
    )
    return 0


# -- the audit ------------------------------------------------------------------------


class Check(NamedTuple):
    name: str
    ok: bool
    detail: str


@dataclass
class Audit:
    """What the audit found: the checks, and the figures the demo's table shows."""

    checks: list[Check]
    figures: dict[str, int]

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)


_transfer = msgspec.json.Decoder(Transfer)
_outcome = msgspec.json.Decoder(Outcome)
_entry = msgspec.json.Decoder(Entry)
_credit = msgspec.json.Decoder(Credit)


def read_topic(store: str, topic: str) -> Iterator[Record]:
    """Every committed record of `topic`; each partition's records in offset order."""
    if is_kafka(store):
        from ._kafka_clients import read_committed

        yield from read_committed(store, topic, timeout=120.0)
        return
    # A fresh group per read: the audit never commits, so it leaves no trace and always
    # starts from the beginning.
    group = f"onceflow-demo-audit-{uuid.uuid4().hex[:12]}"
    with Consumer(store, group=group, topics=[topic]) as c:
        while batch := c.poll(max_records=50_000):
            yield from batch


def _read_only(store: str) -> sqlite3.Connection:
    conn = sqlite3.connect(store, timeout=60.0, isolation_level=None)
    conn.execute("PRAGMA query_only=ON")
    return conn


StepValues = dict[str, list[int]]


def _committed_state(store: str) -> tuple[int, StepValues, StepValues]:
    """Dedup ids held, and the committed state of `debits` and `credits`: account ->
    values, one per partition holding it (more than one is itself a finding)."""
    if is_kafka(store):
        from ._demo_kafka import committed_state

        return committed_state(store)
    with contextlib.closing(_read_only(store)) as conn:
        (dedup_ids,) = conn.execute(
            "SELECT COUNT(*) FROM dedup WHERE app=? AND step=?", (APP_NAME, "payment-ids")
        ).fetchone()
        return dedup_ids, _state_table(conn, "debits"), _state_table(conn, "credits")


def _state_table(conn: sqlite3.Connection, step: str) -> StepValues:
    out: StepValues = collections.defaultdict(list)
    for key, value in conn.execute(
        "SELECT key, value FROM state WHERE app=? AND step=?", (APP_NAME, step)
    ):
        out[key].append(msgspec.msgpack.decode(value))
    return out


def _sample(items: Iterable[object], n: int = 3) -> str:
    got = []
    for x in items:
        got.append(str(x))
        if len(got) == n:
            break
    return ", ".join(got)


def audit_payments(store: str | os.PathLike[str], sink: str | None = None) -> list[Check]:
    """Audit a payments store from committed data only: (check name, ok, detail).
    With `sink`, the URL of the run's PostgreSQL database, its tables are audited too.

    >>> bad = [c for c in audit_payments("demo-data/payments.db") if not c.ok]  # doctest: +SKIP
    """
    return run_audit(store, sink).checks


def run_audit(store: str | os.PathLike[str], sink: str | None = None) -> Audit:
    """`audit_payments`, plus the figures (accepted, rejected, ...) it counted.

    Each topic is read once, as a stream. Order matters only per key, and every key
    (payer, payee, account) lives on one partition, which the consumer reads in order.
    """
    path = os.fspath(store)
    if not is_kafka(path) and not os.path.exists(path):
        return Audit([Check("store exists", False, f"no store at {path}")], {})
    checks: list[Check] = []
    figures: dict[str, int] = {}

    def check(name: str, ok: bool, detail: str, *problems: tuple[str, list[Any]]) -> None:
        for what, items in problems:
            if items:
                detail += f"; {what}: {len(items):,} ({_sample(items)})"
        checks.append(Check(name, ok and not any(items for _, items in problems), detail))

    # What the producer acknowledged. Without it the audit can still check the pipeline
    # against the log, but not that the log holds everything that was sent.
    manifests = [json.loads(r.value) for r in read_topic(path, MANIFEST)]
    manifest: dict[str, int] = manifests[-1] if manifests else {}
    check(
        "producer finished and left its manifest",
        len(manifests) == 1,
        f"{len(manifests)} manifest record(s)",
    )
    opening = manifest.get("opening_balance", OPENING_BALANCE)

    # The log, replayed through a reference model of stage 1: the first occurrence of a
    # payment id wins, and each payer spends from its opening balance in log order.
    bad: set[tuple[int, int]] = set()
    first: dict[str, Transfer] = {}
    expected: dict[str, tuple[str, int]] = {}
    available: dict[str, int] = {}
    n_log = valid = 0
    for rec in read_topic(path, TRANSFERS):
        n_log += 1
        try:
            t = _transfer.decode(rec.value)
        except msgspec.DecodeError:
            bad.add((rec.partition, rec.offset))
            continue
        valid += 1
        if t.id in first:
            continue
        first[t.id] = t
        left = available.get(t.payer, opening)
        if t.amount <= left:
            left -= t.amount
            available[t.payer] = left
            expected[t.id] = ("accepted", left)
        else:
            expected[t.id] = ("rejected", left)
    distinct = len(first)
    figures.update(log_records=n_log, log_valid=valid, distinct_payments=distinct)

    if manifest:
        n = manifest["payments"]
        check(
            "every payment sent reached the log",
            True,
            f"{n:,} sent, {distinct:,} distinct in the log",
            ("missing", [payment_id(i) for i in range(n) if payment_id(i) not in first]),
            ("never sent", [pid for pid in first if not 0 <= _index(pid) < n]),
        )
        same, dropped = manifest["resent_same_session"], manifest["dropped_by_log"]
        new = manifest["resent_new_session"]
        holds = f"the log holds {valid:,} payments, expected {n:,} + {new:,} new-session re-sends"
        if is_kafka(path):
            # No explicit re-sends on Kafka; what remains to check is that the client's
            # own retries (through broker kills) did not write a payment twice.
            check("the log holds each send once (idempotent producer)", valid == n + new, holds)
        else:
            check(
                "same-session re-sends dropped by the log",
                same == dropped and valid == n + new,
                f"{same:,} re-sent with their sequence numbers, {dropped:,} dropped; {holds}",
            )

    per_id: collections.Counter[str] = collections.Counter()
    wrong: list[str] = []
    accepted: set[str] = set()
    for rec in read_topic(path, OUTCOMES):
        o = _outcome.decode(rec.value)
        per_id[o.id] += 1
        if o.status == "accepted":
            accepted.add(o.id)
        sent = first.get(o.id)
        if sent is not None and (
            (o.status, o.available) != expected[o.id]
            or (o.payer, o.payee, o.amount) != (sent.payer, sent.payee, sent.amount)
        ):
            wrong.append(o.id)
    n_out = sum(per_id.values())
    check(
        "exactly one outcome per payment",
        True,
        f"{n_out:,} outcomes for {len(per_id):,} payment ids",
        ("more than one", [pid for pid, k in per_id.items() if k > 1]),
        ("for ids never sent", [pid for pid in per_id if pid not in first]),
    )
    check(
        "nothing lost: every payment has an outcome",
        True,
        f"{len(per_id.keys() & first.keys()):,} of {distinct:,} payments have an outcome",
        ("no outcome", [pid for pid in first if pid not in per_id]),
    )
    check(
        "outcomes equal a replay of the committed transfers",
        True,
        f"{n_out - len(wrong):,} of {n_out:,} outcomes match the reference model",
        ("differ", wrong),
    )
    figures.update(outcomes=n_out, accepted=len(accepted), rejected=n_out - len(accepted))

    dedup_ids, debits_state, credits_state = _committed_state(path)
    dropped_by_dedupe = valid - n_out
    figures.update(dropped_by_dedupe=dropped_by_dedupe, dedup_ids=dedup_ids)
    want_new = manifest.get("resent_new_session", valid - distinct)
    check(
        "new-session re-sends dropped by dedupe",
        dropped_by_dedupe == valid - distinct == want_new and dedup_ids == distinct,
        f"{valid - distinct:,} duplicate payments in the log, {dropped_by_dedupe:,} "
        f"dropped; dedupe remembers {dedup_ids:,} ids for {distinct:,} payments",
    )

    # Ledger: count entries per payment and fold each account's sides in log order,
    # checking every running total on the way.
    sides: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    folded: dict[tuple[str, str], int] = {}
    misfiled: list[str] = []
    broken: list[str] = []
    negative: list[str] = []
    # Kept only for the PostgreSQL audit, which holds each row against its entry.
    topic_ledger: dict[tuple[str, str], Entry] = {}
    for rec in read_topic(path, LEDGER):
        e = _entry.decode(rec.value)
        if sink:
            topic_ledger[(e.payment, e.side)] = e
        is_debit = e.side == "debit"
        sides[e.payment][0 if is_debit else 1] += 1
        sent = first.get(e.payment)
        owner = None if sent is None else sent.payer if is_debit else sent.payee
        if sent is not None and (e.account, e.amount) != (owner, sent.amount):
            misfiled.append(e.payment)
        k = (e.account, e.side)
        now = folded.get(k, opening if is_debit else 0) + (-e.amount if is_debit else e.amount)
        if now != e.total:
            broken.append(f"{e.payment} {e.side} {e.account}: {e.total} != {now}")
        folded[k] = now
        if e.total < 0:
            negative.append(f"{e.payment} {e.account}")
    n_debit = sum(d for d, _ in sides.values())
    n_credit = sum(c for _, c in sides.values())
    figures.update(ledger=n_debit + n_credit, debit_entries=n_debit, credit_entries=n_credit)
    check(
        "one debit and one credit per accepted payment, none otherwise",
        True,
        f"{n_debit:,} debits and {n_credit:,} credits for {len(accepted):,} accepted payments",
        (
            "wrong number of entries",
            [
                pid
                for pid in accepted | sides.keys()
                if sides.get(pid, [0, 0]) != ([1, 1] if pid in accepted else [0, 0])
            ],
        ),
        ("wrong account or amount", misfiled),
    )

    spend = {a: v[0] for a, v in debits_state.items()}
    received = {a: v[0] for a, v in credits_state.items()}
    touched = spend.keys() | received.keys() | {a for a, _ in folded}
    check(
        "balances equal the fold of the ledger",
        True,
        f"debits and credits state of {len(spend.keys() | received.keys()):,} accounts",
        ("running total broken", broken),
        (
            "state differs from the ledger",
            [
                a
                for a in touched
                if spend.get(a, opening) != folded.get((a, "debit"), opening)
                or received.get(a, 0) != folded.get((a, "credit"), 0)
            ],
        ),
        (
            "account held on several partitions",
            [a for a, v in (*debits_state.items(), *credits_state.items()) if len(v) != 1],
        ),
    )

    # Accounts that never paid or were paid still hold their opening balance.
    n_accounts = max(manifest.get("accounts", 0), len(touched))
    balances = {a: spend.get(a, opening) + received.get(a, 0) for a in touched}
    total = sum(balances.values()) + (n_accounts - len(touched)) * opening
    want = n_accounts * opening
    figures.update(accounts=n_accounts, money=total, money_expected=want)
    check(
        "money conserved",
        total == want,
        f"sum of balances {total:,} {'==' if total == want else '!='} "
        f"{n_accounts:,} accounts x {opening:,}",
    )
    figures["min_balance"] = min(balances.values(), default=opening)
    check(
        "no negative balance",
        True,
        f"lowest balance {figures['min_balance']:,}",
        ("negative balance", [a for a, b in balances.items() if b < 0]),
        ("negative running total", negative),
    )

    dead: collections.Counter[tuple[str, int, int]] = collections.Counter()
    for rec in read_topic(path, DEAD_LETTERS):
        h = rec.headers or {}
        dead[
            (
                h.get("onceflow-source-topic", "?"),
                int(h.get("onceflow-source-partition", -1)),
                int(h.get("onceflow-source-offset", -1)),
            )
        ] += 1
    n_dead = sum(dead.values())
    want_bad = manifest.get("malformed", len(bad))
    figures.update(malformed_in_log=len(bad), dead_letters=n_dead)
    check(
        "every malformed message is one dead letter, and nothing else is",
        len(bad) == want_bad,
        f"{want_bad:,} malformed sent, {len(bad):,} in the log, {n_dead:,} dead letters",
        ("no dead letter", sorted(bad - {(p, o) for tp, p, o in dead if tp == TRANSFERS})),
        ("dead-lettered more than once", [k for k, v in dead.items() if v > 1]),
        (
            "dead letter of a valid record",
            [k for k in dead if (k[1], k[2]) not in bad or k[0] != TRANSFERS],
        ),
    )
    figures.update({f"sent_{k}": v for k, v in manifest.items() if isinstance(v, int)})
    if sink:
        from ._demo_postgres import Expected
        from ._demo_postgres import audit as audit_postgres

        baseline = Expected(
            first, accepted, topic_ledger, spend, received, opening, n_accounts, APP_NAME
        )
        pg_checks, pg_figures = audit_postgres(sink, baseline)
        checks.extend(Check(*c) for c in pg_checks)
        figures.update(pg_figures)
    return Audit(checks, figures)


# -- running the demo -----------------------------------------------------------------


@dataclass
class Kill:
    """One planned kill: a SIGKILL from here once `at` of the payments are processed, or
    a `crash_at` point the child reaches on its own (its `nth` time there)."""

    how: Literal["signal", "crash_at"]
    at: float = 0.0
    point: str = ""
    nth: int = 1
    done: str = ""


def held_back(payments: int, plan: Sequence[object]) -> int:
    """How many payments the producer may send before the supervisor lets out more: a
    whole number of batches, since the producer sends whole batches only."""
    return (payments - int(payments * HOLD_SHARE)) // BATCH * BATCH if plan else payments


def plan_kills(kills: int, rng: random.Random, *, sink: bool = False) -> list[Kill]:
    """SIGKILLs at random moments, and every third kill a crash point of the protocol.

    The first kill is a crash inside the first commit: the first incarnation always has
    work, so that point is sure to be reached. A later crash point is armed after a
    random SIGKILL; if nothing is left to commit by then, a SIGKILL stands in for it.

    With a PostgreSQL `sink` the first crash is between PREPARE TRANSACTION and the
    store's commit (`sink_prepared`), the second between the store's commit and COMMIT
    PREPARED (`after_commit`); a plan of two kills or more has both.
    """
    if kills <= 0:
        return []
    if sink:
        # The demo's one sink is transactional: the idempotent and effect points are
        # never reached.
        unreachable: tuple[str, ...] = ("sink_flush", "sink_delivered", "effect_called")
        first: tuple[str, ...] = ("sink_prepared", "after_commit", "in_transaction")
        n_crash = min(kills, max(2, kills // 3))
    else:
        # The demo writes to topics only: the sink and effect points are never reached.
        unreachable = ("sink_flush", "sink_delivered", "sink_prepared", "effect_called")
        first = ("in_transaction", "after_commit")
        n_crash = max(1, kills // 3)
    points = [p for p in CRASH_POINTS if p not in unreachable]
    preferred = [*first, "before_commit"]
    crash_idx = [0] + [min(3 * j - 1, kills - 1) for j in range(1, n_crash)]
    ats = sorted(rng.uniform(0.05, 0.9) for _ in range(kills - len(crash_idx)))
    plan: list[Kill] = []
    for i in range(kills):
        if i in crash_idx:
            j = crash_idx.index(i)
            point = preferred[j] if j < len(preferred) else rng.choice(points)
            plan.append(Kill("crash_at", point=point, nth=1 if j == 0 else rng.randint(1, 4)))
        else:
            plan.append(Kill("signal", at=ats.pop(0)))
    return plan


class _Probe:
    """Reads progress from the store: end offsets and the App's committed offsets."""

    def __init__(self, store: str) -> None:
        self.conn = _read_only(store)

    def offsets(self) -> tuple[dict[str, int], dict[str, int]]:
        # One read transaction, so that "everything committed" is judged on one snapshot.
        c = self.conn
        c.execute("BEGIN")
        try:
            ends = dict(
                c.execute(
                    "SELECT t.name, SUM(p.next_offset) FROM topics t "
                    "JOIN partitions p ON p.topic_id=t.id GROUP BY t.name"
                ).fetchall()
            )
            done = dict(
                c.execute(
                    "SELECT t.name, SUM(g.next_offset) FROM group_offsets g "
                    "JOIN topics t ON t.id=g.topic_id WHERE g.grp=? GROUP BY t.name",
                    (APP_NAME,),
                ).fetchall()
            )
        finally:
            c.execute("COMMIT")
        return ends, done

    def holds_leases(self, pid: int) -> bool:
        """Whether process `pid` runs the App: it took the leases, so it has recovered
        and installed its SIGTERM handler, which App.run() does before taking them."""
        row = self.conn.execute(
            "SELECT 1 FROM leases WHERE app=? AND owner LIKE ? LIMIT 1", (APP_NAME, f"%:{pid}:%")
        ).fetchone()
        return row is not None

    def close(self) -> None:
        self.conn.close()


class _ProducerProcess:
    """The producer (`producer_main`) in a process of its own; its JSON progress lines
    are read in a thread."""

    def __init__(self, args: dict[str, Any]) -> None:
        code = (
            "import sys; from onceflow._demo import producer_main; "
            "sys.exit(producer_main(sys.argv[1:]))"
        )
        self._lock = threading.Lock()
        self._sent: dict[str, int] = {}
        self._planned: dict[str, int] = {}
        self.payments = int(args["payments"])
        self.allowed = int(args.get("allowed", self.payments))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._out = _Tail(self.proc.stdout, self._on_line)
        self._err = _Tail(self.proc.stderr)

    def _on_line(self, line: str) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            return
        with self._lock:
            self._planned.update(msg.get("plan", {}))
            self._sent.update(msg.get("progress", {}))
            self._sent.update(msg.get("done", {}))

    def sent_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._sent)

    def feed(self, drained: bool, kills_pending: bool) -> None:
        """Let the producer send more: everything once no kill is pending, else another
        slice each time the pipeline committed all that was sent (so a pipeline waiting
        for a kill is never left without work)."""
        if self.allowed >= self.payments:
            return
        if not kills_pending:
            self._allow(self.payments)
        elif drained and self.sent_counts().get("sent", 0) >= self.allowed:
            step = max(1, self.payments // HOLD_SLICES // BATCH) * BATCH
            self._allow(self.allowed + step)

    def _allow(self, n: int) -> None:
        self.allowed = min(self.payments, n)
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(f"allow {self.allowed}\n".encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # the producer is gone; its exit status tells why

    def planned(self) -> dict[str, int]:
        with self._lock:
            return dict(self._planned)

    def poll(self) -> int | None:
        return self.proc.poll()

    def failure(self) -> str:
        self._err.join()
        return f"the producer failed (exit {self.proc.returncode}):\n{self._err.text()}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._out.join()


class _Tail:
    """Drains a pipe in a thread, keeping the last lines.

    A child's stderr pipe that nobody reads fills up (64 KiB) and then blocks the child
    in its next write, which would look like a hung pipeline."""

    def __init__(self, pipe: IO[bytes] | None, on_line: Callable[[str], None] | None = None):
        self.lines: collections.deque[str] = collections.deque(maxlen=40)
        self._on_line = on_line
        self._thread: threading.Thread | None = None
        if pipe is not None:
            self._thread = threading.Thread(target=self._run, args=(pipe,), daemon=True)
            self._thread.start()

    def _run(self, pipe: IO[bytes]) -> None:
        for raw in iter(pipe.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if self._on_line is not None:
                self._on_line(line)

    def join(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass
class DemoResult:
    """One demo run: the audit, the kills as carried out, and `error` if the run itself
    failed (a process exited unexpectedly), in which case nothing was audited."""

    audit: Audit
    kills: list[Kill]
    seconds: float
    store: str
    sent: dict[str, int] = field(default_factory=dict)
    error: str = ""
    # The URL of the run's PostgreSQL database, with --sink.
    sink: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.audit.ok


def prepare_dir(directory: Path) -> str:
    """Wipe the demo directory, refusing one the demo did not create."""
    if directory.exists():
        if not directory.is_dir():
            raise ConfigError(f"demo directory {directory} exists and is not a directory")
        if any(directory.iterdir()) and not (directory / MARKER).exists():
            raise ConfigError(
                f"demo directory {directory} is not empty and was not made by `onceflow "
                "demo`, so the demo will not wipe it. Operator action: pass --dir with a "
                "new or empty directory"
            )
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    (directory / MARKER).write_text("made by `onceflow demo`; wiped by its next run\n")
    return str(directory / STORE_FILE)


def run_demo(
    *,
    payments: int = 200_000,
    accounts: int = 1_000,
    kills: int = 6,
    seed: int | None = None,
    directory: str | os.PathLike[str] = "demo-data",
    rate: float = DEFAULT_RATE,
    console: Console | None = None,
    timeout: float = 600.0,
    store: str | None = None,
    workers: int = 2,
    broker: BrokerControl | None = None,
    broker_kills: int = 1,
    sink: str | None = None,
) -> DemoResult:
    """Run the demo end to end and audit it; `console=None` runs silently.

    With `store="kafka://..."` it runs on Kafka in `workers` worker processes, in a
    fresh namespace of that cluster, and SIGKILLs and restarts the broker through
    `broker` `broker_kills` times (see `_demo_kafka`); `directory` then only holds the
    workers' local state.

    With `sink="postgresql://user@host:port/db"` it creates a database
    `onceflow_demo_<tag>` on that server, the pipeline writes the ledger and the
    balances into it through a PostgresSink, the kill plan includes the crash points
    around PREPARE TRANSACTION, and the audit checks the tables (`_demo_postgres`). The
    database is kept for inspection; `DemoResult.sink` is its URL.

    >>> result = run_demo(payments=3_000, kills=3, directory="/tmp/demo")  # doctest: +SKIP
    >>> result.ok                                                            # doctest: +SKIP
    True
    """
    if seed is None:
        seed = random.randrange(1_000_000)
    if store is not None and not is_kafka(store):
        raise ConfigError(
            f"--store {store}: the embedded demo keeps its store in DIR/{STORE_FILE}; pass "
            "--dir for another place, or --store kafka://HOST:PORT to run on Kafka"
        )
    t0 = time.monotonic()
    # The directory before the database: a directory the demo refuses to wipe must not
    # leave a database behind.
    local_store = prepare_dir(Path(directory))
    run_db = _run_database(sink, console)
    if store is not None:
        from ._demo_kafka import run_kafka_demo

        result = run_kafka_demo(
            store=store,
            payments=payments,
            accounts=accounts,
            kills=kills,
            seed=seed,
            directory=directory,
            rate=rate,
            workers=workers,
            broker=broker,
            broker_kills=broker_kills,
            console=console,
            timeout=timeout,
            sink=run_db,
        )
        result.sink = run_db or ""
        return result
    store = local_store
    # Creates the schema before the probe reads it, whichever process starts first.
    Producer(store).close()
    plan = plan_kills(kills, random.Random(seed ^ 0x5EED), sink=run_db is not None)
    run = _Supervisor(store, plan, payments, random.Random(seed ^ 0xC0FFEE), console, run_db)
    args = {
        "store": store,
        "payments": payments,
        "accounts": accounts,
        "seed": seed,
        "rate": rate,
        "allowed": held_back(payments, plan),
    }
    try:
        run.start_producer(args)
        with run.progress:
            run.start_child()
            while run.step():
                if time.monotonic() - t0 > timeout:
                    run.error = f"the demo did not finish within {timeout:.0f}s"
                    break
                time.sleep(0.02)
            run.refresh()
    finally:
        run.close()
    sent = run.sent_counts()
    if run.error:
        return DemoResult(
            Audit([], {}), plan, time.monotonic() - t0, store, sent, run.error, run_db or ""
        )
    run.say("auditing the committed data ...")
    audit = run_audit(store, run_db)
    return DemoResult(audit, plan, time.monotonic() - t0, store, sent, sink=run_db or "")


def _run_database(sink: str | None, console: Console | None) -> str | None:
    """The run's own PostgreSQL database, created on the server `sink` names."""
    if sink is None:
        return None
    from ._demo_postgres import create_run_database, database_name
    from ._postgres_sink import redact

    url = create_run_database(sink)
    if console is not None:
        console.print(
            f"PostgreSQL: ledger and balances go to the new database "
            f"[bold]{database_name(url)}[/] ({redact(url)}), kept after the run"
        )
    return url


class _Supervisor:
    """Runs the producer and the pipeline child, and carries out the kill plan.

    The loop calls `step()` every 20 ms; each call reads progress from the store and
    takes at most one action: kill and restart the child, or stop it once everything
    sent is committed.
    """

    def __init__(
        self,
        store: str,
        plan: list[Kill],
        payments: int,
        rng: random.Random,
        console: Console | None,
        sink: str | None = None,
    ) -> None:
        self.store = store
        self.sink = sink
        self.plan = plan
        self.payments = payments
        self.rng = rng
        self.console = console
        self.error = ""
        self.progress = _Progress(console, payments, len(plan))
        self.probe = _Probe(store)
        self.producer: _ProducerProcess | None = None
        self.child: Child | None = None
        self._child_err = _Tail(None)
        self.armed: Kill | None = None
        self._started_at = 0
        self._kill_due: float | None = None
        self._up = False
        self.processed = 0

    def say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text)

    # -- the processes ------------------------------------------------------------------

    def start_producer(self, args: dict[str, Any]) -> None:
        self.producer = _ProducerProcess(args)

    def sent_counts(self) -> dict[str, int]:
        return self.producer.sent_counts() if self.producer is not None else {}

    def start_child(self) -> None:
        """A new incarnation, armed with a crash point when that is the next kill."""
        pending = self._pending()
        self.armed = pending if pending is not None and pending.how == "crash_at" else None
        crash_at = f"{self.armed.point}:{self.armed.nth}" if self.armed is not None else None
        # Always set, empty without a sink: one left in the shell must not add a sink.
        env = {DEMO_SINK_ENV: self.sink or ""}
        self.child = Child(CHILD_TARGET, store=self.store, crash_at=crash_at, env=env)
        self._child_err = _Tail(self.child.proc.stderr)
        self._started_at = self.processed
        self._up = False

    def close(self) -> None:
        if self.child is not None and self.child.alive():
            self.child.kill()
        if self.producer is not None:
            self.producer.close()
        self.probe.close()

    # -- the loop -----------------------------------------------------------------------

    def _pending(self) -> Kill | None:
        return next((k for k in self.plan if not k.done), None)

    def _killed(self, kill: Kill, how: str, note: str) -> None:
        kill.done = how
        n = sum(1 for k in self.plan if k.done)
        self.say(f"[yellow]kill {n}/{len(self.plan)}[/]: {note}; restarting")
        self.start_child()

    def refresh(self) -> tuple[dict[str, int], dict[str, int]]:
        ends, done = self.probe.offsets()
        self.processed = done.get(TRANSFERS, 0)
        if self.producer is not None:
            sent, planned = self.producer.sent_counts(), self.producer.planned()
            self.progress.update(sent.get("sent", 0), self.processed, planned)
        self.progress.kills(sum(1 for k in self.plan if k.done))
        return ends, done

    def step(self) -> bool:
        """One look at the world and at most one action. False once finished or failed."""
        assert self.child is not None and self.producer is not None
        ends, done = self.refresh()
        producer_rc = self.producer.poll()
        if producer_rc not in (None, 0):
            self.error = self.producer.failure()
            return False
        # Both sources fully committed on one snapshot: a stage-1 commit writes credits
        # and moves the transfers offsets atomically, so nothing is left in flight.
        drained = ends.get(TRANSFERS, 0) > 0 and all(
            done.get(t, 0) == ends.get(t, 0) for t in (TRANSFERS, CREDITS)
        )
        finished = producer_rc == 0 and drained
        pending = self._pending()
        self.producer.feed(drained, pending is not None)
        if not self.child.alive():
            rc = self.child.wait()
            if self.armed is not None and rc == -signal.SIGKILL:
                point, n = self.armed.point, self.processed
                note = f"died at crash point [bold]{point}[/] with {n:,} transfers committed"
                self._killed(self.armed, "crash_at", note)
                return True
            self._child_err.join()
            self.error = f"the pipeline process exited with {rc}:\n{self._child_err.text()}"
            return False
        # Until the new incarnation has recovered and taken the leases, a SIGKILL would
        # only kill a Python start-up, and a SIGTERM would too: its handler is not yet in.
        self._up = self._up or self.probe.holds_leases(self.child.proc.pid)
        if not self._up:
            return True
        if pending is not None and pending.how == "crash_at":
            # This incarnation is armed and dies by itself; unless nothing is left to
            # commit, in which case it never reaches the point and a SIGKILL stands in.
            if finished:
                self.child.kill()
                self._killed(pending, "signal", f"SIGKILL, idle before {pending.point}")
            return True
        if pending is not None:
            # A kill waits until this incarnation committed something, so the run moves
            # forward however the kills fall.
            moved = self.processed > self._started_at or drained
            now = time.monotonic()
            if self._kill_due is None and self.processed >= pending.at * self.payments and moved:
                self._kill_due = now + self.rng.uniform(0.0, 0.2)
            if self._kill_due is not None and now >= self._kill_due:
                self._kill_due = None
                self.child.kill()
                self._killed(
                    pending, "signal", f"SIGKILL with {self.processed:,} transfers committed"
                )
            return True
        if finished:
            rc = self.child.stop()
            if rc != 0:
                self._child_err.join()
                self.error = f"the pipeline did not stop cleanly (exit {rc}):\n"
                self.error += self._child_err.text()
            return False
        return True


class _Progress:
    """Live bars on a terminal; nothing otherwise (the kill lines still print)."""

    def __init__(self, console: Console | None, payments: int, kills: int) -> None:
        self.payments = payments
        self._bars: Any = None
        if console is not None and console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._bars = Progress(
                TextColumn("{task.description:<22}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
            )
            self._sent = self._bars.add_task("payments sent", total=payments)
            self._proc = self._bars.add_task("transfers processed", total=payments)
            self._kill = self._bars.add_task("kills survived", total=max(1, kills))

    def __enter__(self) -> _Progress:
        if self._bars is not None:
            self._bars.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bars is not None:
            self._bars.__exit__(*exc)

    def update(self, sent: int, processed: int, planned: dict[str, int]) -> None:
        if self._bars is None:
            return
        # The log holds the payments plus what the log does not drop by itself.
        in_log = planned.get("payments", self.payments) + planned.get("resent_new_session", 0)
        in_log += planned.get("malformed", 0)
        self._bars.update(self._sent, completed=sent)
        self._bars.update(self._proc, completed=processed, total=in_log)

    def kills(self, n: int) -> None:
        if self._bars is not None:
            self._bars.update(self._kill, completed=n)


# -- the report and the command -------------------------------------------------------


def render(result: DemoResult, console: Console) -> None:
    """The final tables: what was sent and done, and the audit."""
    from rich.table import Table

    f = result.audit.figures
    kills = [k for k in result.kills if k.done]
    at_points = [k for k in kills if k.how == "crash_at" and k.done.startswith("crash_at")]
    t = Table(title="onceflow payments demo", title_justify="left")
    t.add_column("")
    t.add_column("count", justify="right")
    t.add_column("", style="dim")

    def row(label: str, key: str, note: str = "") -> None:
        t.add_row(label, f"{f[key]:,}" if key in f else "-", note)

    on_kafka = "workers" in f
    row("payments sent (acknowledged)", "sent_payments")
    if on_kafka:
        t.add_row("re-sent, same session", "-", "Kafka's producer retries by itself")
    else:
        row("re-sent, same session (sequences=)", "sent_resent_same_session")
        row("  dropped by the log", "sent_dropped_by_log", "producer sequence numbers")
    row(
        "re-sent, new producer session",
        "sent_resent_new_session",
        f"{f.get('sent_sessions', 0)} sessions",
    )
    row("  dropped by dedupe", "dropped_by_dedupe", "dedupe(name='payment-ids')")
    row("malformed messages sent", "sent_malformed")
    row("  dead letters", "dead_letters", DEAD_LETTERS)
    points = ", ".join(k.point for k in at_points)
    t.add_row(
        "kills survived (SIGKILL)",
        f"{len(kills)}",
        f"{len(at_points)} inside the protocol: {points}" if at_points else "",
    )
    if on_kafka:
        row("worker processes", "workers", f"{f.get('worker_restarts', 0)} died on their own")
        row("broker kills survived (SIGKILL)", "broker_kills", "and restarts")
        row("records seen live (read_committed)", "live_records", "outcomes and ledger")
    row("payments accepted", "accepted")
    row("payments rejected (overdraft)", "rejected")
    row("ledger entries", "ledger", "one debit + one credit per accepted payment")
    row("total money", "money", f"expected {f.get('money_expected', 0):,}")
    if result.sink:
        from ._demo_postgres import database_name

        row("PostgreSQL ledger rows", "pg_ledger", f"database {database_name(result.sink)}")
        row("PostgreSQL total money", "pg_money", "sum of table balances")
    t.add_row("wall time", f"{result.seconds:.1f} s", "")
    console.print(t)
    a = Table(title="audit (committed data only)", title_justify="left")
    a.add_column("check")
    a.add_column("", justify="center")
    a.add_column("detail", style="dim")
    for c in result.audit.checks:
        a.add_row(c.name, "[green]ok[/]" if c.ok else "[bold red]FAILED[/]", c.detail)
    console.print(a)
    if result.error:
        console.print(f"[bold red]error:[/] {result.error}")
    elif result.ok:
        console.print(f"[bold green]all {len(result.audit.checks)} checks passed[/]")
    else:
        failed = sum(1 for c in result.audit.checks if not c.ok)
        console.print(f"[bold red]{failed} check(s) failed[/]")


@click.command(name="demo")
@click.option(
    "--payments",
    default=200_000,
    show_default=True,
    type=click.IntRange(1),
    help="Payments to send.",
)
@click.option(
    "--accounts",
    default=1_000,
    show_default=True,
    type=click.IntRange(2),
    help="Accounts paying each other.",
)
@click.option(
    "--kills",
    default=6,
    show_default=True,
    type=click.IntRange(0),
    help="Times the pipeline process is killed (SIGKILL or a crash point).",
)
@click.option("--seed", type=int, default=None, help="Random seed (default: random, printed).")
@click.option(
    "--dir",
    "directory",
    default="demo-data",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Working directory; wiped at start.",
)
@click.option(
    "--rate",
    default=DEFAULT_RATE,
    show_default=True,
    type=click.FloatRange(0),
    help="Payments per second the producer sends; 0 = as fast as it can.",
)
@click.option(
    "--store",
    default=None,
    help="kafka://HOST:PORT[/NAMESPACE] to run on Kafka (a fresh namespace per run); "
    "default: the embedded store DIR/payments.db.",
)
@click.option(
    "--workers",
    default=2,
    show_default=True,
    type=click.IntRange(1, PARTITIONS),
    help="Worker processes on Kafka.",
)
@click.option("--broker-kill", default=None, help="Shell command that SIGKILLs the broker.")
@click.option("--broker-start", default=None, help="Shell command that starts it again.")
@click.option(
    "--broker-kills",
    default=1,
    show_default=True,
    type=click.IntRange(0),
    help="Broker kills (Kafka, with --broker-kill and --broker-start).",
)
@click.option(
    "--sink",
    default=None,
    metavar="postgresql://USER@HOST:PORT/DB",
    help="Also write the ledger and the balances to PostgreSQL, in a new database "
    "onceflow_demo_<tag> on that server, and audit them there.",
)
@click.pass_context
def demo_command(
    ctx: click.Context,
    payments: int,
    accounts: int,
    kills: int,
    seed: int | None,
    directory: str,
    rate: float,
    store: str | None,
    workers: int,
    broker_kill: str | None,
    broker_start: str | None,
    broker_kills: int,
    sink: str | None,
) -> None:
    """Payments with kill -9: send, process, crash, restart, then audit the result.

    A producer process sends payments (with re-sends and malformed messages) while the
    pipeline runs in a child process that is SIGKILLed at random moments and at steps of
    the commit protocol. The audit then checks, from committed data only, that every
    payment took effect exactly once and that no money appeared or vanished. Exit status
    1 if any check fails.
    """
    from rich.console import Console

    from ._chaos_faults import ShellBroker

    if (broker_kill is None) != (broker_start is None):
        raise click.UsageError("--broker-kill and --broker-start go together")
    on_kafka = store is not None and is_kafka(store)
    if broker_kill is not None and not on_kafka:
        raise click.UsageError("--broker-kill needs --store kafka://...")
    console = Console()
    if seed is None:
        seed = random.randrange(1_000_000)
    broker = ShellBroker(broker_kill, broker_start) if broker_kill and broker_start else None
    where = os.path.join(directory, STORE_FILE)
    if on_kafka:
        where = f"{store}, {workers} workers, "
        where += f"{broker_kills} broker kills" if broker else "no broker kills (--broker-kill)"
    console.print(
        f"onceflow demo: {payments:,} payments between {accounts:,} accounts, {kills} kills, "
        f"seed {seed}, store {where}"
    )
    try:
        result = run_demo(
            payments=payments,
            accounts=accounts,
            kills=kills,
            seed=seed,
            directory=directory,
            rate=rate,
            console=console,
            store=store,
            workers=workers,
            broker=broker,
            broker_kills=broker_kills,
            sink=sink,
        )
    except OnceflowError as exc:
        raise click.ClickException(str(exc)) from exc
    render(result, console)
    ctx.exit(0 if result.ok else 1)

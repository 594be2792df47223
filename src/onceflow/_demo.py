"""`onceflow demo`: payments between accounts, with kill -9 and an audit.

Three things run at once:

* a producer **process** sends payments (`transfers`, keyed by payer, 4 partitions),
  re-sends about 5% of them (half as a retry with the same producer session and
  explicit sequence numbers, which the log drops; half from new producer sessions, which
  the pipeline's `dedupe` drops) and slips in a few malformed messages. On Kafka the
  producer is idempotent but takes no `sequences=`, so the same-session re-sends are
  skipped and only the new-session ones go out;
* the pipeline below runs in worker child processes (`onceflow._supervisor.Child`): one
  on the embedded store, two by default on Kafka, each a worker slot
  (`ONCEFLOW_WORKER`) sharing the partitions through the consumer group. The demo
  SIGKILLs a random worker at random moments, and at named steps of the commit protocol
  through `crash_at=`, restarting it each time. On Kafka, given a broker control, it
  also SIGKILLs the broker once and starts it again;
* this process shows progress and, once everything is processed, audits the committed
  data (`run_audit`) and prints a table. The exit status is 1 if any check fails. On
  Kafka a read_committed consumer also watches the outcomes while the run goes on.

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
import concurrent.futures
import contextlib
import json
import math
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any, Literal, NamedTuple, Protocol

import click
import msgspec

from ._app import App
from ._consumer import Consumer
from ._crash import CRASH_POINTS
from ._errors import ConfigError, OnceflowError, StoreError
from ._kafka_common import KafkaURL, is_kafka, kafka_module
from ._producer import Producer
from ._records import Record
from ._state import State
from ._supervisor import Child

if TYPE_CHECKING:
    from rich.console import Console

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
# On Kafka: fewer payments by default (a transaction per epoch and per worker, over the
# network, is slower than one SQLite file), and two worker processes.
KAFKA_PAYMENTS = 20_000
KAFKA_RATE = 1_000
KAFKA_WORKERS = 2
# How long the broker stays dead before it is started again, and how long after it is
# back a worker that exits with an error still counts as a casualty of the outage (its
# client calls wait up to 30 s for the broker before they give up).
BROKER_DOWN_S = 1.0
OUTAGE_GRACE_S = 45.0


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


def make_app(store: str | None = None) -> App:
    """The two-stage payments App; `store=None` takes ONCEFLOW_STORE or the default."""
    app = App(APP_NAME, store=store, partitions=PARTITIONS)
    decided = (
        app.source(TRANSFERS, schema=Transfer, partitions=PARTITIONS)
        .dedupe(name="payment-ids", key=lambda t: t.id, ttl=DEDUP_TTL_S)
        .process(name="debits", fn=debit)
    )
    decided.filter(lambda v: type(v) is Outcome).to(OUTCOMES)
    decided.filter(lambda v: type(v) is Entry).to(LEDGER)
    # A stateful step may not follow key_by in one stage, so the credits are re-keyed by
    # payee and go through a topic: stage 2 then finds each payee on one partition.
    decided.filter(lambda v: type(v) is Credit).key_by(lambda c: c.payee).to(CREDITS)
    app.source(CREDITS, schema=Credit).process(name="credits", fn=credit).to(LEDGER)
    return app


app = make_app()


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
) -> dict[str, int]:
    """Send the demo's traffic; report progress to `out` as JSON lines; return the
    manifest, which is also sent to the manifest topic as the last record.

    On Kafka there are no same-session re-sends: its producer takes no `sequences=`
    (a retry within a session is the idempotent producer's own business), so the
    payments picked for them are sent once; the new-session re-sends are the same.
    """
    rng = random.Random(seed)
    hi = max_amount(payments, accounts)
    picks = rng.sample(range(payments), min(payments, payments * 50 // 1000))
    n_same = payments * RESEND_SAME_PERMILLE // 1000
    resend_same = set() if is_kafka(store) else set(picks[:n_same])
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
            if items and not resend_same:
                p.send_batch(TRANSFERS, items)
            elif items:
                last = {part: p.last_sequence(TRANSFERS, part) for part in range(PARTITIONS)}
                results = p.send_batch(TRANSFERS, items)
                # Sequence numbers are consecutive per partition, so each item's number
                # follows from where it landed; a retry must reuse exactly that number.
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
                    again = p.send_batch(
                        TRANSFERS, [it for it, _ in retry], sequences=[s for _, s in retry]
                    )
                    counts["resent_same_session"] += len(retry)
                    counts["dropped_by_log"] += sum(1 for r in again if r.duplicate)
            counts["sent"] += max(0, hi_i - lo)
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


def _index(pid: str) -> int:
    return int(pid[4:]) if pid.startswith("pay-") else -1


def producer_main(argv: list[str]) -> int:
    """Entry of the producer process: one JSON argument with `produce`'s arguments."""
    args = json.loads(argv[0])
    produce(
        args["store"],
        payments=args["payments"],
        accounts=args["accounts"],
        seed=args["seed"],
        rate=args["rate"],
        out=sys.stdout,
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
    """Every committed record of `topic`; each partition's records in offset order.

    On Kafka through a read_committed consumer: records of aborted or still open
    transactions are never returned."""
    # A fresh group per read: the audit never commits, so it leaves no trace and always
    # starts from the beginning.
    group = f"onceflow-demo-audit-{uuid.uuid4().hex[:12]}"
    with Consumer(store, group=group, topics=[topic]) as c:
        if is_kafka(store):
            # A group consumer has no partitions until the group assigns them, so an
            # empty poll proves nothing; iterating waits for the assignment and stops
            # at the end of every partition.
            yield from c
            return
        while batch := c.poll(max_records=50_000):
            yield from batch


def changelog_topic(source: str) -> str:
    """Kafka: the compacted topic holding the state and dedup ids of a source's steps."""
    return f"{APP_NAME}.{source}.changelog"


def _read_only(store: str) -> sqlite3.Connection:
    conn = sqlite3.connect(store, timeout=60.0, isolation_level=None)
    conn.execute("PRAGMA query_only=ON")
    return conn


def _reader(store: str) -> Callable[[str], Iterable[Record]]:
    """How the audit reads a topic. The embedded log streams each topic when asked. On
    Kafka every topic the audit needs is read at once, each by its own consumer in a
    thread: most of a read is the fresh group joining, so in turn they would take
    several times as long. (It holds them in memory: fine at the demo's sizes.)"""
    if not is_kafka(store):
        return lambda topic: read_topic(store, topic)
    topics = [MANIFEST, TRANSFERS, OUTCOMES, LEDGER, DEAD_LETTERS]
    topics += [changelog_topic(s) for s in (TRANSFERS, CREDITS)]
    with concurrent.futures.ThreadPoolExecutor(len(topics)) as pool:
        got = dict(zip(topics, pool.map(lambda t: list(read_topic(store, t)), topics), strict=True))
    return lambda topic: got[topic]


class _Committed(NamedTuple):
    """Committed state of the pipeline: dedup ids of `payment-ids`, and per step,
    account -> values (one per partition holding the account)."""

    dedup_ids: int
    debits: dict[str, list[int]]
    credits: dict[str, list[int]]
    where: str


def _state_table(conn: sqlite3.Connection, step: str) -> dict[str, list[int]]:
    out: dict[str, list[int]] = collections.defaultdict(list)
    for key, value in conn.execute(
        "SELECT key, value FROM state WHERE app=? AND step=?", (APP_NAME, step)
    ):
        out[key].append(msgspec.msgpack.decode(value))
    return out


def _sqlite_state(path: str) -> _Committed:
    with contextlib.closing(_read_only(path)) as conn:
        (dedup_ids,) = conn.execute(
            "SELECT COUNT(*) FROM dedup WHERE app=? AND step=?", (APP_NAME, "payment-ids")
        ).fetchone()
        return _Committed(
            int(dedup_ids),
            _state_table(conn, "debits"),
            _state_table(conn, "credits"),
            "the state and dedup tables",
        )


def _kafka_state(read: Callable[[str], Iterable[Record]]) -> _Committed:
    """The fold of the changelog topics, read_committed: the latest value of each key of
    each partition wins, an empty value (a tombstone) deletes. Keys are
    `s<NUL>step<NUL>account` (state, msgpack values) and `d<NUL>step<NUL>id` (dedup ids)."""
    latest: dict[tuple[str, int, str], bytes] = {}
    for source in (TRANSFERS, CREDITS):
        topic = changelog_topic(source)
        for rec in read(topic):
            latest[(topic, rec.partition, rec.key or "")] = rec.value
    steps: dict[str, dict[str, list[int]]] = {
        "debits": collections.defaultdict(list),
        "credits": collections.defaultdict(list),
    }
    dedup_ids = 0
    for (_, _, key), value in latest.items():
        if not value:
            continue
        kind, _, rest = key.partition("\x00")
        step, _, name = rest.partition("\x00")
        if kind == "d" and step == "payment-ids":
            dedup_ids += 1
        elif kind == "s" and step in steps:
            steps[step][name].append(msgspec.msgpack.decode(value))
    topics = " and ".join(changelog_topic(s) for s in (TRANSFERS, CREDITS))
    return _Committed(dedup_ids, steps["debits"], steps["credits"], f"the changelogs {topics}")


def _sample(items: Iterable[object], n: int = 3) -> str:
    got = []
    for x in items:
        got.append(str(x))
        if len(got) == n:
            break
    return ", ".join(got)


def audit_payments(store: str | os.PathLike[str]) -> list[Check]:
    """Audit a payments store from committed data only: (check name, ok, detail).

    `store` is the SQLite file or, on Kafka, the run's `kafka://` URL with its
    namespace.

    >>> bad = [c for c in audit_payments("demo-data/payments.db") if not c.ok]  # doctest: +SKIP
    """
    return run_audit(store).checks


def run_audit(store: str | os.PathLike[str], live: LiveReport | None = None) -> Audit:
    """`audit_payments`, plus the figures (accepted, rejected, ...) it counted.

    Each topic is read once, as a stream. Order matters only per key, and every key
    (payer, payee, account) lives on one partition, which the consumer reads in order.
    On Kafka, `live` is what a read_committed consumer saw of the outcomes while the
    run went on; it is checked against the final log. Kafka also adds the check that no
    transaction was left open.
    """
    path = os.fspath(store)
    kafka = is_kafka(path)
    if not kafka and not os.path.exists(path):
        return Audit([Check("store exists", False, f"no store at {path}")], {})
    read = _reader(path)
    checks: list[Check] = []
    figures: dict[str, int] = {}

    def check(name: str, ok: bool, detail: str, *problems: tuple[str, list[Any]]) -> None:
        for what, items in problems:
            if items:
                detail += f"; {what}: {len(items):,} ({_sample(items)})"
        checks.append(Check(name, ok and not any(items for _, items in problems), detail))

    # What the producer acknowledged. Without it the audit can still check the pipeline
    # against the log, but not that the log holds everything that was sent.
    manifests = [json.loads(r.value) for r in read(MANIFEST)]
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
    for rec in read(TRANSFERS):
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
        if kafka:
            # No sequences= on Kafka. What is left to check is the idempotent producer:
            # its own retries (through the broker restart, say) must not show up twice.
            check(
                "the log holds each send once (idempotent producer)",
                same == dropped == 0 and valid == n + new,
                f"no same-session re-sends on Kafka (no sequences=); the log holds "
                f"{valid:,} payments, expected {n:,} + {new:,} new-session re-sends",
            )
        else:
            check(
                "same-session re-sends dropped by the log",
                same == dropped and valid == n + new,
                f"{same:,} re-sent with their sequence numbers, {dropped:,} dropped; the "
                f"log holds {valid:,} payments, expected {n:,} + {new:,} new-session "
                "re-sends",
            )

    per_id: collections.Counter[str] = collections.Counter()
    wrong: list[str] = []
    accepted: set[str] = set()
    # Where each outcome is in the log, to check what the live reader saw against it.
    at: dict[tuple[int, int], str] = {}
    for rec in read(OUTCOMES):
        o = _outcome.decode(rec.value)
        per_id[o.id] += 1
        if live is not None:
            at[(rec.partition, rec.offset)] = o.id
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

    if live is not None:
        unknown = [
            f"{pid}@{p}:{o}" for pid, (p, o) in live.first_seen.items() if at.get((p, o)) != pid
        ]
        check(
            "a read_committed reader during the run saw each outcome once, all committed",
            not live.error,
            f"{len(live.first_seen):,} outcome ids read while the run went on"
            + (
                f" ({live.redelivered:,} records read again after rebalances)"
                if live.redelivered
                else ""
            )
            + f", each where the final log has it{'; ' + live.error if live.error else ''}",
            ("an id in two records", live.duplicates),
            ("not in the final log at that offset", unknown),
        )
        figures.update(live_ids=len(live.first_seen), live_duplicates=len(live.duplicates))

    committed = _kafka_state(read) if kafka else _sqlite_state(path)
    dedup_ids = committed.dedup_ids
    debits_state, credits_state = committed.debits, committed.credits
    dropped_by_dedupe = valid - n_out
    figures.update(dropped_by_dedupe=dropped_by_dedupe, dedup_ids=dedup_ids)
    want_new = manifest.get("resent_new_session", valid - distinct)
    check(
        "new-session re-sends dropped by dedupe",
        dropped_by_dedupe == valid - distinct == want_new and dedup_ids == distinct,
        f"{valid - distinct:,} duplicate payments in the log, {dropped_by_dedupe:,} "
        f"dropped; dedupe remembers {dedup_ids:,} ids for {distinct:,} payments "
        f"(read from {committed.where})",
    )

    # Ledger: count entries per payment and fold each account's sides in log order,
    # checking every running total on the way.
    sides: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    folded: dict[tuple[str, str], int] = {}
    misfiled: list[str] = []
    broken: list[str] = []
    negative: list[str] = []
    for rec in read(LEDGER):
        e = _entry.decode(rec.value)
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
    for rec in read(DEAD_LETTERS):
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
    if kafka:
        from ._kafka_status import open_transactions

        try:
            hanging = open_transactions(path)
            problem = ""
        except Exception as exc:  # a broker that does not answer fails the check
            hanging, problem = [], f"cannot list the open transactions: {exc}"
        check(
            "no transaction left open",
            not problem,
            problem or "every partition's last stable offset is its end offset",
            (
                "open",
                [
                    f"{t.topic}[{t.partition}] {t.end_offset - t.stable_offset} records"
                    for t in hanging
                ],
            ),
        )
    figures.update({f"sent_{k}": v for k, v in manifest.items() if isinstance(v, int)})
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


def plan_kills(kills: int, rng: random.Random) -> list[Kill]:
    """SIGKILLs at random moments, and every third kill a crash point of the protocol.

    The first kill is the crash inside the open transaction of the first commit: the
    first incarnation always has work, so that point is sure to be reached. A later
    crash point is armed after a random SIGKILL; if nothing is left to commit by then,
    a SIGKILL stands in for it.
    """
    if kills <= 0:
        return []
    n_crash = max(1, kills // 3)
    crash_idx = [0] + [3 * j - 1 for j in range(1, n_crash) if 3 * j - 1 < kills]
    # sink_flush is never reached: the demo has no idempotent sink.
    points = [p for p in CRASH_POINTS if p != "sink_flush"]
    preferred = [p for p in ("in_transaction", "after_commit", "before_commit") if p in points]
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


class BrokerControl(Protocol):
    """What the demo needs to crash a Kafka broker and bring it back: `kill()` ends it
    hard (SIGKILL), `restart()` returns once it serves clients again.
    `infra.kafka_broker.KafkaBroker` is one; `ShellBroker` makes one of two commands."""

    def kill(self) -> object: ...

    def restart(self) -> object: ...


class ShellBroker:
    """A broker control made of two shell commands (`--broker-kill`, `--broker-start`).

    `restart()` runs the start command, then waits until the broker answers a metadata
    request: a start command may well return before the broker is up, or start it in
    the background.
    """

    def __init__(self, kill_cmd: str, start_cmd: str, store: str, timeout: float = 120.0):
        self.kill_cmd = kill_cmd
        self.start_cmd = start_cmd
        self.bootstrap = KafkaURL.parse(store).bootstrap
        self.timeout = timeout

    def kill(self) -> None:
        self._run(self.kill_cmd, "--broker-kill")

    def restart(self) -> None:
        self._run(self.start_cmd, "--broker-start")
        ck = kafka_module()
        admin = ck.admin.AdminClient(_quiet(self.bootstrap))
        deadline = time.monotonic() + self.timeout
        while True:
            with contextlib.suppress(ck.KafkaException):
                if admin.list_topics(timeout=2.0).brokers:
                    return
            if time.monotonic() > deadline:
                raise StoreError(
                    f"the broker at {self.bootstrap} did not answer within {self.timeout:.0f}s "
                    f"of --broker-start {self.start_cmd!r}"
                )
            time.sleep(0.2)

    def _run(self, cmd: str, flag: str) -> None:
        # Output to a file, not a pipe: a command that leaves a broker running in the
        # background keeps the pipe open, and reading it to the end would never return.
        # Its own session, so that a Ctrl-C of the demo does not reach that broker.
        with tempfile.TemporaryFile() as out:
            rc = subprocess.call(
                cmd,
                shell=True,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                timeout=self.timeout,
            )
            if rc != 0:
                out.seek(0)
                text = out.read().decode(errors="replace").strip()[-2000:]
                raise ConfigError(f"{flag} command {cmd!r} failed (exit {rc}): {text}")


def _quiet(bootstrap: str) -> dict[str, Any]:
    """Client settings for the demo's own probes: the broker being down is expected (it
    is killed on purpose), so librdkafka's connection errors are not printed."""
    return {"bootstrap.servers": bootstrap, "log_level": 0, "error_cb": lambda err: None}


class _SQLiteProbe:
    """Reads progress from the store: end offsets and the App's committed offsets."""

    def __init__(self, store: str) -> None:
        self.conn = _read_only(store)

    def progress(self, producer_done: bool) -> tuple[int, bool]:
        """(transfers committed, whether both sources are fully committed)."""
        ends, done = self.offsets()
        # Both sources fully committed on one snapshot: a stage-1 commit writes credits
        # and moves the transfers offsets atomically, so nothing is left in flight.
        drained = ends.get(TRANSFERS, 0) > 0 and all(
            done.get(t, 0) == ends.get(t, 0) for t in (TRANSFERS, CREDITS)
        )
        return done.get(TRANSFERS, 0), drained

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

    def is_up(self, slot: _Slot) -> bool:
        """Whether the slot's process runs the App: it took the leases, so it has
        recovered and installed its SIGTERM handler, which App.run() does before."""
        assert slot.child is not None
        row = self.conn.execute(
            "SELECT 1 FROM leases WHERE app=? AND owner LIKE ? LIMIT 1",
            (APP_NAME, f"%:{slot.child.proc.pid}:%"),
        ).fetchone()
        return row is not None

    def close(self) -> None:
        self.conn.close()


class _KafkaProbe:
    """Reads progress from the broker: end offsets of `transfers` against the App's
    committed group offsets, the group's members, and whether stage 2 has consumed
    every committed credit. Calls fail while the broker is down; the last answer
    stands until it is back."""

    def __init__(self, store: str) -> None:
        self.ck = kafka_module()
        self.url = KafkaURL.parse(store)
        self.group = self.url.topic(APP_NAME)
        self.quiet = _quiet(self.url.bootstrap)
        self.admin = self.ck.admin.AdminClient(self.quiet)
        # The App's group id, to read its committed offsets; it never subscribes, so it
        # never joins the group.
        self.consumer = self.ck.Consumer(
            {**self.quiet, "group.id": self.group, "enable.auto.commit": False}
        )
        self._parts: dict[str, int] = {}
        self._last = (0, False)
        self._next = 0.0
        self._members: dict[str, tuple[str, int]] = {}
        self._members_next = 0.0

    def instance(self, slot: int) -> str:
        """The static group member id of a worker slot (as `_kafka.KafkaSession` sets it)."""
        return self.url.topic(f"onceflow-{APP_NAME}-{slot}")

    def _tps(self, topic: str) -> list[Any]:
        n = self._parts.get(topic)
        if n is None:
            name = self.url.topic(topic)
            md = self.consumer.list_topics(name, timeout=2.0).topics.get(name)
            if md is None or md.error is not None or not md.partitions:
                return []
            n = self._parts[topic] = len(md.partitions)
        return [self.ck.TopicPartition(self.url.topic(topic), p) for p in range(n)]

    def progress(self, producer_done: bool) -> tuple[int, bool]:
        """(transfers committed, whether both sources are fully committed)."""
        now = time.monotonic()
        if now < self._next:
            return self._last
        self._next = now + 0.25
        try:
            tps = self._tps(TRANSFERS)
            if not tps:
                return self._last
            committed = self.consumer.committed(tps, timeout=2.0)
            done = sum(max(tp.offset, 0) for tp in committed)
            # The producer is not transactional: no markers, so the end is the count.
            end = sum(
                self.consumer.get_watermark_offsets(tp, timeout=2.0, cached=False)[1] for tp in tps
            )
            drained = end > 0 and done == end
            if drained and producer_done:
                # Every credit is committed once the transfers are (stage 1 commits both
                # in one transaction); has stage 2 consumed them all?
                drained = self._credits_consumed()
            self._last = (done, drained)
        except self.ck.KafkaException:
            pass
        return self._last

    def _credits_consumed(self) -> bool:
        """No committed record at or past stage 2's committed offsets. The end offset
        cannot tell: it counts transaction markers and aborted records too."""
        tps = self._tps(CREDITS)
        if not tps:
            return False
        start = [
            self.ck.TopicPartition(tp.topic, tp.partition, tp.offset)
            if tp.offset >= 0
            else self.ck.TopicPartition(tp.topic, tp.partition, self.ck.OFFSET_BEGINNING)
            for tp in self.consumer.committed(tps, timeout=2.0)
        ]
        c = self.ck.Consumer(
            {
                **self.quiet,
                "group.id": f"onceflow-demo-probe-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "enable.partition.eof": True,
            }
        )
        try:
            c.assign(start)
            at_end: set[int] = set()
            deadline = time.monotonic() + 5.0
            while len(at_end) < len(start) and time.monotonic() < deadline:
                for m in c.consume(1000, 0.2):
                    err = m.error()
                    if err is None:
                        return False
                    if err.code() == self.ck.KafkaError._PARTITION_EOF:
                        at_end.add(m.partition())
            return len(at_end) == len(start)
        finally:
            c.close()

    def members(self, fresh: bool = False) -> dict[str, tuple[str, int]]:
        """Static member id -> (member id, partitions held) of the App's group."""
        now = time.monotonic()
        if not fresh and now < self._members_next:
            return self._members
        self._members_next = now + 0.3
        try:
            fut = self.admin.describe_consumer_groups([self.group], request_timeout=2.0)
            desc = fut[self.group].result()
        except Exception:  # the broker is down, or the group does not exist yet
            return self._members
        self._members = {
            m.group_instance_id: (m.member_id, len(m.assignment.topic_partitions))
            for m in desc.members
            if m.group_instance_id
        }
        return self._members

    def is_up(self, slot: _Slot) -> bool:
        """Whether the slot's new incarnation joined the group and holds partitions: it
        has then recovered, and runs the App (whose SIGTERM handler is installed). A
        SIGKILLed member stays in the group until its session times out, so a member
        id that was there before the incarnation started does not count."""
        seen = self.members().get(self.instance(slot.index))
        if seen is None or seen[0] == slot.member_before or seen[1] == 0:
            return False
        slot.member = seen[0]
        return True

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.consumer.close()


@dataclass
class LiveReport:
    """What a read_committed consumer saw of the outcomes while the run went on: where
    it first read each payment id, ids it read in a second record, and how many records
    it read again at the same partition and offset (after a rebalance it starts over
    from its last commit: a re-read, not a duplicate in the log)."""

    first_seen: dict[str, tuple[int, int]] = field(default_factory=dict)
    duplicates: list[str] = field(default_factory=list)
    redelivered: int = 0
    error: str = ""


class _LiveReader:
    """A thread reading `outcomes` read_committed, with its own group, during the run.

    Asked to stop, it goes on until it has seen `expected` ids, or nothing new came for
    a few seconds.
    """

    def __init__(self, store: str, expected: int) -> None:
        self.store = store
        self.expected = expected
        self.report = LiveReport()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-live-reader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> LiveReport:
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.report.error = self.report.error or f"the live reader did not stop in {timeout}s"
        return self.report

    def _run(self) -> None:
        group = f"onceflow-demo-live-{uuid.uuid4().hex[:12]}"
        try:
            with Consumer(self.store, group=group, topics=[OUTCOMES]) as c:
                last_read = last_commit = time.monotonic()
                while True:
                    batch = c.poll(max_records=5_000, timeout=0.2)
                    now = time.monotonic()
                    if batch:
                        last_read = now
                        self._take(batch)
                    if now - last_commit > 2.0:
                        # Fewer re-reads after a rebalance; a failure (broker down) is
                        # only more re-reading.
                        with contextlib.suppress(Exception):
                            c.commit()
                        last_commit = now
                    if self._stop.is_set() and (
                        len(self.report.first_seen) >= self.expected or now - last_read > 3.0
                    ):
                        return
        except Exception as exc:
            self.report.error = f"the live reader failed: {type(exc).__name__}: {exc}"

    def _take(self, batch: list[Record]) -> None:
        r = self.report
        for rec in batch:
            where = (rec.partition, rec.offset)
            try:
                pid = _outcome.decode(rec.value).id
            except msgspec.DecodeError:
                pid = f"undecodable outcome at {where}"
            seen = r.first_seen.get(pid)
            if seen is None:
                r.first_seen[pid] = where
            elif seen == where:
                r.redelivered += 1
            else:
                r.duplicates.append(f"{pid} at {seen} and {where}")


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
    failed (a process exited unexpectedly), in which case nothing was audited.

    `store` is the SQLite file, or on Kafka the URL with the run's own namespace.
    `broker_outages` holds how long each broker kill+restart took, in seconds, and
    `outage_restarts` how many worker exits during those outages were restarted."""

    audit: Audit
    kills: list[Kill]
    seconds: float
    store: str
    sent: dict[str, int] = field(default_factory=dict)
    error: str = ""
    workers: int = 1
    broker_outages: list[float] = field(default_factory=list)
    outage_restarts: int = 0
    broker_control: bool = False

    @property
    def ok(self) -> bool:
        return not self.error and self.audit.ok

    @property
    def kafka(self) -> bool:
        return is_kafka(self.store)


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


def run_namespace(store: str, seed: int) -> str:
    """A fresh namespace for one run under the store's own: the demo never reads or
    wipes topics it did not create, and two runs never see each other's data."""
    url = KafkaURL.parse(store)
    run = f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{seed}-{uuid.uuid4().hex[:4]}"
    return f"kafka://{url.bootstrap}/{url.namespace + '.' if url.namespace else ''}{run}"


def run_demo(
    *,
    payments: int | None = None,
    accounts: int = 1_000,
    kills: int = 6,
    seed: int | None = None,
    directory: str | os.PathLike[str] = "demo-data",
    rate: float | None = None,
    console: Console | None = None,
    timeout: float = 600.0,
    store: str | None = None,
    workers: int | None = None,
    broker: BrokerControl | None = None,
) -> DemoResult:
    """Run the demo end to end and audit it; `console=None` runs silently.

    `store=None` runs on DIR/payments.db; `store="kafka://HOST:PORT[/NS]"` runs on Kafka
    in a fresh namespace under NS, with `workers` worker processes (default 2) and, given
    a `broker` control, one broker SIGKILL and restart during the run. Defaults on
    Kafka: 20,000 payments at 1,000 per second.

    >>> result = run_demo(payments=3_000, kills=3, directory="/tmp/demo")  # doctest: +SKIP
    >>> result.ok                                                            # doctest: +SKIP
    True
    """
    kafka = store is not None and is_kafka(store)
    payments = payments if payments is not None else KAFKA_PAYMENTS if kafka else 200_000
    rate = rate if rate is not None else KAFKA_RATE if kafka else DEFAULT_RATE
    workers = workers if workers is not None else KAFKA_WORKERS if kafka else 1
    if not kafka and (workers != 1 or broker is not None):
        raise ConfigError(
            "the embedded store runs one worker process and has no broker; --workers and "
            "a broker control need --store kafka://HOST:PORT"
        )
    if not 1 <= workers <= PARTITIONS:
        raise ConfigError(
            f"workers must be 1 to {PARTITIONS} (the topics have {PARTITIONS} partitions)"
        )
    if seed is None:
        seed = random.randrange(1_000_000)
    t0 = time.monotonic()
    path = prepare_dir(Path(directory))
    state_dir = os.path.join(os.fspath(directory), "state")
    if store is not None and kafka:
        target = run_namespace(store, seed)
        (Path(directory) / "store.txt").write_text(target + "\n")
        if console is not None:
            console.print(f"[dim]this run's namespace: {target}[/]")
    else:
        target = path
        # Creates the schema before the probe reads it, whichever process starts first.
        Producer(target).close()
    plan = plan_kills(kills, random.Random(seed ^ 0x5EED))
    broker_at = random.Random(seed ^ 0xB0CE).uniform(0.3, 0.6) if broker is not None else None
    run = _Supervisor(
        target,
        plan,
        payments,
        random.Random(seed ^ 0xC0FFEE),
        console,
        workers=workers,
        state_dir=state_dir,
        broker=broker,
        broker_at=broker_at,
    )
    args = {"store": target, "payments": payments, "accounts": accounts, "seed": seed, "rate": rate}
    live: LiveReport | None = None
    try:
        run.start_producer(args)
        with run.progress:
            run.start_workers()
            while run.step():
                if time.monotonic() - t0 > timeout:
                    run.error = f"the demo did not finish within {timeout:.0f}s"
                    break
                time.sleep(0.02)
            run.refresh(False)
        if run.live is not None:
            live = run.live.stop()
    finally:
        run.close()

    def result(audit: Audit, error: str = "") -> DemoResult:
        return DemoResult(
            audit,
            plan,
            time.monotonic() - t0,
            target,
            run.sent_counts(),
            error,
            workers,
            run.broker_outages,
            run.outage_restarts,
            broker is not None,
        )

    if run.error:
        return result(Audit([], {}), run.error)
    run.say("auditing the committed data ...")
    if kafka and live is None:
        live = LiveReport(error="the live reader never started")
    return result(run_audit(target, live))


@contextlib.contextmanager
def _stderr_to(path: str) -> Iterator[None]:
    """Point this process's file descriptor 2 at a file for a while: C libraries write
    there directly, past `sys.stderr`."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as f:
            os.dup2(f.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


@dataclass
class _Slot:
    """One worker slot: its current incarnation, and on Kafka its group membership."""

    index: int
    child: Child | None = None
    armed: Kill | None = None
    up: bool = False
    member: str | None = None
    member_before: str | None = None


class _Supervisor:
    """Runs the producer and the worker processes, and carries out the kill plan.

    The loop calls `step()` every 20 ms; each call reads progress from the store and
    takes at most one action: restart a worker that died, kill one and restart it, kill
    and restart the broker, or stop the workers once everything sent is committed.
    """

    def __init__(
        self,
        store: str,
        plan: list[Kill],
        payments: int,
        rng: random.Random,
        console: Console | None,
        *,
        workers: int = 1,
        state_dir: str = "",
        broker: BrokerControl | None = None,
        broker_at: float | None = None,
    ) -> None:
        self.store = store
        self.kafka = is_kafka(store)
        self.plan = plan
        self.payments = payments
        self.rng = rng
        self.console = console
        self.error = ""
        self.progress = _Progress(console, payments, len(plan))
        self.probe: _SQLiteProbe | _KafkaProbe = (
            _KafkaProbe(store) if self.kafka else _SQLiteProbe(store)
        )
        self.slots = [_Slot(i) for i in range(workers)]
        self.state_dir = state_dir
        self.broker = broker
        self.broker_at = broker_at
        self.broker_outages: list[float] = []
        # Until then, a worker that exits with an error is a casualty of the broker's
        # outage and is restarted; after it, such an exit fails the run.
        self.outage_until = 0.0
        self.outage_restarts = 0
        self.live: _LiveReader | None = None
        self._lock = threading.Lock()
        self._sent: dict[str, int] = {}
        self._planned: dict[str, int] = {}
        self.producer: subprocess.Popen[bytes] | None = None
        self._producer_out = _Tail(None)
        self._producer_err = _Tail(None)
        self._kill_due: float | None = None
        self._moved_from = 0
        self.processed = 0

    def say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text)

    def _who(self, slot: _Slot) -> str:
        return f"worker {slot.index} " if len(self.slots) > 1 else ""

    # -- the processes ------------------------------------------------------------------

    def start_producer(self, args: dict[str, Any]) -> None:
        code = (
            "import sys; from onceflow._demo import producer_main; "
            "sys.exit(producer_main(sys.argv[1:]))"
        )
        self.producer = subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._producer_out = _Tail(self.producer.stdout, self._on_producer_line)
        self._producer_err = _Tail(self.producer.stderr)

    def _on_producer_line(self, line: str) -> None:
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

    def start_workers(self) -> None:
        """The first incarnation of every slot; one of them armed with the first crash
        point when the plan starts with one."""
        pending = self._pending()
        armed = -1
        if pending is not None and pending.how == "crash_at":
            armed = self.rng.randrange(len(self.slots))
        for slot in self.slots:
            self._start(slot, arm=slot.index == armed)

    def _start(self, slot: _Slot, *, arm: bool) -> None:
        """A new incarnation of a slot, armed with a crash point if `arm` and the next
        kill is one."""
        pending = self._pending()
        slot.armed = pending if arm and pending is not None and pending.how == "crash_at" else None
        crash_at = f"{slot.armed.point}:{slot.armed.nth}" if slot.armed is not None else None
        env = None
        if isinstance(self.probe, _KafkaProbe):
            env = {"ONCEFLOW_WORKER": str(slot.index), "ONCEFLOW_STATE_DIR": self.state_dir}
            seen = self.probe.members(fresh=True).get(self.probe.instance(slot.index))
            slot.member_before = seen[0] if seen is not None else slot.member
        slot.child = Child(CHILD_TARGET, store=self.store, crash_at=crash_at, env=env)
        slot.up = False

    def close(self) -> None:
        for slot in self.slots:
            if slot.child is not None and slot.child.alive():
                slot.child.kill()
        if self.live is not None:
            self.live.stop(timeout=5.0)
        if self.producer is not None:
            if self.producer.poll() is None:
                self.producer.kill()
            self.producer.wait()
            self._producer_out.join()
        self.probe.close()

    # -- the loop -----------------------------------------------------------------------

    def _pending(self) -> Kill | None:
        return next((k for k in self.plan if not k.done), None)

    def _killed(self, kill: Kill, how: str, note: str, slot: _Slot) -> None:
        kill.done = how
        n = sum(1 for k in self.plan if k.done)
        self.say(f"[yellow]kill {n}/{len(self.plan)}[/]: {note}; restarting")
        self._moved_from = self.processed
        nxt = self._pending()
        self._start(slot, arm=nxt is not None and nxt.how == "crash_at")

    def refresh(self, producer_done: bool) -> tuple[int, bool]:
        processed, drained = self.probe.progress(producer_done)
        self.processed = processed
        with self._lock:
            self.progress.update(self._sent.get("sent", 0), processed, self._planned)
        self.progress.kills(sum(1 for k in self.plan if k.done))
        return processed, drained

    def step(self) -> bool:
        """One look at the world and at most one action. False once finished or failed."""
        assert self.producer is not None
        producer_rc = self.producer.poll()
        processed, drained = self.refresh(producer_rc == 0)
        if producer_rc not in (None, 0):
            self._producer_err.join()
            self.error = f"the producer failed (exit {producer_rc}):\n{self._producer_err.text()}"
            return False
        finished = producer_rc == 0 and drained
        now = time.monotonic()
        if os.environ.get("DEMO_TRACE") and now - getattr(self, "_tr", 0) > 2:
            self._tr = now
            mem = self.probe.members() if isinstance(self.probe, _KafkaProbe) else {}
            print("TRACE", round(now, 1), processed, drained, producer_rc, self._pending(),
                  [(s.index, s.child.alive() if s.child else None, s.up, s.member, s.member_before, s.armed) for s in self.slots],
                  mem, file=sys.stderr, flush=True)
        for slot in self.slots:
            assert slot.child is not None
            if slot.child.alive():
                continue
            rc = slot.child.wait()
            if slot.armed is not None and rc == -signal.SIGKILL:
                kill = slot.armed
                note = (
                    f"{self._who(slot)}died at crash point [bold]{kill.point}[/] with "
                    f"{processed:,} transfers committed"
                )
                self._killed(kill, "crash_at", note, slot)
                return True
            if now < self.outage_until:
                self.outage_restarts += 1
                last = (slot.child.stderr().strip().splitlines() or ["no output"])[-1]
                self.say(
                    f"[yellow]{self._who(slot) or 'the pipeline '}exited with {rc} during the "
                    f"broker outage[/] ({last[:100]}); restarting"
                )
                self._start(slot, arm=slot.armed is not None)
                return True
            self.error = (
                f"{self._who(slot) or 'the pipeline process '}exited with {rc}:\n"
                f"{slot.child.stderr()[-4000:]}"
            )
            return False
        # Until a new incarnation has recovered (embedded: it took the leases; Kafka: it
        # holds partitions in the group), a SIGKILL would only kill a Python start-up,
        # and a SIGTERM would too: its handler is not yet in.
        for slot in self.slots:
            slot.up = slot.up or self.probe.is_up(slot)
        if self.kafka and self.live is None and any(s.up for s in self.slots):
            # The App created the topics before it joined the group.
            self.live = _LiveReader(self.store, self.payments)
            self.live.start()
        if (
            self.broker is not None
            and self.broker_at is not None
            and not self.broker_outages
            and (processed >= self.broker_at * self.payments or finished)
        ):
            return self._restart_broker(processed)
        pending = self._pending()
        if pending is not None and pending.how == "crash_at":
            # One incarnation is armed and dies by itself; unless nothing is left to
            # commit, in which case it never reaches the point and a SIGKILL stands in.
            armed = next((s for s in self.slots if s.armed is pending), None)
            if armed is None:
                # Not armed (its incarnation exited during a broker outage, say): arm one.
                victim = self.rng.choice(self.slots)
                assert victim.child is not None
                victim.child.kill()
                self._start(victim, arm=True)
            elif finished and armed.up:
                assert armed.child is not None
                armed.child.kill()
                note = f"{self._who(armed)}SIGKILL, idle before {pending.point}"
                self._killed(pending, "signal", note, armed)
            return True
        if pending is not None:
            # A kill waits until something was committed since the last one, so the run
            # moves forward however the kills fall.
            moved = processed > self._moved_from or drained
            up = [s for s in self.slots if s.up]
            if self._kill_due is None and processed >= pending.at * self.payments and moved and up:
                self._kill_due = now + self.rng.uniform(0.0, 0.2)
            if self._kill_due is not None and now >= self._kill_due and up:
                self._kill_due = None
                victim = self.rng.choice(up)
                assert victim.child is not None
                victim.child.kill()
                note = f"{self._who(victim)}SIGKILL with {processed:,} transfers committed"
                self._killed(pending, "signal", note, victim)
            return True
        if finished and all(s.up for s in self.slots):
            return self._stop_workers()
        return True

    def _restart_broker(self, processed: int) -> bool:
        """SIGKILL the broker, leave it dead for a moment, start it again (blocking:
        `KafkaBroker` must be started from the thread that outlives it, this one)."""
        assert self.broker is not None
        self.say(
            f"[yellow]broker SIGKILL[/] with {processed:,} transfers committed; restarting it "
            f"in {BROKER_DOWN_S:.0f} s"
        )
        t0 = time.monotonic()
        self.outage_until = math.inf
        try:
            # onceflow.Consumer (the live reader, in this process) has librdkafka print
            # every failed connection to stderr, 20 lines a second; they go to a file.
            with _stderr_to(self.outage_log):
                self.broker.kill()
                time.sleep(BROKER_DOWN_S)
                self.broker.restart()
        except Exception as exc:
            self.error = f"the broker could not be killed and restarted: {exc}"
            return False
        took = time.monotonic() - t0
        self.broker_outages.append(took)
        self.outage_until = time.monotonic() + OUTAGE_GRACE_S
        self.say(f"broker back after {took:.1f} s")
        return True

    @property
    def outage_log(self) -> str:
        return os.path.join(os.path.dirname(self.state_dir), "broker-outage.stderr.log")

    def _stop_workers(self) -> bool:
        """SIGTERM every worker at once (each commits and exits), then wait for each.

        One SIGTERM each: a second one could land while the interpreter shuts down,
        when Python has put back the default action, and kill it with -15."""
        for slot in self.slots:
            assert slot.child is not None
            if slot.child.alive():
                slot.child.proc.send_signal(signal.SIGTERM)
        for slot in self.slots:
            assert slot.child is not None
            try:
                rc = slot.child.wait(30.0)
            except subprocess.TimeoutExpired:
                slot.child.kill()
                rc = slot.child.wait()
            if rc != 0 and not self.error:
                self.error = (
                    f"{self._who(slot) or 'the pipeline '}did not stop cleanly (exit {rc}):\n"
                    f"{slot.child.stderr()[-4000:]}"
                )
        return False


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

    if result.kafka:
        t.add_row("store", "Kafka", result.store)
    row("payments sent (acknowledged)", "sent_payments")
    if result.kafka:
        t.add_row(
            "re-sent, same session (sequences=)",
            "-",
            "skipped: Kafka's producer takes no sequences=",
        )
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
    if result.kafka:
        t.add_row(
            "worker processes",
            f"{result.workers}",
            f"ONCEFLOW_WORKER 0-{result.workers - 1}, one consumer group",
        )
    points = ", ".join(k.point for k in at_points)
    t.add_row(
        "kills survived (SIGKILL)",
        f"{len(kills)}",
        f"{len(at_points)} inside the protocol: {points}" if at_points else "",
    )
    if result.kafka:
        if result.broker_outages:
            outages = ", ".join(f"{s:.1f} s" for s in result.broker_outages)
            note = f"kill to ready again: {outages}; {result.outage_restarts} worker exit(s) "
            note += "during the outage, restarted"
        elif result.broker_control:
            note = "not reached"
        else:
            note = "no broker control given (--broker-kill, --broker-start)"
        t.add_row("broker restarts (SIGKILL)", f"{len(result.broker_outages)}", note)
    row("payments accepted", "accepted")
    row("payments rejected (overdraft)", "rejected")
    row("ledger entries", "ledger", "one debit + one credit per accepted payment")
    row("total money", "money", f"expected {f.get('money_expected', 0):,}")
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
    default=None,
    type=click.IntRange(1),
    help="Payments to send.  [default: 200000; 20000 on Kafka]",
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
    help="Times a worker process is killed (SIGKILL or a crash point).",
)
@click.option("--seed", type=int, default=None, help="Random seed (default: random, printed).")
@click.option(
    "--dir",
    "directory",
    default="demo-data",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Working directory (the SQLite store, or the workers' state on Kafka); wiped at start.",
)
@click.option(
    "--rate",
    default=None,
    type=click.FloatRange(0),
    help="Payments per second the producer sends; 0 = as fast as it can.  "
    f"[default: {DEFAULT_RATE}; {KAFKA_RATE} on Kafka]",
)
@click.option(
    "--store",
    default=None,
    metavar="URL",
    help="kafka://HOST:PORT[/NAMESPACE] runs the demo on Kafka, in a new namespace under "
    "NAMESPACE. Without it the store is DIR/payments.db (a file path here is ignored).",
)
@click.option(
    "--workers",
    default=None,
    type=click.IntRange(1, PARTITIONS),
    help=f"Worker processes (Kafka only).  [default: {KAFKA_WORKERS} on Kafka, 1 embedded]",
)
@click.option(
    "--broker-kill",
    default=None,
    metavar="CMD",
    help="Kafka: shell command that SIGKILLs the broker. With --broker-start, the broker "
    "is killed and started again once during the run.",
)
@click.option(
    "--broker-start",
    default=None,
    metavar="CMD",
    help="Kafka: shell command that starts the broker again; the demo then waits until "
    "the broker answers.",
)
@click.pass_context
def demo_command(
    ctx: click.Context,
    payments: int | None,
    accounts: int,
    kills: int,
    seed: int | None,
    directory: str,
    rate: float | None,
    store: str | None,
    workers: int | None,
    broker_kill: str | None,
    broker_start: str | None,
) -> None:
    """Payments with kill -9: send, process, crash, restart, then audit the result.

    A producer process sends payments (with re-sends and malformed messages) while the
    pipeline runs in worker processes that are SIGKILLed at random moments and at steps
    of the commit protocol. The audit then checks, from committed data only, that every
    payment took effect exactly once and that no money appeared or vanished. Exit status
    1 if any check fails.

    On Kafka (--store kafka://...) several workers share the partitions, the broker can
    be killed and restarted during the run (--broker-kill, --broker-start), and a
    read_committed consumer watches the outcomes while the run goes on.
    """
    from rich.console import Console

    console = Console()
    if seed is None:
        seed = random.randrange(1_000_000)
    if store is None:
        # `onceflow --store kafka://... demo` means Kafka as well.
        from ._cli import CliState

        state = ctx.find_object(CliState)
        if state is not None and state.store_explicit and is_kafka(state.store):
            store = state.store
    kafka = store is not None and is_kafka(store)
    if store is not None and not kafka:
        console.print(f"[dim]--store {store} ignored: the demo uses {directory}/{STORE_FILE}[/]")
        store = None
    if (broker_kill is None) != (broker_start is None):
        raise click.UsageError("--broker-kill and --broker-start go together")
    if not kafka and (workers not in (None, 1) or broker_kill is not None):
        raise click.UsageError("--workers and --broker-kill/--broker-start need --store kafka://")
    broker: BrokerControl | None = None
    if store is not None and broker_kill is not None and broker_start is not None:
        broker = ShellBroker(broker_kill, broker_start, store)
    n = payments if payments is not None else KAFKA_PAYMENTS if kafka else 200_000
    if kafka:
        assert store is not None
        w = workers or KAFKA_WORKERS
        restart = "1 broker restart" if broker is not None else "no broker restart"
        console.print(
            f"onceflow demo: {n:,} payments between {accounts:,} accounts, {w} workers, "
            f"{kills} kills, {restart}, seed {seed}, store {store}"
        )
        if broker is None:
            console.print(
                "[dim]no --broker-kill/--broker-start: the broker is not restarted in this run[/]"
            )
    else:
        console.print(
            f"onceflow demo: {n:,} payments between {accounts:,} accounts, {kills} kills, "
            f"seed {seed}, store {os.path.join(directory, STORE_FILE)}"
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
        )
    except OnceflowError as exc:
        raise click.ClickException(str(exc)) from exc
    render(result, console)
    ctx.exit(0 if result.ok else 1)

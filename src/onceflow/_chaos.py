"""`onceflow chaos`: kill a user's pipeline again and again, then audit its effects.

The pipeline runs as a child process on a scratch store while a producer feeds it. The
child is SIGKILLed at random moments and, once each, at every named step of the commit
protocol (`ONCEFLOW_CRASH_AT`), and restarted. At the end it drains, and its committed
outputs, state and dedup ids are compared with a reference run of the same App over the
same events with no crash: every input id must have the same effects, once.

A pipeline module may define `chaos_events(n, seed)` returning `onceflow.testing.Event`s
(otherwise events are `{"id", "key", "amount"}` dicts on the App's first source), and
`chaos_audit(store_path)` returning `(check, ok, detail)` tuples for business invariants.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ._app import App
from ._crash import CRASH_POINTS
from ._loader import load_app, load_object
from ._sinks import FileSink
from ._supervisor import Child
from .testing import Event, diff, reference, send, snapshot

# How long a child started with a crash point may take to reach it before it is killed
# anyway: a point the pipeline never passes (no FileSink, say) must not stall the run.
_STEP_WAIT_S = 8.0
# How long the final, crash-free child may take to drain everything.
_DRAIN_TIMEOUT_S = 600.0


@dataclass
class ChaosResult:
    events: int
    random_kills: int = 0
    step_kills: list[str] = field(default_factory=list)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)


def default_events(app: App, n: int, seed: int) -> list[Event]:
    """Generic events for the App's first external source, with ~5% re-sent ids."""
    outputs = {s.options["topic"] for s in app._steps if s.kind == "to"}
    topics = [s.options["topic"] for s in app._sources if s.options["topic"] not in outputs]
    if not topics:
        raise click.UsageError("the App has no external source topic to feed")
    rng = random.Random(seed)
    out: list[Event] = []
    for i in range(n):
        key = f"k{rng.randrange(50)}"
        ev = Event(
            topics[0],
            {"id": f"ev-{i}", "key": key, "amount": rng.randint(1, 100)},
            key=key,
            id=f"ev-{i}",
        )
        out.append(ev)
        if rng.random() < 0.05:
            # A client retry from a new session: same business id, new producer.
            out.append(Event(ev.topic, ev.value, key=ev.key, id=ev.id, producer="retry"))
    return out


def run_chaos(
    target: str,
    *,
    events: int,
    kills: int,
    seed: int,
    workdir: str,
    progress: Callable[[str], None] = lambda msg: None,
) -> ChaosResult:
    t0 = time.monotonic()
    app = load_app(target)
    module = target.partition(":")[0]
    rng = random.Random(seed)
    make_events = _optional(module, "chaos_events")
    evs: list[Event] = (
        list(make_events(events, seed)) if make_events else default_events(app, events, seed)
    )
    result = ChaosResult(events=len(evs))
    os.makedirs(workdir, exist_ok=True)
    crashed_store = os.path.join(workdir, "chaos.db")
    ref_store = os.path.join(workdir, "reference.db")
    for path in (crashed_store, ref_store):
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)

    has_file_sink = any(isinstance(s.fn, FileSink) for s in app._steps if s.kind == "sink")
    points = [p for p in CRASH_POINTS if p != "sink_flush" or has_file_sink]
    plan: list[str | None] = [*points, *([None] * kills)]
    rng.shuffle(plan)

    # The producer runs beside the kills, as in production: sends land while the
    # pipeline is dying and restarting. It sends one chunk as each incarnation starts,
    # so that every incarnation has fresh input to die in the middle of.
    go = threading.Semaphore(0)
    errors: list[BaseException] = []
    chunk = max(1, -(-len(evs) // (len(plan) + 1)))

    def produce() -> None:
        try:
            step = max(1, chunk // 10)
            for i in range(0, len(evs), chunk):
                go.acquire()
                # Trickled, so that one incarnation polls several times.
                for j in range(i, min(i + chunk, len(evs)), step):
                    send(crashed_store, evs[j : min(j + step, i + chunk)])
                    time.sleep(0.03)
        except BaseException as exc:
            errors.append(exc)

    producer = threading.Thread(target=produce, name="chaos-producer", daemon=True)
    producer.start()

    for point in plan:
        go.release()
        if point is None:
            child = Child(target, store=crashed_store)
            time.sleep(rng.uniform(0.2, 1.2))
            child.kill()
            result.random_kills += 1
            progress(f"random kill {result.random_kills}/{kills}")
        else:
            child = Child(target, store=crashed_store, crash_at=f"{point}:{rng.randint(1, 2)}")
            try:
                child.wait(_STEP_WAIT_S)
            except Exception:
                # It never reached the point: kill it anyway, as a random kill.
                child.kill()
                result.random_kills += 1
                progress(f"{point} not reached; killed at random")
                continue
            if child.killed:
                result.step_kills.append(point)
                progress(f"killed at {point}")
            else:
                _check_exit(child, result)
    for _ in range(len(plan) + 2):
        go.release()
    producer.join()
    if errors:
        result.checks.append(("producer sent every event", False, repr(errors[0])))
        return result
    progress("draining")
    final = Child(target, store=crashed_store, until_idle=True)
    try:
        code = final.wait(_DRAIN_TIMEOUT_S)
    except Exception:
        final.kill()
        code = -1
    result.checks.append(
        ("pipeline drained after the last restart", code == 0, final.stderr()[-500:])
    )
    progress("reference run")
    expected = reference(load_app(target), evs, store=ref_store)
    actual = snapshot(app, crashed_store)
    ordered = len(app._sources) == 1
    problems = diff(actual, expected, ordered=ordered)
    n_out = sum(len(v) for v in actual.outputs.values())
    result.checks.append(
        (
            "committed outputs equal the reference fold (none lost, none doubled)",
            not any(p.startswith("topic") for p in problems),
            "; ".join(p for p in problems if p.startswith("topic"))[:500] or f"{n_out} outputs",
        )
    )
    result.checks.append(
        (
            "state equals the fold of the committed inputs",
            not any(p.startswith("state") for p in problems),
            "; ".join(p for p in problems if p.startswith("state"))[:500]
            or f"{len(actual.state)} keys",
        )
    )
    result.checks.append(
        (
            "dedup ids equal the reference",
            not any(p.startswith("dedup") for p in problems),
            "; ".join(p for p in problems if p.startswith("dedup"))
            or f"{len(actual.dedup_ids)} ids",
        )
    )
    for topic in sorted({t for t, _ in actual.outputs} | {t for t, _ in expected.outputs}):
        a, e = actual.ids(topic), expected.ids(topic)
        doubled = sum(1 for i, c in a.items() if c > e.get(i, 0))
        lost = sum(1 for i, c in e.items() if c > a.get(i, 0))
        result.checks.append(
            (
                f"every input id once in '{topic}'",
                doubled == 0 and lost == 0,
                f"{len(a)} ids, {doubled} doubled, {lost} lost",
            )
        )
    audit = _optional(module, "chaos_audit")
    if audit is not None:
        result.checks.extend(audit(crashed_store))
    result.seconds = time.monotonic() - t0
    return result


def _check_exit(child: Child, result: ChaosResult) -> None:
    code = child.proc.returncode
    if code not in (0, None):
        result.checks.append(("pipeline ran without error", False, child.stderr()[-500:]))


def _optional(module: str, name: str) -> Callable[..., Any] | None:
    try:
        obj = load_object(f"{module}:{name}")
    except Exception:
        return None
    return obj if callable(obj) else None


def render(result: ChaosResult, console: Console) -> None:
    table = Table(title="onceflow chaos: audit of committed effects")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for name, ok, detail in result.checks:
        table.add_row(name, "[green]PASS[/]" if ok else "[red]FAIL[/]", detail)
    console.print(
        f"events sent: {result.events}   random kills: {result.random_kills}   "
        f"kills at protocol steps: {len(result.step_kills)} ({', '.join(result.step_kills)})   "
        f"time: {result.seconds:.1f}s"
    )
    console.print(table)
    console.print("[green]exactly-once holds[/]" if result.ok else "[red]AUDIT FAILED[/]")


@click.command("chaos")
@click.argument("target")
@click.option("--events", default=5000, show_default=True, help="Events to send.")
@click.option("--kills", default=5, show_default=True, help="SIGKILLs at random moments.")
@click.option("--seed", default=1, show_default=True, help="Seed of events and kill times.")
@click.option("--dir", "workdir", default=None, help="Keep the stores here (default: temp).")
def chaos_command(target: str, events: int, kills: int, seed: int, workdir: str | None) -> None:
    """Kill a pipeline repeatedly and audit its committed effects against a reference.

    TARGET is MODULE:APP. Exits 0 only when every check holds.
    """
    console = Console()
    tmp = workdir or tempfile.mkdtemp(prefix="onceflow-chaos-")
    try:
        result = run_chaos(
            target,
            events=events,
            kills=kills,
            seed=seed,
            workdir=tmp,
            progress=lambda msg: console.log(msg),
        )
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    render(result, console)
    raise SystemExit(0 if result.ok else 1)

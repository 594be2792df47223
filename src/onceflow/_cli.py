"""The `onceflow` command: a thin click layer over the library.

Library errors (`OnceflowError`) become a one-line `Error: ...` on stderr and exit
status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import click
from click.core import ParameterSource
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from . import __version__
from . import _kafka_status as kafka
from ._app import App
from ._backend import open_backend
from ._errors import OnceflowError
from ._kafka_common import is_kafka
from ._loader import load_app
from ._records import Record
from ._settings import ENV_HELP, Settings
from ._sqlite import SQLiteStore
from ._status import (
    AppStatus,
    EffectStatus,
    as_json,
    decode_value,
    describe_rows,
    end_positions,
    last_records,
    list_topics,
    open_store,
    read_new,
    record_dict,
    reset_app,
    reset_plan,
    status,
    tail_partitions,
)

F = TypeVar("F", bound=Callable[..., Any])

# Commands other modules implement, imported only when run, so that one missing or
# broken module leaves the rest of the CLI working. Their help is hard-coded for the
# same reason: `onceflow --help` must not import them.
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "onceflow._demo:demo_command",
        "Run the payments demo: crash a pipeline, check every payment took effect once.",
    ),
    "chaos": (
        "onceflow._chaos:chaos_command",
        "Kill a pipeline repeatedly and audit its output for loss and duplicates.",
    ),
}

# `tail --follow` re-reads the log this often. Records appear only when a producer or
# an App commits, and commits are ~0.1 s apart by default, so faster polling only burns
# CPU and takes the store's lock more often.
FOLLOW_POLL_S = 0.2


@dataclass(frozen=True)
class CliState:
    """The group's options, handed to every subcommand through `ctx.obj`."""

    store: str
    store_explicit: bool


def one_line(message: str) -> str:
    return " ".join(message.split())


class OnceflowGroup(click.Group):
    """A click group that loads some commands lazily and turns library errors into
    clean messages."""

    def __init__(
        self, *args: Any, lazy_commands: dict[str, tuple[str, str]] | None = None, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self.lazy_commands = dict(LAZY_COMMANDS if lazy_commands is None else lazy_commands)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy_commands])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_commands:
            return _import_command(cmd_name, *self.lazy_commands[cmd_name])
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names), default=0)
        rows = []
        for name in names:
            if name in self.lazy_commands:
                rows.append((name, self.lazy_commands[name][1]))
            elif not self.commands[name].hidden:
                rows.append((name, self.commands[name].get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Environment variables"):
            formatter.write_dl(list(ENV_HELP.items()))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OnceflowError as exc:
            raise click.ClickException(one_line(str(exc))) from exc


def _import_command(name: str, target: str, help_text: str) -> click.Command:
    module_name, _, attr = target.partition(":")
    try:
        cmd = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:
        # Any failure, not only ImportError: a module that raises while importing must
        # not take the other commands down, and the message says how to see why.
        why = (
            f"cannot load {target} ({type(exc).__name__}: {exc}); "
            f"`python -c 'import {module_name}'` shows the traceback"
        )
        return _unavailable(name, why, help_text)
    if not isinstance(cmd, click.Command):
        return _unavailable(
            name, f"{target} is a {type(cmd).__name__}, not a click command", help_text
        )
    return cmd


def _unavailable(name: str, why: str, help_text: str) -> click.Command:
    """A stand-in that fails with the reason, whatever arguments it is given."""

    def fail() -> None:
        raise click.ClickException(
            f"the '{name}' command is not available: {why}. "
            "Operator action: reinstall onceflow, or check the module for errors"
        )

    return click.Command(
        name,
        callback=fail,
        help=help_text,
        add_help_option=False,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )


def store_option(fn: F) -> F:
    """`--store` after the command name too, as in `onceflow reset APP --store X`."""
    return click.option(
        "--store",
        "store",
        default=None,
        metavar="STORE",
        help="Store file or kafka://HOST:PORT[/NAMESPACE]; overrides a --store given "
        "before the command.",
    )(fn)


def resolve_store(ctx: click.Context, override: str | None) -> tuple[str, bool]:
    """(store path, whether the user chose it). Command line beats group, then env."""
    if override is not None:
        return override, True
    state = ctx.find_object(CliState)
    if state is not None:
        return state.store, state.store_explicit
    # Invoked outside the `onceflow` group (a lazily loaded command's own group).
    env = os.environ.get("ONCEFLOW_STORE")
    return (env, True) if env else (Settings.store, False)


def console() -> Console:
    # Markup off: topic, key and owner strings may contain [brackets] rich would eat.
    return Console(markup=False, highlight=False)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def age(ts: float | None, now: float | None = None) -> str:
    """'4s ago', '3m 12s ago', ...; 'never' for no timestamp."""
    if ts is None:
        return "never"
    s = max(0, int((time.time() if now is None else now) - ts))
    if s >= 86400:
        return f"{s // 86400}d {s % 86400 // 3600}h ago"
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60}m ago"
    if s >= 60:
        return f"{s // 60}m {s % 60}s ago"
    return f"{s}s ago"


# -- the group --------------------------------------------------------------------


@click.group(cls=OnceflowGroup)
@click.option(
    "--store",
    default=Settings.store,
    show_default=True,
    envvar="ONCEFLOW_STORE",
    show_envvar=True,
    metavar="STORE",
    help="The store: an embedded SQLite file, or kafka://HOST:PORT[/NAMESPACE].",
)
@click.version_option(__version__, prog_name="onceflow")
@click.pass_context
def cli(ctx: click.Context, store: str) -> None:
    """Stream processing with an end-to-end exactly-once guarantee.

    Run a pipeline with `onceflow run MODULE:APP`, then look inside its store with
    `topics`, `tail` and `status`.
    """
    source = ctx.get_parameter_source("store")
    explicit = source is not None and source != ParameterSource.DEFAULT
    ctx.obj = CliState(store=store, store_explicit=explicit)


def main(argv: list[str] | None = None) -> None:
    """The console script `onceflow` and `python -m onceflow`."""
    cli.main(args=argv)


# -- run --------------------------------------------------------------------------


@cli.command()
@click.argument("target", metavar="MODULE:APP")
@click.option("--until-idle", is_flag=True, help="Stop once every source is drained and committed.")
@click.option(
    "--worker",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="Kafka: this process's worker slot (its stable transactional id); "
    "overrides App(worker=) and ONCEFLOW_WORKER.",
)
@store_option
@click.pass_context
def run(
    ctx: click.Context, target: str, until_idle: bool, worker: int | None, store: str | None
) -> None:
    """Run the App at MODULE:APP, e.g. payments:app.

    It runs until Ctrl-C or SIGTERM, which make it commit and stop, or with
    --until-idle until every source is drained and committed. The App keeps its own
    store unless --store or ONCEFLOW_STORE is given. On Kafka, run one process per
    worker slot (--worker 0, 1, ...).
    """
    app: App = load_app(target)
    path, explicit = resolve_store(ctx, store)
    if explicit:
        app.store = path
    several = open_backend(app.store).several_workers
    if worker is not None:
        if not several:
            # Silently ignoring it would let an operator believe two processes share
            # the work, when on SQLite the second one fences the first.
            raise click.UsageError(
                f"--worker applies to a kafka:// store; app '{app.name}' runs on "
                f"'{app.store}', where one process runs the app"
            )
        app.worker = worker
    stats = app.run(until_idle=until_idle)
    where = f"store {app.store}"
    if several:
        slot = app.worker if app.worker is not None else Settings.from_env().worker
        where += f", worker {slot}"
    click.echo(
        f"app '{app.name}' ({where}): {stats.records_in} records in, "
        f"{stats.records_out} out, {stats.duplicates} duplicates dropped, "
        f"{stats.dead_letters} dead letters, {stats.commits} commits in {stats.seconds:.2f}s"
    )


# -- topics -----------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json_flag", is_flag=True, help="Print JSON instead of a table.")
@store_option
@click.pass_context
def topics(ctx: click.Context, as_json_flag: bool, store: str | None) -> None:
    """List the topics of the store with their partitions and records.

    On Kafka: the topics of the store's namespace, with their end offsets (which count
    transaction markers too, so they are positions rather than record counts).
    """
    path, _ = resolve_store(ctx, store)
    if is_kafka(path):
        _kafka_topics(path, as_json_flag)
        return
    with open_store(path) as st:
        found = list_topics(st)
    if as_json_flag:
        echo_json(as_json(found))
        return
    if not found:
        click.echo(f"no topics in store '{path}'")
        return
    table = Table("topic", "partitions", "records")
    for t in found:
        table.add_row(t.name, str(t.partitions), str(t.records))
    console().print(table)


# A topic with more partitions than this shows only the total of its end offsets.
_SHOWN_PARTITIONS = 8


def _kafka_topics(path: str, as_json_flag: bool) -> None:
    found = kafka.list_topics(path)
    if as_json_flag:
        echo_json(as_json(found))
        return
    if not found:
        click.echo(f"no topics on '{path}'")
        return
    table = Table("topic", "partitions", "end offsets", "per partition")
    for t in found:
        per = " ".join(map(str, t.end_offsets)) if t.partitions <= _SHOWN_PARTITIONS else "..."
        table.add_row(t.name, str(t.partitions), str(sum(t.end_offsets)), per)
    console().print(table)


# -- tail -------------------------------------------------------------------------


@cli.command()
@click.argument("topic")
@click.option(
    "--from-beginning/--from-end",
    "from_beginning",
    default=None,
    help="Start at the first record, or after the last one. [default: the last --lines]",
)
@click.option(
    "-n",
    "--lines",
    default=10,
    show_default=True,
    type=click.IntRange(min=0),
    help="How many of the latest records to show first.",
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new records until Ctrl-C.")
@click.option(
    "-p", "--partition", type=click.IntRange(min=0), default=None, help="Only this partition."
)
@click.option("--json", "as_json_flag", is_flag=True, help="One JSON object per line.")
@store_option
@click.pass_context
def tail(
    ctx: click.Context,
    topic: str,
    from_beginning: bool | None,
    lines: int,
    follow: bool,
    partition: int | None,
    as_json_flag: bool,
    store: str | None,
) -> None:
    """Print the committed records of TOPIC.

    Reading never joins a consumer group or moves an offset, so it is safe next to a
    running App. On Kafka it reads read_committed: records of open or aborted
    transactions are never shown.
    """
    path, _ = resolve_store(ctx, store)
    show = _print_json if as_json_flag else _print_text
    if is_kafka(path):
        _kafka_tail(path, topic, from_beginning, lines, follow, partition, show)
        return
    with open_store(path) as st:
        parts = tail_partitions(st, topic, partition)
        if from_beginning is None:
            recent, positions = last_records(st, topic, parts, lines)
            show(recent)
        elif from_beginning:
            positions = dict.fromkeys(parts, 0)
        else:
            positions = end_positions(st, topic, parts)
        while batch := read_new(st, topic, positions):
            show(batch)
        if follow:
            _follow(st, topic, positions, show)


def _follow(
    st: SQLiteStore, topic: str, positions: dict[int, int], show: Callable[[list[Record]], None]
) -> None:
    try:
        while True:
            batch = read_new(st, topic, positions)
            if batch:
                show(batch)
            else:
                time.sleep(FOLLOW_POLL_S)
    except KeyboardInterrupt:
        # Ctrl-C is how a follow ends, not a failure.
        return


def _kafka_tail(
    path: str,
    topic: str,
    from_beginning: bool | None,
    lines: int,
    follow: bool,
    partition: int | None,
    show: Callable[[list[Record]], None],
) -> None:
    with kafka.KafkaTail(path, topic, partition) as t:
        if from_beginning is None:
            show(t.last(lines))
        elif from_beginning:
            t.from_beginning()
        while not t.drained():
            show(t.poll(FOLLOW_POLL_S))
        if not follow:
            return
        try:
            while True:
                # The consumer waits for records itself; no sleep needed.
                show(t.poll(FOLLOW_POLL_S))
        except KeyboardInterrupt:
            # Ctrl-C is how a follow ends, not a failure.
            return


def _print_text(records: list[Record]) -> None:
    for rec in records:
        click.echo(format_record(rec))


def _print_json(records: list[Record]) -> None:
    for rec in records:
        click.echo(json.dumps(record_dict(rec), ensure_ascii=False))


def format_record(rec: Record) -> str:
    """`p0@12 key=k id=i headers={...} value`: one line per record, whatever the value."""
    encoding, text = decode_value(rec.value)
    # A value with a newline or control character would break one-record-per-line.
    value = (
        text
        if encoding == "utf-8" and text.isprintable()
        else repr(text if encoding == "utf-8" else rec.value)
    )
    parts = [f"p{rec.partition}@{rec.offset}", f"key={rec.key}", f"id={rec.id}"]
    if rec.headers:
        parts.append(f"headers={json.dumps(rec.headers, ensure_ascii=False)}")
    parts.append(value)
    return " ".join(parts)


# -- status -----------------------------------------------------------------------


@cli.command("status")
@click.option("--app", "app_name", metavar="NAME", default=None, help="Only this app.")
@click.option(
    "--topic",
    "topics",
    multiple=True,
    metavar="TOPIC",
    help="Kafka, with --app: also count lag on this source topic (repeatable). Needed only "
    "for a stateless app before its first commit.",
)
@click.option("--json", "as_json_flag", is_flag=True, help="Print JSON instead of tables.")
@store_option
@click.pass_context
def status_command(
    ctx: click.Context,
    app_name: str | None,
    topics: tuple[str, ...],
    as_json_flag: bool,
    store: str | None,
) -> None:
    """Show each app's progress and what it holds in the store.

    Per source partition: end and committed offsets, lag, lease epoch and owner. Per
    app: commits, last commit, dead letters, keys held per stateful step (dedup ids
    with the oldest one's age), and undelivered outbox epochs per sink.

    On Kafka: per app, its consumer group, per source partition the end and committed
    offsets and lag, its stateful steps and changelogs; then every open transaction of
    the namespace with its age, marked HANGING when older than the transaction timeout.
    """
    path, _ = resolve_store(ctx, store)
    if topics and not (is_kafka(path) and app_name):
        raise click.UsageError("--topic needs a kafka:// store and --app NAME")
    if is_kafka(path):
        _kafka_status(path, app_name, topics, as_json_flag)
        return
    with open_store(path) as st:
        apps = status(st, app_name)
    if as_json_flag:
        echo_json(as_json(apps))
        return
    if not apps:
        click.echo(f"no apps in store '{path}'")
        return
    out = console()
    now = time.time()
    for app in apps:
        _print_app(out, app, now)


def _print_app(out: Console, app: AppStatus, now: float) -> None:
    out.print(
        f"app {app.name}: {app.commits} commits, last commit {age(app.last_commit, now)}, "
        f"lag {app.lag}, {app.dead_letters} dead letters in {app.dead_letter_topic}",
        soft_wrap=True,
    )
    out.print(_partitions_table(app))
    if app.steps:
        out.print(_steps_table(app, now))
    if app.sinks:
        out.print(_sinks_table(app))
    if app.effects:
        out.print(_effects_table(app.effects))


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def _partitions_table(app: AppStatus) -> Table:
    table = Table("topic", "partition", "end", "committed", "lag", "lease epoch", "owner")
    for p in app.partitions:
        table.add_row(
            p.topic,
            str(p.partition),
            str(p.end_offset),
            _dash(p.committed_offset),
            str(p.lag),
            _dash(p.lease_epoch),
            _dash(p.lease_owner),
        )
    return table


def _steps_table(app: AppStatus, now: float) -> Table:
    """One "keys held" column: dedup ids for dedupe steps, state keys for the others."""
    table = Table("step", "kind", "source", "keys held", "oldest key", "retention")
    for s in app.steps:
        if s.kind == "dedupe" or s.dedup_keys:
            keys, oldest = s.dedup_keys, age(s.oldest_dedup_seen, now)
        else:
            keys, oldest = s.state_keys, "-"
        table.add_row(s.name, s.kind, _dash(s.topic), str(keys), oldest, _dash(s.retention))
    return table


def _sinks_table(app: AppStatus) -> Table:
    table = Table("sink", "pending epochs", "delivered epochs", "position")
    for k in app.sinks:
        table.add_row(k.name, str(k.pending_epochs), str(k.delivered_epochs), str(k.position))
    return table


def _effects_table(effects: Sequence[EffectStatus | kafka.KafkaEffectStatus]) -> Table:
    """Pending intents are retried with their keys until they succeed; failing ones
    (embedded only: Kafka journals no failed attempt) show the first one's error. A
    count ending in + is a floor: the changelog could not be read to its end in time."""
    table = Table("effect sink", "pending", "failing", "done", "dead", "last error")
    for e in effects:
        more = "" if getattr(e, "complete", True) else "+"
        table.add_row(
            e.name,
            f"{e.pending}{more}",
            _dash(getattr(e, "failing", None)),
            f"{e.done}{more}",
            f"{e.dead}{more}",
            _dash(getattr(e, "last_error", None)),
        )
    return table


def _kafka_status(
    path: str, app_name: str | None, topics: tuple[str, ...], as_json_flag: bool
) -> None:
    found = kafka.status(path, app_name, topics)
    if as_json_flag:
        echo_json(as_json(found))
        return
    out = console()
    if not found.apps:
        out.print(f"no apps on '{path}'", soft_wrap=True)
    for app in found.apps:
        _print_kafka_app(out, app)
    _print_transactions(out, found)


def _seconds(s: float) -> str:
    return age(0.0, s).removesuffix(" ago")


def _print_kafka_app(out: Console, app: kafka.KafkaAppStatus) -> None:
    timeout = _seconds(app.transaction_timeout_seconds)
    if app.transaction_timeout_assumed:
        timeout += " (assumed)"
    dead = (
        f"dead letters in {app.dead_letter_topic} (end offset {app.dead_letter_end_offset})"
        if app.dead_letter_end_offset
        else f"no dead letters in {app.dead_letter_topic}"
    )
    out.print(
        f"app {app.name}: group {app.group} ({(app.group_state or 'none').lower()}), "
        f"lag {app.lag}, transaction timeout {timeout}, {dead}",
        soft_wrap=True,
    )
    table = Table("topic", "partition", "end", "committed", "lag")
    for p in app.partitions:
        table.add_row(
            p.topic, str(p.partition), str(p.end_offset), _dash(p.committed_offset), str(p.lag)
        )
    if app.partitions:
        out.print(table)
    else:
        out.print(
            "  no source partitions found: a stateless app shows them after its first "
            "commit, or with --app NAME --topic TOPIC",
            soft_wrap=True,
        )
    if app.steps:
        steps = Table(
            "step", "kind", "source", Column("changelog", overflow="fold"), "changelog end"
        )
        for s in app.steps:
            steps.add_row(
                s.name, s.kind, _dash(s.topic), _dash(s.changelog), str(s.changelog_end_offset)
            )
        out.print(steps)
    if app.effects:
        out.print(_effects_table(app.effects))


def _print_transactions(out: Console, found: kafka.KafkaStatus) -> None:
    if not found.open_transactions:
        out.print("no open transactions", soft_wrap=True)
        return
    out.print(
        f"{len(found.open_transactions)} open transaction(s); HANGING: older than the "
        "transaction timeout of the app writing it, so the broker should have aborted it",
        soft_wrap=True,
    )
    # Topic names fold rather than lose their end: changelogs differ only there.
    table = Table(
        Column("topic", overflow="fold"),
        "partition",
        "stable",
        "end",
        "age",
        "timeout",
        Column("app", overflow="fold"),
        Column("state", no_wrap=True),
    )
    for t in found.open_transactions:
        state = Text("HANGING", style="bold red") if t.hanging else Text("open")
        table.add_row(
            t.topic,
            str(t.partition),
            str(t.stable_offset),
            str(t.end_offset),
            "?" if t.age_seconds is None else _seconds(t.age_seconds),
            "?" if t.timeout_seconds is None else _seconds(t.timeout_seconds),
            _dash(t.app),
            state,
        )
    out.print(table)


# -- reset ------------------------------------------------------------------------


@cli.command()
@click.argument("app")
@click.option("--yes", is_flag=True, help="Really delete; without it, only show what would go.")
@store_option
@click.pass_context
def reset(ctx: click.Context, app: str, yes: bool, store: str | None) -> None:
    """Forget APP's offsets, state, dedup keys, leases and sink progress.

    The next run reprocesses every source from offset 0. Topics and their records
    (outputs and dead letters included) are kept, so outputs are written again.

    Not available on Kafka, where an app's state is also on its workers' disks: run
    under a new app name or namespace instead.
    """
    path, _ = resolve_store(ctx, store)
    if is_kafka(path):
        kafka.refuse_reset(path, app)
    with open_store(path) as st:
        if not yes:
            plan = reset_plan(st, app)
            click.echo(f"reset would delete from '{path}': {describe_rows(plan)}", err=True)
            raise click.ClickException(f"refusing to reset app '{app}' without --yes")
        deleted = reset_app(st, app)
    click.echo(f"reset app '{app}' in '{path}': deleted {describe_rows(deleted)}")

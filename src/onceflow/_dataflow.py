"""The chainable `Stream` and the step graph it builds. Nothing here runs a record."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ._errors import ConfigError, TopologyError
from ._serde import Encoding

if TYPE_CHECKING:
    from ._app import App
    from ._sinks import Sink
    from ._state import State

StepKind = Literal[
    "source",
    "map",
    "filter",
    "flat_map",
    "key_by",
    "dedupe",
    "reduce",
    "aggregate",
    "process",
    "to",
    "sink",
]
STATEFUL: frozenset[str] = frozenset({"dedupe", "reduce", "aggregate", "process"})

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(eq=False)
class Step:
    """One node of a stage's tree. Stateful steps carry a user-given, stable name."""

    kind: StepKind
    name: str
    parent: Step | None
    fn: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    children: list[Step] = field(default_factory=list)

    def ancestors(self) -> Iterable[Step]:
        node = self.parent
        while node is not None:
            yield node
            node = node.parent


class Stream:
    """A stream of (key, value) elements. Every method returns a new `Stream`.

    Stateless steps (`map`, `filter`, `flat_map`, `key_by`) take a function of the value.
    Stateful steps (`dedupe`, `reduce`, `aggregate`, `process`) need `name=`: the name
    under which their state survives restarts. They keep state per key, so every record
    of a key must arrive on one partition: key the input topic by that key, or re-key
    with `key_by(...)` and then `through("topic")`.

        >>> app = App("sums", store="sums.db")                         # doctest: +SKIP
        >>> (app.source("amounts")
        ...     .key_by(lambda v: v["account"]).through("amounts-by-account")
        ...     .reduce(name="total", fn=lambda acc, v: acc + v, initial=0)
        ...     .to("totals"))                                          # doctest: +SKIP
    """

    def __init__(self, app: App, step: Step) -> None:
        self._app = app
        self._step = step

    def _add(self, kind: StepKind, name: str | None, fn: Any = None, **options: Any) -> Stream:
        if kind in STATEFUL:
            if not name:
                raise ConfigError(
                    f"{kind}() needs name=: it names the state so that a restart finds it"
                )
            if not _NAME.match(name):
                raise ConfigError(f"step name {name!r} is invalid: use up to 128 of [A-Za-z0-9_.-]")
        if fn is not None and not callable(fn) and kind not in ("to", "sink"):
            raise ConfigError(f"{kind}() needs a function, got {type(fn).__name__}")
        label = name or f"{kind}-{self._app._next_step_id()}"
        step = Step(kind, label, self._step, fn, options)
        self._step.children.append(step)
        self._app._register(step)
        return Stream(self._app, step)

    # -- stateless ------------------------------------------------------------------

    def map(self, fn: Callable[[Any], Any], *, name: str | None = None) -> Stream:
        """Replace each value by `fn(value)`."""
        return self._add("map", name, fn)

    def filter(self, fn: Callable[[Any], bool], *, name: str | None = None) -> Stream:
        """Keep the values for which `fn(value)` is true."""
        return self._add("filter", name, fn)

    def flat_map(self, fn: Callable[[Any], Iterable[Any]], *, name: str | None = None) -> Stream:
        """Replace each value by the values `fn(value)` yields (zero or more)."""
        return self._add("flat_map", name, fn)

    def key_by(self, fn: Callable[[Any], Any], *, name: str | None = None) -> Stream:
        """Set each element's key to `str(fn(value))`; `to()` partitions by it."""
        return self._add("key_by", name, fn)

    # -- stateful -------------------------------------------------------------------

    def dedupe(
        self,
        *,
        name: str,
        key: Callable[[Any], Any] | None = None,
        ttl: float | None = None,
        max_keys: int | None = None,
        replay_to: str | None = None,
    ) -> Stream:
        """Pass the first element of each business id; drop later ones.

        The id is `key(value)`, or the record's id (`Producer.send(..., id=...)`) when
        `key` is None. Ids are kept for `ttl` seconds and/or the newest `max_keys` ids;
        one of them is required, because a dedup store without retention grows forever.
        With `replay_to="topic"`, a duplicate is answered by re-emitting the records the
        first occurrence wrote to that topic, with the header `onceflow-replay: 1`.
        """
        if ttl is None and max_keys is None:
            raise ConfigError(
                f"dedupe(name={name!r}) needs a retention: ttl=<seconds> and/or max_keys=<N>"
            )
        if ttl is not None and ttl <= 0:
            raise ConfigError(f"dedupe(name={name!r}): ttl must be positive, got {ttl}")
        if max_keys is not None and max_keys < 1:
            raise ConfigError(f"dedupe(name={name!r}): max_keys must be >= 1, got {max_keys}")
        return self._add("dedupe", name, key, ttl=ttl, max_keys=max_keys, replay_to=replay_to)

    def reduce(self, *, name: str, fn: Callable[[Any, Any], Any], initial: Any = None) -> Stream:
        """Fold values per key: emit `acc = fn(acc, value)`; the first value starts `acc`
        unless `initial` (a value, or a zero-argument function) is given."""
        return self._add("reduce", name, fn, initial=initial)

    def aggregate(self, *, name: str, initial: Any, fn: Callable[[Any, Any], Any]) -> Stream:
        """Like `reduce`, always starting from `initial` (a value or a function)."""
        return self._add("reduce", name, fn, initial=initial, always_initial=True)

    def process(self, *, name: str, fn: Callable[[Any, State], Iterable[Any] | None]) -> Stream:
        """Run `fn(value, state)` per element; it reads and writes `state.value` for the
        element's key and returns (or yields) the values to emit, or None."""
        return self._add("process", name, fn)

    # -- outputs --------------------------------------------------------------------

    def to(self, topic: str, *, value: Encoding | Callable[[Any], bytes] = "json") -> Stream:
        """Write each element to `topic` in the epoch's commit. Returns this stream."""
        self._add("to", None, None, topic=topic, value=value)
        return self

    def through(
        self, topic: str, *, value: Encoding = "json", partitions: int | None = None
    ) -> Stream:
        """Write to `topic` and continue from it as a new stage, re-partitioned by key."""
        self.to(topic, value=value)
        return self._app.source(topic, value=value, partitions=partitions)

    def sink(self, sink: Sink) -> Stream:
        """Hand each element to `sink`; the App checks the sink's declared guarantee."""
        self._add("sink", sink.name, sink)
        return self


def validate(sources: list[Step]) -> None:
    """Refuse graphs that would break the guarantee or lose state, naming the step."""
    seen: dict[str, Step] = {}

    def walk(step: Step) -> None:
        if step.kind in STATEFUL:
            if step.name in seen:
                raise TopologyError(
                    f"two stateful steps are named '{step.name}'; give each a unique name="
                )
            seen[step.name] = step
            for anc in step.ancestors():
                if anc.kind == "key_by":
                    raise TopologyError(
                        f"stateful step '{step.name}' follows key_by() in the same stage, so "
                        "records of one key may sit on different partitions. Operator "
                        "action: call .through('<topic>') after key_by() to re-partition"
                    )
        for child in step.children:
            walk(child)

    for src in sources:
        walk(src)


def topology_problems(old: list[list[str]], new: list[list[str]]) -> list[str]:
    """How the stateful steps changed, one sentence per step, naming it."""
    before = {s[0]: s for s in old}
    after = {s[0]: s for s in new}
    problems = []
    for name, s in before.items():
        if name not in after:
            problems.append(f"step '{name}' ({s[1]} on '{s[2]}') has state but is gone")
        elif after[name] != s:
            problems.append(
                f"step '{name}' was {s[1]} on '{s[2]}', now {after[name][1]} on '{after[name][2]}'"
            )
    for name, s in after.items():
        if name not in before:
            problems.append(
                f"step '{name}' ({s[1]}) is new, and would start with empty state mid-stream"
            )
    return problems


def signature(sources: list[Step]) -> list[list[str]]:
    """What a restart must find unchanged: each stateful step's name, kind and source."""
    out: list[list[str]] = []

    def walk(step: Step, topic: str) -> None:
        if step.kind in STATEFUL:
            out.append([step.name, step.kind, topic])
        for child in step.children:
            walk(child, topic)

    for src in sources:
        walk(src, src.options["topic"])
    return sorted(out)

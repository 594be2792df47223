"""Runs one polled batch through a stage's steps, into the epoch buffer.

Elements are `(key, value, src)` tuples, `src` being the index of the input record in
the batch; the index carries offset, partition, id and the original bytes to every
step without a per-record object. Steps work on whole lists: a stateless step first
tries one list comprehension and only on an exception falls back to one record at a
time, to find the record that goes to the dead letters.
"""

from __future__ import annotations

import copy
import itertools
import operator
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._dataflow import Step
from ._errors import FencedError, UnavailableError, UserFunctionError
from ._hooks import _Fanout
from ._records import Columns
from ._serde import copy_state, decode_state, dump_state, encode_state, encoder_for, load_state
from ._state import DEFAULT_CACHE_KEYS, MISSING, State, StepState

Item = tuple[Any, Any, int]
# Values no call can change in place. Exact types: a subclass may add mutable parts.
_ATOMS = frozenset({int, float, str, bytes, bool, type(None)})


def frozen(value: Any) -> bool:
    """Whether a state value is immutable all the way down: a tuple or frozenset counts
    only if everything in it does (a list inside a tuple can be appended to)."""
    t = type(value)
    if t in _ATOMS:
        return True
    if t is tuple or t is frozenset:
        return all(map(frozen, value))
    return False


REPLAY_HEADER = "onceflow-replay"


@dataclass
class Batch:
    """The records one poll returned for one source topic, as parallel lists."""

    topic: str
    parts: list[int]
    offs: list[int]
    keys: list[str | None]
    raws: list[bytes]
    tss: list[float]
    ids: list[str | None]


@dataclass
class DedupStep:
    """The ids one dedupe step has seen, per (partition, id), plus this epoch's new ones.

    `seen` is a cache of the store (MISSING where the store has no such id), bounded like
    the state cache: an App that sees a new id per record would otherwise keep every id
    in memory whatever the retention says."""

    name: str
    ttl: float | None
    max_keys: int | None
    replay_to: str | None
    cache_keys: int = DEFAULT_CACHE_KEYS
    seen: dict[tuple[int, str], Any] = field(default_factory=dict)
    new: dict[tuple[int, str], tuple[float, tuple[str, int, int]]] = field(default_factory=dict)

    def reset(self) -> None:
        self.seen.clear()
        self.new.clear()

    def committed(self, outcomes: dict[tuple[int, str], bytes | None], purged: bool) -> None:
        """The epoch is durable: its ids are what the store holds. Past the bound, or
        after retention purged ids from the store, the cache goes: an id the store
        forgot must be new to this process too, as it is to the next one."""
        if purged or len(self.seen) > self.cache_keys:
            self.seen.clear()
        else:
            for pk, (seen, _) in self.new.items():
                self.seen[pk] = (seen, outcomes.get(pk))
        self.new.clear()


@dataclass
class Epoch:
    """Everything one epoch will commit. Nothing in here is durable until commit."""

    # Outputs and dead letters per (topic, partition), in the order they were produced.
    outputs: dict[tuple[str, int], Columns] = field(default_factory=dict)
    records_out: int = 0
    dead_letters: int = 0
    # (input identity, topic, key, value, headers) of each output, kept only when a
    # dedupe step must remember what a first occurrence wrote.
    captured: list[tuple[tuple[str, int, int], str, str | None, bytes, Any]] = field(
        default_factory=list
    )
    positions: dict[tuple[str, int], int] = field(default_factory=dict)
    sink_rows: dict[str, list[tuple[Any, Any, tuple[str, int, int, int]]]] = field(
        default_factory=dict
    )
    records_in: int = 0
    duplicates: int = 0
    started: float = field(default_factory=time.monotonic)

    def size(self) -> int:
        return self.records_in


class Executor:
    """Applies a stage's step tree to batches, writing into the current epoch."""

    def __init__(
        self,
        *,
        app_name: str,
        dead_letter_topic: str,
        on_error: str,
        states: dict[str, StepState],
        dedups: dict[str, DedupStep],
        load_dedup: Callable[[str, list[tuple[int, str]]], dict[tuple[int, str], Any]],
        partitions_of: Callable[[str], int],
        partition_for: Callable[[str | None, int, int], int],
        hooks: _Fanout,
    ) -> None:
        self.partitions_of = partitions_of
        self.partition_for = partition_for
        self.app_name = app_name
        self.dlq = dead_letter_topic
        self.on_error = on_error
        self.states = states
        self.dedups = dedups
        self._load_dedup = load_dedup
        self.hooks = hooks
        self.capture = any(d.replay_to for d in dedups.values())
        self._encoders: dict[int, Callable[[Any], bytes]] = {}
        self.epoch = Epoch()
        self._replays: list[tuple[DedupStep, int, str, Batch]] = []
        # Topics that more than one step of a stage writes (a dedupe's replays count as
        # one), per stage; the dead-letter topic always. Their outputs of a batch are put
        # back in input order after the batch, so that order does not depend on where
        # batches were cut (`_keep_input_order`).
        self._shared: dict[int, frozenset[str]] = {}
        self._ordered: frozenset[str] = frozenset()
        # Per output (topic, partition) of such a topic, during `run`: its length before
        # the batch and the input index of each output the batch appended.
        self._marks: dict[tuple[str, int], tuple[int, list[int]]] = {}

    # -- entry ----------------------------------------------------------------------

    def run(self, source: Step, batch: Batch, decode: Callable[[bytes], Any]) -> None:
        ep = self.epoch
        ordered = self._shared.get(id(source))
        if ordered is None:
            ordered = self._shared[id(source)] = self._shared_topics(source)
        self._ordered = ordered
        self._marks = {}
        n = len(batch.offs)
        ep.records_in += n
        pos = ep.positions
        topic = batch.topic
        for part, off in zip(batch.parts, batch.offs, strict=True):
            pos[(topic, part)] = off + 1
        keys, raws = batch.keys, batch.raws
        try:
            items: list[Item] = [(keys[i], decode(raws[i]), i) for i in range(n)]
        except Exception:
            items = []
            for i in range(n):
                try:
                    items.append((keys[i], decode(raws[i]), i))
                except Exception as exc:
                    self._fail(source, batch, i, exc, "decode")
        self._replays = []
        self._children(source, items, batch)
        if self._replays:
            self._emit_replays(batch)
        if self._marks:
            self._keep_input_order()
        self._marks = {}
        self._ordered = frozenset()

    def dead_letter(self, batch: Batch, i: int, step: str, what: str, error: str) -> None:
        """Record `i` of `batch` as a dead letter and nothing else: a record whose epoch
        could not commit on its own (its state cannot be stored, a sink refuses its
        row) commits this way, with its offset."""
        ep = self.epoch
        ep.records_in += 1
        tp = (batch.topic, batch.parts[i])
        ep.positions[tp] = max(ep.positions.get(tp, 0), batch.offs[i] + 1)
        self._dead_letter(step, what, batch, i, error)

    def _shared_topics(self, source: Step) -> frozenset[str]:
        writers: Counter[str] = Counter()
        stack = [source]
        while stack:
            step = stack.pop()
            if step.kind == "to":
                writers[step.options["topic"]] += 1
            elif step.kind == "dedupe" and step.options["replay_to"]:
                writers[step.options["replay_to"]] += 1
            stack.extend(step.children)
        return frozenset({t for t, n in writers.items() if n > 1} | {self.dlq})

    def _track(self, tp: tuple[str, int], cols: Columns) -> list[int]:
        """The input indexes of what this batch appends to `tp`; call before appending."""
        mark = self._marks.get(tp)
        if mark is None:
            mark = self._marks[tp] = (len(cols), [])
        return mark[1]

    def _keep_input_order(self) -> None:
        """Steps run over whole batches, so two steps writing one topic append the
        batch's outputs one step after the other, and replays come after the batch: sort
        each such run of outputs by input index (stable, so one input's outputs keep the
        order of the steps). With one record per batch this changes nothing."""
        for tp, (mark, srcs) in self._marks.items():
            if all(map(operator.le, srcs, itertools.islice(srcs, 1, None))):
                continue
            cols = self.epoch.outputs[tp]
            if len(cols) - mark != len(srcs):
                raise AssertionError(f"outputs of {tp} appended without their input index")
            order = sorted(range(len(srcs)), key=srcs.__getitem__)
            columns: list[list[Any] | None] = [
                cols.keys,
                cols.values,
                cols.headers,
                cols.tss,
                cols.ids,
            ]
            for col in columns:
                if col is not None:
                    seg = col[mark:]
                    col[mark:] = [seg[j] for j in order]

    def _children(self, step: Step, items: list[Item], batch: Batch) -> None:
        if not items:
            return
        for child in step.children:
            out = self._apply(child, items, batch)
            if out is not None:
                self._children(child, out, batch)

    # -- failure --------------------------------------------------------------------

    def _fail(self, step: Step, batch: Batch, i: int, exc: BaseException, what: str = "") -> None:
        if isinstance(exc, (UnavailableError, FencedError)):
            # An outage is not the record's fault: the App waits and runs it again.
            raise exc
        if self.on_error == "stop":
            raise UserFunctionError(
                step.name, batch.topic, batch.parts[i], batch.offs[i], exc
            ) from exc
        self._dead_letter(step.name, what, batch, i, f"{type(exc).__name__}: {exc}")

    def _dead_letter(self, step: str, what: str, batch: Batch, i: int, err: str) -> None:
        headers = {
            "onceflow-error": err[:2000],
            "onceflow-step": step if not what else f"{step}:{what}",
            "onceflow-app": self.app_name,
            "onceflow-source-topic": batch.topic,
            "onceflow-source-partition": str(batch.parts[i]),
            "onceflow-source-offset": str(batch.offs[i]),
        }
        self.epoch.dead_letters += 1
        self._emit(
            self.dlq,
            batch.keys[i],
            batch.raws[i],
            headers,
            batch.tss[i],
            batch.ids[i],
            batch.parts[i],
            i,
        )
        self.hooks.dead_letter(step, batch.topic, batch.parts[i], batch.offs[i], err)

    def _one_by_one(
        self, step: Step, items: list[Item], batch: Batch, f: Callable[[Item], Any]
    ) -> list[Any]:
        out = []
        for it in items:
            try:
                out.append(f(it))
            except Exception as exc:
                self._fail(step, batch, it[2], exc)
        return out

    # -- steps ----------------------------------------------------------------------

    def _apply(self, step: Step, items: list[Item], batch: Batch) -> list[Item] | None:
        kind = step.kind
        fn = step.fn
        if kind == "map":
            try:
                return [(k, fn(v), s) for k, v, s in items]
            except Exception:
                return self._one_by_one(step, items, batch, lambda it: (it[0], fn(it[1]), it[2]))
        if kind == "filter":
            try:
                return [it for it in items if fn(it[1])]
            except Exception:
                kept = self._one_by_one(step, items, batch, lambda it: (it, fn(it[1])))
                return [it for it, ok in kept if ok]
        if kind == "key_by":
            try:
                return [(_key(fn(v)), v, s) for _, v, s in items]
            except Exception:
                return self._one_by_one(
                    step, items, batch, lambda it: (_key(fn(it[1])), it[1], it[2])
                )
        if kind == "flat_map":
            out: list[Item] = []
            for k, v, s in items:
                try:
                    res = list(fn(v))
                except Exception as exc:
                    self._fail(step, batch, s, exc)
                    continue
                out.extend([(k, r, s) for r in res])
            return out
        if kind == "reduce":
            return self._reduce(step, items, batch)
        if kind == "process":
            return self._process(step, items, batch)
        if kind == "dedupe":
            return self._dedupe(step, items, batch)
        if kind == "to":
            self._to(step, items, batch)
            return None
        if kind == "sink":
            self._sink(step, items, batch)
            return None
        raise AssertionError(f"unknown step kind {kind}")

    def _emit(
        self,
        topic: str,
        key: str | None,
        value: bytes,
        headers: dict[str, str] | None,
        ts: float,
        id: str | None,
        src_part: int,
        src: int = -1,
    ) -> None:
        """One output to the epoch buffer. A keyless output follows its input's partition,
        so that a replay after a crash writes it to the same partition again. `src` is
        the input's index in the batch, or -1 outside a batch."""
        part = self.partition_for(key, self.partitions_of(topic), src_part)
        cols = self.epoch.outputs.get((topic, part))
        if cols is None:
            cols = self.epoch.outputs[(topic, part)] = Columns()
        if src >= 0 and topic in self._ordered:
            self._track((topic, part), cols).append(src)
        cols.add(key, value, headers, ts, id)
        self.epoch.records_out += 1

    def _to(self, step: Step, items: list[Item], batch: Batch) -> None:
        enc = self._encoders.get(id(step))
        if enc is None:
            enc = self._encoders[id(step)] = encoder_for(step.options["value"])
        topic = step.options["topic"]
        tss, ids, parts = batch.tss, batch.ids, batch.parts
        try:
            values = [enc(v) for _, v, _ in items]
            ok = items
        except Exception:
            values, ok = [], []
            for it in items:
                try:
                    values.append(enc(it[1]))
                    ok.append(it)
                except Exception as exc:
                    self._fail(step, batch, it[2], exc, "encode")
        ep = self.epoch
        if self.partitions_of(topic) == 1:
            # The common case gets whole-column appends instead of one call per record.
            cols = ep.outputs.get((topic, 0))
            if cols is None:
                cols = ep.outputs[(topic, 0)] = Columns()
            if topic in self._ordered:
                self._track((topic, 0), cols).extend([s for _, _, s in ok])
            cols.keys.extend([k for k, _, _ in ok])
            cols.values.extend(values)
            if cols.headers is not None:
                cols.headers.extend([None] * len(ok))
            cols.tss.extend([tss[s] for _, _, s in ok])
            cols.ids.extend([ids[s] for _, _, s in ok])
            ep.records_out += len(ok)
        else:
            emit = self._emit
            unplaced: set[int] = set()
            for j, ((k, _, s), raw) in enumerate(zip(ok, values, strict=True)):
                try:
                    emit(topic, k, raw, None, tss[s], ids[s], parts[s], s)
                except Exception as exc:
                    # The key is hashed to a partition here: one that is not valid text
                    # would fail every commit of the epoch, so it fails its record now.
                    self._fail(step, batch, s, exc, "encode")
                    unplaced.add(j)
            if unplaced:
                ok = [it for j, it in enumerate(ok) if j not in unplaced]
                values = [v for j, v in enumerate(values) if j not in unplaced]
        if self.capture:
            st, offs = batch.topic, batch.offs
            ep.captured.extend(
                [
                    ((st, parts[s], offs[s]), topic, k, raw, None)
                    for (k, _, s), raw in zip(ok, values, strict=True)
                ]
            )

    def _sink(self, step: Step, items: list[Item], batch: Batch) -> None:
        rows = self.epoch.sink_rows.setdefault(step.name, [])
        parts, offs, t = batch.parts, batch.offs, batch.topic
        # The output index makes the row id unique when one input yields several rows.
        last = None
        idx = 0
        for k, v, s in items:
            idx = idx + 1 if s == last else 0
            last = s
            rows.append((k, v, (t, parts[s], offs[s], idx)))

    def _reduce(self, step: Step, items: list[Item], batch: Batch) -> list[Item]:
        st = self.states[step.name]
        parts = batch.parts
        st.prefetch([(parts[s], k or "") for k, _, s in items])
        cache = st.cache
        dirty = st.dirty
        fn = step.fn
        initial = step.options["initial"]
        always = step.options.get("always_initial", False) or initial is not None
        atoms, enc, dec = _ATOMS, encode_state, decode_state
        out: list[Item] = []
        for k, v, s in items:
            pk = (parts[s], k or "")
            acc = cache.get(pk, MISSING)
            try:
                t = type(acc)
                if acc is MISSING:
                    if always:
                        start = initial() if callable(initial) else copy.deepcopy(initial)
                        acc = fn(start, v)
                    else:
                        acc = v
                elif t in atoms or (t is not dict and t is not list and frozen(acc)):
                    acc = fn(acc, v)
                else:
                    # The function mutates a copy: a call that raises halfway leaves the
                    # state as it was, and an earlier output (the same object) keeps
                    # the value it was emitted with.
                    try:
                        mine = dec(enc(acc))
                    except Exception:
                        mine = copy_state(acc)
                    acc = fn(mine, v)
            except Exception as exc:
                self._fail(step, batch, s, exc)
                continue
            cache[pk] = acc
            dirty.add(pk)
            out.append((k, acc, s))
        return out

    def _process(self, step: Step, items: list[Item], batch: Batch) -> list[Item]:
        st = self.states[step.name]
        parts = batch.parts
        st.prefetch([(parts[s], k or "") for k, _, s in items])
        state = State(st)
        cache = st.cache
        fn = step.fn
        atoms, enc, dec = _ATOMS, encode_state, decode_state
        out: list[Item] = []
        for k, v, s in items:
            # Keyless records share one state per partition, under the empty key.
            pk = (parts[s], k or "")
            state._pk = pk
            before = cache.get(pk, MISSING)
            was_dirty = pk in st.dirty
            t = type(before)
            if (
                t not in atoms
                and before is not MISSING
                and (t is dict or t is list or not frozen(before))
            ):
                # As in reduce: the call sees a copy, `before` stays untouched for a
                # failed call to go back to.
                try:
                    cache[pk] = dec(enc(before))
                except Exception:
                    cache[pk] = copy_state(before)
            try:
                res = fn(v, state)
                if res is None:
                    continue
                if isinstance(res, (dict, str, bytes)):
                    raise TypeError(
                        f"process '{step.name}' returned a {type(res).__name__}; return a list "
                        "of values to emit (or None)"
                    )
                out.extend([(k, r, s) for r in res])
            except Exception as exc:
                # A failed call must leave no trace in state, even if it mutated in place.
                cache[pk] = before
                if not was_dirty:
                    st.dirty.discard(pk)
                self._fail(step, batch, s, exc)
        return out

    def _dedupe(self, step: Step, items: list[Item], batch: Batch) -> list[Item]:
        d = self.dedups[step.name]
        keyfn = step.fn
        parts, ids = batch.parts, batch.ids
        keyed: list[tuple[Item, str]] = []
        for it in items:
            try:
                bid = ids[it[2]] if keyfn is None else keyfn(it[1])
                if bid is None:
                    raise ValueError("record has no id to dedupe on (send it with id=...)")
            except Exception as exc:
                self._fail(step, batch, it[2], exc)
                continue
            keyed.append((it, str(bid)))
        seen = d.seen
        missing = list({(parts[it[2]], bid) for it, bid in keyed} - seen.keys())
        if missing:
            try:
                loaded = self._load_dedup(step.name, missing)
            except UnicodeError:
                keyed, missing = self._drop_unstorable_ids(step, batch, keyed, missing)
                loaded = self._load_dedup(step.name, missing) if missing else {}
            for pk in missing:
                seen[pk] = loaded.get(pk, MISSING)
        now = time.time()
        ttl = d.ttl
        out: list[Item] = []
        for it, bid in keyed:
            s = it[2]
            pk = (parts[s], bid)
            hit = seen[pk]
            if hit is not MISSING and (ttl is None or hit[0] >= now - ttl):
                self.epoch.duplicates += 1
                self.hooks.duplicate(step.name, bid)
                if d.replay_to:
                    self._replays.append((d, s, bid, batch))
                continue
            seen[pk] = (now, None)
            d.new[pk] = (now, (batch.topic, parts[s], batch.offs[s]))
            out.append(it)
        return out

    def _drop_unstorable_ids(
        self,
        step: Step,
        batch: Batch,
        keyed: list[tuple[Item, str]],
        missing: list[tuple[int, str]],
    ) -> tuple[list[tuple[Item, str]], list[tuple[int, str]]]:
        """An id that is not valid text (a lone surrogate from a key function) can never
        be stored or looked up: its record fails at this step, the others go on."""
        bad: dict[str, UnicodeError] = {}
        for _, bid in missing:
            try:
                bid.encode()
            except UnicodeError as exc:
                bad[bid] = exc
        if not bad:
            raise AssertionError("a dedupe id lookup failed on text that encodes")
        kept = []
        for it, bid in keyed:
            err = bad.get(bid)
            if err is None:
                kept.append((it, bid))
            else:
                self._fail(step, batch, it[2], err)
        return kept, [pk for pk in missing if pk[1] not in bad]

    def _first_outputs(
        self, topic: str
    ) -> dict[tuple[str, int, int], list[tuple[str | None, bytes, Any]]]:
        by_src: dict[tuple[str, int, int], list[tuple[str | None, bytes, Any]]] = {}
        for src, t, key, value, headers in self.epoch.captured:
            if t == topic and not (headers and REPLAY_HEADER in headers):
                by_src.setdefault(src, []).append((key, value, headers))
        return by_src

    def _emit_replays(self, batch: Batch) -> None:
        """Answer duplicates with the outputs their first occurrence wrote. They come
        after the batch (a first occurrence earlier in it has its outputs only now) and
        are then put in input order with the other outputs of their topic."""
        firsts: dict[str, dict[tuple[str, int, int], list[tuple[str | None, bytes, Any]]]] = {}
        for d, s, bid, b in self._replays:
            assert d.replay_to is not None
            pk = (b.parts[s], bid)
            pending = d.new.get(pk)
            if pending is not None:
                by_src = firsts.get(d.replay_to)
                if by_src is None:
                    by_src = firsts[d.replay_to] = self._first_outputs(d.replay_to)
                stored = by_src.get(pending[1], [])
            else:
                hit = d.seen.get(pk)
                stored = (
                    [] if hit is MISSING or hit is None or hit[1] is None else load_state(hit[1])
                )
            for key, value, headers in stored:
                h = dict(headers or {})
                h[REPLAY_HEADER] = "1"
                self._emit(d.replay_to, key, value, h, b.tss[s], b.ids[s], b.parts[s], s)
                self.epoch.captured.append(
                    ((b.topic, b.parts[s], b.offs[s]), d.replay_to, key, value, h)
                )
        self._replays = []

    def outcomes(self, d: DedupStep) -> dict[tuple[int, str], bytes | None]:
        """For each new id of a replaying dedupe step, what its first occurrence wrote."""
        if not d.replay_to:
            return {pk: None for pk in d.new}
        by_src = self._first_outputs(d.replay_to)
        return {pk: dump_state(by_src.get(src, [])) for pk, (_, src) in d.new.items()}


def _key(k: Any) -> str:
    return k if isinstance(k, str) else str(k)

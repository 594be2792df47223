"""Keyed state: read through a cache, written to the store only at commit."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ._serde import dump_state

PartKey = tuple[int, str]

MISSING: Any = object()

# Beyond this many cached keys per step, clean entries are dropped after a commit so
# that a state larger than memory stays on disk instead of growing the process.
DEFAULT_CACHE_KEYS = 200_000


class StepState:
    """The state of one stateful step, scoped per (input partition, key)."""

    def __init__(
        self,
        step: str,
        loader: Callable[[str, list[PartKey]], dict[PartKey, Any]],
        cache_keys: int = DEFAULT_CACHE_KEYS,
    ) -> None:
        self.step = step
        self._loader = loader
        self._cache_keys = cache_keys
        self.cache: dict[PartKey, Any] = {}
        self.dirty: set[PartKey] = set()

    def prefetch(self, pks: Iterable[PartKey]) -> None:
        """Load every key of a batch in one query instead of one query per record."""
        cache = self.cache
        missing = [pk for pk in set(pks) if pk not in cache]
        if not missing:
            return
        loaded = self._loader(self.step, missing)
        for pk in missing:
            cache[pk] = loaded.get(pk, MISSING)

    def get(self, pk: PartKey) -> Any:
        hit = self.cache.get(pk, MISSING)
        if hit is MISSING and pk not in self.cache:
            self.prefetch([pk])
            hit = self.cache[pk]
        return hit

    def put(self, pk: PartKey, value: Any) -> None:
        self.cache[pk] = value
        self.dirty.add(pk)

    def drain(self) -> list[tuple[int, str, bytes | None]]:
        """The epoch's changes, serialized: (partition, key, bytes or None for delete)."""
        out = []
        for pk in self.dirty:
            v = self.cache[pk]
            out.append((pk[0], pk[1], None if v is MISSING else dump_state(v)))
        return out

    def committed(self) -> None:
        self.dirty.clear()
        if len(self.cache) > self._cache_keys:
            self.cache.clear()

    def reset(self) -> None:
        """Forget everything: after an abort the store is the only truth."""
        self.cache.clear()
        self.dirty.clear()


class State:
    """The state of one key inside `Stream.process(fn=...)`.

    >>> def count(value, state):
    ...     state.value = (state.value or 0) + 1
    ...     return [state.value]
    """

    __slots__ = ("_pk", "_store")

    def __init__(self, store: StepState) -> None:
        self._store = store
        self._pk: PartKey = (0, "")

    @property
    def key(self) -> str:
        return self._pk[1]

    @property
    def exists(self) -> bool:
        return self._store.get(self._pk) is not MISSING

    @property
    def value(self) -> Any:
        """The key's current value, or None when it has none."""
        v = self._store.get(self._pk)
        return None if v is MISSING else v

    @value.setter
    def value(self, v: Any) -> None:
        self._store.put(self._pk, v)

    def get(self, default: Any = None) -> Any:
        v = self._store.get(self._pk)
        return default if v is MISSING else v

    def set(self, v: Any) -> None:
        self._store.put(self._pk, v)

    def delete(self) -> None:
        self._store.put(self._pk, MISSING)

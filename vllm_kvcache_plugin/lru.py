"""Least recently used first out, within a byte budget: the bookkeeping the hot cache, the disk tier,
the lm server's memory store and its disk spill share (each adds its own locking and what an
eviction means to it: a reference dropped, a file removed, a value spilled)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    """Entries with a cost in bytes, oldest first. Not thread-safe: callers hold their own lock."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        """Keys, least recently used first (a snapshot: safe to change the LRU while iterating)."""
        return iter(list(self._entries))

    def values(self) -> list[V]:
        return [value for value, _ in self._entries.values()]

    def get(self, key: K) -> V | None:
        """The value (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def add(self, key: K, value: V, cost: int) -> tuple[V, int] | None:
        """Insert as the most recently used; returns the (value, cost) it replaced, if any. Does not
        evict: call :meth:`evict` first to make room."""
        old = self.pop(key)
        self._entries[key] = (value, cost)
        self.used += cost
        return old

    def pop(self, key: K) -> tuple[V, int] | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.used -= entry[1]
        return entry

    def pop_oldest(self) -> tuple[K, V, int]:
        key, (value, cost) = self._entries.popitem(last=False)
        self.used -= cost
        return key, value, cost

    def evict(self, incoming: int = 0) -> list[tuple[K, V]]:
        """Remove least recently used entries until ``incoming`` more bytes fit the budget (or none
        is left); returns them, oldest first, for the caller to dispose of."""
        evicted = []
        while self._entries and self.used + incoming > self.budget:
            key, value, _ = self.pop_oldest()
            evicted.append((key, value))
        return evicted

    def clear(self) -> list[V]:
        values = self.values()
        self._entries.clear()
        self.used = 0
        return values

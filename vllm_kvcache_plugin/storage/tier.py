"""The interface every storage tier implements (hot CPU cache, local disk, remote), so the manager
searches, fills and writes them in order without knowing which is which.

A tier answers for many keys at once (the remote one in one round trip). Gets are synchronous
today; :meth:`Tier.start_get_many` is the seam for asynchronous loads: it returns a future, and a
tier that can overlap its I/O with the caller's work overrides it.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future
from typing import ClassVar

from ..memory import ChunkMeta, MemoryObj
from ..metrics import TierCounters


class TierName(str, enum.Enum):
    """Where a chunk was found; also the order tiers are searched in."""

    HOT = "hot"
    DISK = "disk"
    REMOTE = "remote"

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


class Tier(ABC):
    name: ClassVar[TierName]
    #: Puts happen in the caller's thread at once (no I/O: the hot cache); otherwise the manager's
    #: writer thread makes them, so vLLM's forward never waits on a disk or a network.
    writes_inline: ClassVar[bool] = False
    #: A hit in a tier below this one is copied into it (the hot cache keeps what was just loaded).
    promotes: ClassVar[bool] = False
    counters: TierCounters

    @abstractmethod
    def lookup(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key is held (the remote tier: one batched round trip, or none)."""

    @abstractmethod
    def get_many(self, keys: Sequence[str], expected: ChunkMeta | None = None,
                 defer_check: bool = False) -> list[MemoryObj | None]:
        """Each key's chunk (a reference the caller drops) or None: missing, corrupt, foreign, or failed.
        ``defer_check``: a chunk that is a view of the stored bytes may come with its payload checksum
        still to verify (``MemoryObj.check``, which the caller runs before it reads the bytes); a
        failed check is this tier's to count and forget."""

    def start_get_many(self, keys: Sequence[str], expected: ChunkMeta | None = None) -> Future:
        """:meth:`get_many` as a future (done at once here; tiers with real I/O may overlap it)."""
        future: Future = Future()
        try:
            future.set_result(self.get_many(keys, expected))
        except BaseException as exc:  # pragma: no cover - get_many turns failures into misses
            future.set_exception(exc)
        return future

    @abstractmethod
    def put_many(self, items: Sequence[tuple[str, MemoryObj]]) -> bool:
        """Store every item (the caller keeps its references); False when the tier refused them."""

    def receive_sizes(self, expected: ChunkMeta) -> list[int]:
        """Sizes of the pooled buffers a load of this geometry receives into (to pre-warm them)."""
        return []

    def prewarm(self, expected: ChunkMeta) -> None:  # noqa: B027 - optional hook
        """One-time set-up a first load of this geometry would otherwise pay (at start-up)."""

    @property
    def bytes_used(self) -> int:
        return 0

    def stats(self) -> dict[str, object]:
        return {**self.counters.snapshot(), "bytes_used": self.bytes_used}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the tier holds (connections, cached chunks)."""

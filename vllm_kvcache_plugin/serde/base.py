"""The serde interface: a chunk (MemoryObj) to self-describing bytes and back."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from ..memory import Allocator, ChunkMeta, MemoryObj


class Serde(ABC):
    """Serializers are stateless apart from settings; one instance serves every thread."""

    name: ClassVar[str]
    serde_id: ClassVar[int]

    def __init__(self, allocator: Allocator | None = None, **options) -> None:
        self.allocator = allocator or Allocator()

    @abstractmethod
    def serialize(self, obj: MemoryObj) -> bytes | bytearray | memoryview:
        """Header + payload in one buffer (so a store never holds half a value)."""

    @abstractmethod
    def deserialize(self, data, expected: ChunkMeta | None = None, defer_check: bool = False) -> MemoryObj:
        """Check and decode; raise CorruptValueError on any mismatch (including ``expected``).

        ``defer_check``: a serde whose chunk is a view of the payload may leave the payload checksum
        to :meth:`MemoryObj.check` (the header is checked now); one that decodes checks at once."""

    def deserialize_block(self, data: memoryview, block, expected: ChunkMeta | None = None,
                          defer_check: bool = False) -> MemoryObj:
        """:meth:`deserialize` a value received into ``block`` (a pooled uint8 tensor from the
        allocator; ``data`` is a view of it). The block goes back to the pool once nothing needs
        it: here, after decoding; serdes whose chunk is a view of the bytes keep it instead."""
        try:
            return self.deserialize(data, expected, defer_check)
        finally:
            self.allocator.recycle(block)

    def prewarm(self, expected: ChunkMeta) -> None:  # noqa: B027 - optional hook
        """Do the serde's one-time set-up for chunks like ``expected`` (a coder to build, its tables)
        now, at start-up, rather than in a restart's first load. Nothing to do by default."""

    @staticmethod
    def check_expected(meta: ChunkMeta, expected: ChunkMeta | None) -> None:
        """Raise CorruptValueError if a stored chunk cannot stand for ``expected``
        (another model, dtype or layout wrote the same key)."""
        from ..errors import CorruptValueError

        if expected is not None and not meta.fits(expected):
            raise CorruptValueError(f"stored chunk {meta.fmt.name}/{meta.dtype}/{meta.shape} does not fit "
                                    f"{expected.fmt.name}/{expected.dtype}/{expected.shape} (another model or dtype?)")

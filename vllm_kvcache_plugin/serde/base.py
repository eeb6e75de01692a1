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
    def deserialize(self, data, expected: ChunkMeta | None = None) -> MemoryObj:
        """Check and decode; raise CorruptValueError on any mismatch (including ``expected``)."""

    @staticmethod
    def check_expected(meta: ChunkMeta, expected: ChunkMeta | None) -> None:
        from ..errors import CorruptValueError

        if expected is None:
            return
        if meta.fmt != expected.fmt or meta.dtype != expected.dtype:
            raise CorruptValueError(f"stored chunk is {meta.fmt.name}/{meta.dtype}, expected "
                                    f"{expected.fmt.name}/{expected.dtype} (another model or dtype?)")
        # Token count may differ (partial chunks); every other axis must match.
        if meta.shape[:2] != expected.shape[:2] or meta.shape[3:] != expected.shape[3:]:
            raise CorruptValueError(f"stored chunk shape {meta.shape} does not fit {expected.shape}")

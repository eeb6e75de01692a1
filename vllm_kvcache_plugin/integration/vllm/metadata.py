"""The per-step plan the scheduler hands to the workers: the only thing that crosses between them.

Chunks travel as ``(start, end, chunk_hash)``: the hash is rank independent, and each worker turns it
into its own key (which carries its tensor-parallel rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

ChunkRef = tuple[int, int, str]  # (start token, end token, chunk hash hex)


@dataclass
class LoadSpec:
    """Load tokens ``[start, end)`` of a request into its blocks, before this step's forward."""

    req_id: str
    start: int
    end: int
    chunks: list[ChunkRef]  # the stored chunks overlapping [start, end), in order
    block_ids: list[int]  # the request's blocks, covering at least [0, end)


@dataclass
class SaveSpec:
    """Gather and store these whole chunks of a request after this step's forward."""

    req_id: str
    chunks: list[ChunkRef]
    block_ids: list[int]


@dataclass
class StepMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not self.loads and not self.saves

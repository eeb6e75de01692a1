"""The per-step plan the scheduler hands to the workers: the only thing that crosses between them.

Chunks travel as :class:`~vllm_kvcache_plugin.keys.ChunkRef` (start, end, chunk hash): the hash is rank
independent, and each worker turns it into its own key (which carries its rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from ...keys import ChunkRef

__all__ = ["ChunkRef", "LoadSpec", "SaveSpec", "StepMetadata"]


@dataclass(frozen=True)
class LoadSpec:
    """Load tokens ``[start, end)`` of a request into its blocks: before this step's forward, or in
    the background (``asynchronous``: vLLM holds the request until the worker reports it finished)."""

    req_id: str
    start: int
    end: int
    chunks: tuple[ChunkRef, ...]  # the stored chunks overlapping [start, end), in order
    block_ids: tuple[int, ...]  # the request's blocks, covering at least [0, end)
    asynchronous: bool = False


@dataclass(frozen=True)
class SaveSpec:
    """Gather and store these whole chunks of a request after this step's forward."""

    req_id: str
    chunks: tuple[ChunkRef, ...]
    block_ids: tuple[int, ...]


@dataclass
class StepMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    #: Requests whose asynchronous load is to stop (aborted while loading): the worker drops what
    #: is left of it and reports it finished, so vLLM frees its blocks.
    cancelled: set[str] = field(default_factory=set)
    #: No request computes in this step: waiting here for a background load costs no one.
    idle: bool = False

    def is_empty(self) -> bool:
        return not self.loads and not self.saves and not self.cancelled

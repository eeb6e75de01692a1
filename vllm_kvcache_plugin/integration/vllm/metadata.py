"""The per-step plan the scheduler hands to the workers: the only thing that crosses between them.

Chunks travel as :class:`~vllm_kvcache_plugin.keys.ChunkRef` (start, end, chunk hash): the hash is rank
independent, and each worker turns it into its own key (which carries its rank). Block ids travel
per KV-cache group (one tuple per group, in vLLM's group order; one group unless vLLM's hybrid
KV-cache manager splits the model's layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from ...keys import ChunkRef

__all__ = ["BlockIds", "ChunkRef", "LoadSpec", "SaveSpec", "StepMetadata"]

BlockIds = tuple[tuple[int, ...], ...]  # per KV-cache group: the request's blocks


@dataclass(frozen=True)
class LoadSpec:
    """Load tokens ``[start, end)`` of a request into its blocks: before this step's forward, or in
    the background (``asynchronous``: vLLM holds the request until the worker reports it finished)."""

    req_id: str
    start: int
    end: int
    chunks: tuple[ChunkRef, ...]  # the stored chunks overlapping [start, end), in order
    block_ids: BlockIds  # the request's blocks per group, covering at least [0, end) (0: the null block)
    asynchronous: bool = False


@dataclass(frozen=True)
class SaveSpec:
    """Gather and store these whole chunks of a request after this step's forward."""

    req_id: str
    chunks: tuple[ChunkRef, ...]
    block_ids: BlockIds
    #: Tokens computed before this step: a sliding window's blocks below it may be gone already.
    computed_before: int = 0


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

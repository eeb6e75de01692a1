"""Chunk keys: ``vllm@<model>@<world_size>@<rank>@<chained sha256 hex>``.

The hash of chunk *i* covers every token before and in it (it chains the hash of chunk *i-1*), so a
key names a whole prefix. It is computed with SHA-256 over little-endian uint32 token ids, so the
same tokens give the same key in every process and on every machine (no PYTHONHASHSEED, no pickle).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

KEY_FORMAT = "vllm"
_SEP = "@"
# Domain separation: a store shared with other software cannot collide with these hashes.
_ROOT_HASH = hashlib.sha256(b"vllm-kvcache-plugin/chunk-hash/v1").digest()


def _escape(text: str) -> str:
    return text.replace("%", "%25").replace("@", "%40")


def _unescape(text: str) -> str:
    return text.replace("%40", "@").replace("%25", "%")


@dataclass(frozen=True)
class ChunkKey:
    """Identity of one stored chunk. ``str(key)`` is what the stores see."""

    fmt: str
    model: str
    world_size: int
    rank: int
    chunk_hash: str

    def to_string(self) -> str:
        return _SEP.join(
            (self.fmt, _escape(self.model), str(self.world_size), str(self.rank), self.chunk_hash)
        )

    __str__ = to_string

    @classmethod
    def from_string(cls, text: str) -> ChunkKey:
        parts = text.split(_SEP)
        if len(parts) != 5:
            raise ValueError(f"not a chunk key (want fmt@model@world_size@rank@hash): {text!r}")
        fmt, model, world_size, rank, chunk_hash = parts
        try:
            return cls(fmt, _unescape(model), int(world_size), int(rank), chunk_hash)
        except ValueError:
            raise ValueError(f"not a chunk key (world_size and rank must be integers): {text!r}") from None


@dataclass(frozen=True)
class ChunkSpan:
    """One chunk of a token sequence: tokens ``[start, end)`` and its key string."""

    start: int
    end: int
    key: str

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def chained_hashes(token_ids: Sequence[int] | np.ndarray, chunk_size: int,
                   include_partial: bool = True) -> list[tuple[int, int, str]]:
    """``(start, end, hex)`` for every chunk; the last one may be partial if ``include_partial``."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    tokens = np.asarray(token_ids, dtype=np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**32):
        raise ValueError("token ids must fit in uint32")
    data = tokens.astype("<u4").tobytes()
    out: list[tuple[int, int, str]] = []
    parent = _ROOT_HASH
    n = len(tokens)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        if end - start < chunk_size and not include_partial:
            break
        digest = hashlib.sha256(parent + data[start * 4 : end * 4]).digest()
        out.append((start, end, digest.hex()))
        parent = digest
    return out


@dataclass(frozen=True)
class KeyBuilder:
    """Turns token ids into chunk spans for one (model, world_size, rank)."""

    model: str
    world_size: int
    rank: int
    chunk_size: int

    def key(self, chunk_hash: str) -> str:
        return ChunkKey(KEY_FORMAT, self.model, self.world_size, self.rank, chunk_hash).to_string()

    def spans(self, token_ids: Sequence[int] | np.ndarray, include_partial: bool = True) -> list[ChunkSpan]:
        return [
            ChunkSpan(start, end, self.key(h))
            for start, end, h in chained_hashes(token_ids, self.chunk_size, include_partial)
        ]

"""Chunk keys: ``vllm@<model>@<world_size>@<rank>@<chained sha256 hex>``.

The hash of chunk *i* covers every token before and in it (it chains the hash of chunk *i-1*), so a
key names a whole prefix. It is computed with SHA-256 over little-endian uint32 token ids, so the
same tokens give the same key in every process and on every machine (no PYTHONHASHSEED, no pickle).

Token ids are not all that decides K/V. What else does (vLLM hashes the same into its own block
hashes) enters the chain in two places, so that a request never gets KV computed for other inputs:

* the chain's **root**, from a :class:`KeyScope`: what holds for the whole request (a LoRA adapter's
  name and path, a ``cache_salt``, instance settings that change K/V for the same weights). An
  empty scope keeps the plain root, so a plain request's keys never change;
* each chunk's **extra** bytes (multimodal items and prompt embeddings inside the chunk), hashed
  after the chunk's tokens behind a marker no token id can spell.

Only digests of these inputs reach a key: a salt, a path or an image never appears in clear text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

KEY_FORMAT = "vllm"
_SEP = "@"
# Domain separation: a store shared with other software cannot collide with these hashes.
ROOT_HASH = hashlib.sha256(b"vllm-kvcache-plugin/chunk-hash/v1").digest()
# Token ids are hashed as uint32 and must stay below this: 0xFFFFFFFF spells the extra-bytes marker.
MAX_TOKEN_ID = 2**32 - 2
_EXTRA_MARKER = b"\xff" * 8
# Between a chunk's hash and the name of a part of it; never in a hex hash, never escaped.
PART_SEP = "~"


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


def model_prefix(model: str | None = None) -> str:
    """What every chunk key of ``model`` starts with (of any model when None): what a listing or a
    purge of one model asks the store for. The trailing separator keeps "m" from matching "m-2"."""
    if model is None:
        return KEY_FORMAT + _SEP
    return _SEP.join((KEY_FORMAT, _escape(model), ""))


@dataclass(frozen=True)
class ChunkRef:
    """One chunk of a prompt: tokens ``[start, end)`` and its chained hash (hex). The hash is the
    same for every worker; each one turns it into its own key (which names its rank)."""

    start: int
    end: int
    chunk_hash: str

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    def overlaps(self, start: int, end: int) -> bool:
        return self.end > start and self.start < end


def _field(data: bytes) -> bytes:
    """Length-prefixed, so that no two different field lists hash the same bytes."""
    return len(data).to_bytes(8, "little") + data


@dataclass(frozen=True)
class KeyScope:
    """The inputs besides token ids that hold for a whole request and change its K/V.

    ``adapter``: a LoRA adapter's (name, path): both, because vLLM lets a name be re-pointed at
    another adapter. ``cache_salt``: the OpenAI API's per-tenant salt (its own key space, so one
    tenant cannot probe another's prompts by timing). ``variant``: instance settings that change K/V
    for the same weights (e.g. on-the-fly weight quantization), as ``(name, value)`` pairs.
    """

    adapter: tuple[str, str] | None = None
    cache_salt: str | None = None
    variant: tuple[tuple[str, str], ...] = ()

    @property
    def is_plain(self) -> bool:
        return self.adapter is None and not self.cache_salt and not self.variant

    def root(self) -> bytes:
        if self.is_plain:
            return ROOT_HASH
        parts = [ROOT_HASH, b"scope/v1"]
        if self.adapter is not None:
            parts += [b"lora", _field(self.adapter[0].encode()), _field(self.adapter[1].encode())]
        if self.cache_salt:
            parts += [b"salt", _field(self.cache_salt.encode())]
        for name, value in self.variant:
            parts += [b"variant", _field(name.encode()), _field(value.encode())]
        return hashlib.sha256(b"".join(parts)).digest()


def chained_hashes(token_ids: Sequence[int] | np.ndarray, chunk_size: int, include_partial: bool = True,
                   root: bytes = ROOT_HASH,
                   chunk_extra: Callable[[int, int], bytes | None] | None = None) -> list[ChunkRef]:
    """A :class:`ChunkRef` for every chunk; the last one may be partial if ``include_partial``.

    ``root`` starts the chain (:meth:`KeyScope.root`); ``chunk_extra(start, end)`` returns bytes that
    also decide the chunk's K/V (multimodal items, prompt embeddings in it) or None."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    tokens = np.asarray(token_ids, dtype=np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() > MAX_TOKEN_ID):
        raise ValueError(f"token ids must be in 0..{MAX_TOKEN_ID}")
    data = tokens.astype("<u4").tobytes()
    out: list[ChunkRef] = []
    parent = root
    n = len(tokens)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        if end - start < chunk_size and not include_partial:
            break
        extra = chunk_extra(start, end) if chunk_extra is not None else None
        tail = _EXTRA_MARKER + hashlib.sha256(extra).digest() if extra else b""
        digest = hashlib.sha256(parent + data[start * 4 : end * 4] + tail).digest()
        out.append(ChunkRef(start, end, digest.hex()))
        parent = digest
    return out


@dataclass(frozen=True)
class KeyBuilder:
    """Turns chunk hashes into the keys of one (model, world_size, rank)."""

    model: str
    world_size: int
    rank: int

    def key(self, chunk_hash: str, part: str = "") -> str:
        """The key of a chunk, or of one ``part`` of it (a hybrid model stores its full-attention
        and sliding-window layers as separate values: ``<hash>~attn``, ``<hash>~swa128``)."""
        name = f"{chunk_hash}{PART_SEP}{part}" if part else chunk_hash
        return ChunkKey(KEY_FORMAT, self.model, self.world_size, self.rank, name).to_string()

    @property
    def pattern(self) -> str:
        """What this worker's keys look like, for logs."""
        return self.key("<hash>")

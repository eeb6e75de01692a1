"""The naive serde: header + the raw tensor bytes. One copy each way, no loss."""

from __future__ import annotations

from ..memory import ChunkMeta, MemoryObj, bytes_tensor, tensor_bytes
from .base import Serde
from .header import HEADER_SIZE, PayloadCheck, pack_header, parse_header


class NaiveSerde(Serde):
    name = "naive"
    serde_id = 0

    def serialize(self, obj: MemoryObj) -> bytearray:
        assert obj.tensor is not None, "serialize of a freed chunk"
        payload = tensor_bytes(obj.tensor.cpu())
        out = bytearray(HEADER_SIZE + payload.nbytes)
        out[HEADER_SIZE:] = payload
        out[:HEADER_SIZE] = pack_header(self.serde_id, obj.meta, payload, slab_bytes(obj.meta))
        return out

    def deserialize(self, data, expected: ChunkMeta | None = None, defer_check: bool = False) -> MemoryObj:
        meta, payload, check = self._check(data, expected, defer_check)
        return _deferred(self.allocator.allocate(meta, bytes_tensor(payload, meta.dtype, meta.shape)), check)

    def deserialize_block(self, data: memoryview, block, expected: ChunkMeta | None = None,
                          defer_check: bool = False) -> MemoryObj:
        """The chunk is a view of the received bytes: it owns ``block`` (recycled when it is freed)."""
        try:
            meta, payload, check = self._check(data, expected, defer_check)
        except Exception:
            self.allocator.recycle(block)
            raise
        return _deferred(self.allocator.allocate(meta, bytes_tensor(payload, meta.dtype, meta.shape), block=block),
                         check)

    def max_value_size(self, expected: ChunkMeta) -> int:
        """The largest value a chunk of ``expected``'s geometry can have (receive buffers)."""
        return HEADER_SIZE + expected.nbytes

    def _check(self, data, expected: ChunkMeta | None,
               defer_check: bool) -> tuple[ChunkMeta, memoryview, PayloadCheck | None]:
        """The header's meta and the payload; the payload checksum still to verify (None: verified)."""
        header, payload = parse_header(data, expected_serde_id=self.serde_id, verify=not defer_check)
        meta = header.meta
        self.check_expected(meta, expected)
        if payload.nbytes != meta.nbytes:
            from ..errors import CorruptValueError

            raise CorruptValueError(f"naive payload {payload.nbytes} bytes != {meta.nbytes} for {meta.shape}")
        return meta, payload, PayloadCheck(payload, header.payload_checksum, header.checksum_segment) \
            if defer_check else None


def slab_bytes(meta: ChunkMeta) -> int:
    """The checksum segment of a naive payload: one ``(kv, layer)`` slab of the chunk, the piece a
    CPU scatter hashes just before it copies it (serde/header.py)."""
    slabs = meta.shape[0] * meta.shape[1]
    return meta.nbytes // slabs if slabs and meta.nbytes % slabs == 0 else 0


def _deferred(obj: MemoryObj, check: PayloadCheck | None) -> MemoryObj:
    """The chunk (a view of the payload) with its payload checksum left to ``obj.check()``."""
    return obj if check is None else obj.defer_check(check)

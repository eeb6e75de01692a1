"""The header and the naive serde: exact round trips, every corruption detected."""

from __future__ import annotations

import pytest
import torch

from vllm_kvcache_plugin.errors import CorruptValueError
from vllm_kvcache_plugin.memory import Allocator, ChunkMeta, KVFormat
from vllm_kvcache_plugin.serde import create_serde
from vllm_kvcache_plugin.serde.header import HEADER_SIZE


def _chunk(dtype=torch.bfloat16, shape=(2, 3, 16, 2, 8), fmt=KVFormat.KV):
    alloc = Allocator()
    return alloc.allocate(ChunkMeta(fmt, dtype, shape), torch.randn(shape).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_bit_exact(dtype):
    serde = create_serde("naive")
    obj = _chunk(dtype)
    data = serde.serialize(obj)
    assert len(data) == HEADER_SIZE + obj.nbytes
    back = serde.deserialize(bytes(data))
    assert back.meta == obj.meta
    assert torch.equal(back.tensor.view(torch.uint8), obj.tensor.view(torch.uint8))


def test_mla_and_fp8_round_trip():
    serde = create_serde("naive")
    obj = _chunk(torch.float32, (1, 4, 5, 1, 12), KVFormat.MLA)
    assert torch.equal(serde.deserialize(serde.serialize(obj)).tensor, obj.tensor)
    raw = Allocator().wrap(torch.randint(0, 255, (2, 2, 3, 1, 4), dtype=torch.uint8))
    assert torch.equal(serde.deserialize(serde.serialize(raw)).tensor, raw.tensor)


def test_every_flipped_byte_is_detected():
    serde = create_serde("naive")
    data = bytes(serde.serialize(_chunk(shape=(2, 1, 4, 1, 4))))
    for pos in range(len(data)):
        corrupt = bytearray(data)
        corrupt[pos] ^= 0x10
        with pytest.raises(CorruptValueError):
            serde.deserialize(bytes(corrupt))


@pytest.mark.parametrize("cut", [0, 1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 7, -1])
def test_truncation_is_detected(cut):
    serde = create_serde("naive")
    data = bytes(serde.serialize(_chunk()))
    with pytest.raises(CorruptValueError):
        serde.deserialize(data[:cut])


def test_foreign_value_is_detected():
    serde = create_serde("naive")
    with pytest.raises(CorruptValueError, match="magic"):
        serde.deserialize(b"x" * 200)
    obj = _chunk(torch.float32)
    data = serde.serialize(obj)
    other_dtype = ChunkMeta(KVFormat.KV, torch.bfloat16, obj.meta.shape)
    with pytest.raises(CorruptValueError, match="another model or dtype"):
        serde.deserialize(data, other_dtype)
    other_model = ChunkMeta(KVFormat.KV, torch.float32, (2, 30, 16, 2, 8))
    with pytest.raises(CorruptValueError):
        serde.deserialize(data, other_model)


def test_refcount_frees_once():
    alloc = Allocator()
    obj = alloc.wrap(torch.zeros(2, 1, 1, 1, 1))
    obj.ref_up()
    obj.ref_down()
    assert alloc.frees == 0
    obj.ref_down()
    assert (alloc.allocations, alloc.frees, alloc.live) == (1, 1, 0)
    with pytest.raises(RuntimeError):
        obj.ref_down()

"""The header and the naive serde: exact round trips, every corruption detected."""

from __future__ import annotations

import struct

import pytest
import torch
import xxhash

from vllm_kvcache_plugin.errors import CorruptValueError
from vllm_kvcache_plugin.memory import Allocator, ChunkMeta, KVFormat
from vllm_kvcache_plugin.serde import create_serde
from vllm_kvcache_plugin.serde.header import HEADER_SIZE, PayloadCheck, parse_header, segment_digests


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


def _as_version_1(data: bytes) -> bytes:
    """The same chunk as a build before the segmented checksum wrote it (version 1, whole-payload xxh3)."""
    out = bytearray(data)
    out[4] = 1
    out[28:32] = b"\0\0\0\0"
    out[40:48] = struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(out[HEADER_SIZE:])))
    out[48:56] = struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(out[:48])))
    return bytes(out)


def test_naive_checksum_is_over_the_chunks_slabs_and_version_1_is_still_read():
    serde = create_serde("naive")
    obj = _chunk(shape=(2, 3, 16, 2, 8))
    data = bytes(serde.serialize(obj))
    header, payload = parse_header(data)
    slab = obj.nbytes // 6
    assert header.checksum_segment == slab
    check = PayloadCheck(payload, header.payload_checksum, slab)
    assert check() and check.matches(segment_digests(payload, slab))
    assert not check.matches(segment_digests(payload, slab // 2))
    old = _as_version_1(data)
    assert parse_header(old)[0].checksum_segment == 0
    assert torch.equal(serde.deserialize(old).tensor, obj.tensor)
    deferred = serde.deserialize(old, defer_check=True)
    assert deferred.deferred_check is not None and deferred.check()
    # A version-1 header naming a segment was never written: refused, not guessed at.
    forged = bytearray(old)
    forged[28] = 1
    forged[48:56] = struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(forged[:48])))
    with pytest.raises(CorruptValueError, match="version 1 is not supported"):
        serde.deserialize(bytes(forged))


def test_deferred_segmented_check_catches_a_flip_in_any_slab():
    serde = create_serde("naive")
    obj = _chunk(shape=(2, 3, 16, 2, 8))
    data = bytes(serde.serialize(obj))
    for slab in range(6):
        corrupt = bytearray(data)
        corrupt[HEADER_SIZE + slab * (obj.nbytes // 6) + 5] ^= 1
        hits: list[int] = []
        back = serde.deserialize(bytes(corrupt), defer_check=True).on_corrupt(lambda seen=hits: seen.append(1))
        assert not back.check() and hits == [1]


def test_what_waits_for_a_deferred_check_runs_once_it_passes_and_never_otherwise():
    """``after_check`` (the hot cache's promotion) runs at once on a checked chunk, after a deferred
    check that passes, and not at all after one that fails or on a spent chunk (one whose values
    went elsewhere: its tensor is gone, and nothing may take it)."""
    serde = create_serde("naive")
    obj = _chunk(shape=(2, 3, 16, 2, 8))
    data = bytes(serde.serialize(obj))
    corrupt = bytearray(data)
    corrupt[-3] ^= 1
    ran: list[str] = []
    obj.after_check(lambda o: ran.append("checked"))
    good = serde.deserialize(data, defer_check=True).after_check(lambda o: ran.append("good"))
    bad = serde.deserialize(bytes(corrupt), defer_check=True).after_check(lambda o: ran.append("bad"))
    spent = serde.deserialize(data, defer_check=True).after_check(lambda o: ran.append("spent"))
    assert ran == ["checked"]
    assert good.check() and not bad.check()
    spent.spend()
    assert ran == ["checked", "good"] and good.check() and ran == ["checked", "good"]
    assert spent.tensor is None and spent.checked
    with pytest.raises(RuntimeError, match="spent"):
        spent.ref_up()
    for chunk in (obj, good, bad, spent):
        chunk.ref_down()

"""A CacheGen decode written straight into vLLM's paged blocks (a ChunkPlacement), one pass.

The reference is the two-pass load it replaces: decode into a chunk, then the copier's scatter. Both
must leave every byte of the paged layers the same, for each layout and CPU packing, for whole and
partial chunks, and a corrupt stream must be reported, never taken for a load.
"""

from __future__ import annotations

import pytest
import torch

from vllm_kvcache_plugin.errors import CorruptValueError
from vllm_kvcache_plugin.kernels import PagedKVSpec, TorchCopier, allocate_paged_layers, get_copier
from vllm_kvcache_plugin.memory import Allocator, ChunkMeta, KVFormat
from vllm_kvcache_plugin.serde.cachegen import CacheGenSerde, PendingDecode, codec
from vllm_kvcache_plugin.serde.header import HEADER_SIZE, pack_header, parse_header

cpp = pytest.importorskip("vllm_kvcache_plugin.serde.cachegen.rans_cpp")

NUM_BLOCKS = 24


def kv(shape, dtype, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(shape[0], shape[1], 1, shape[3], shape[4], generator=g) * 4 + 0.1
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def slots_of(blocks: list[int], block_size: int, first: int, last: int) -> torch.Tensor:
    positions = torch.arange(first, last)
    return torch.as_tensor(blocks)[positions // block_size] * block_size + positions % block_size


def encoded(serde: CacheGenSerde, x: torch.Tensor, fmt=KVFormat.KV) -> bytearray:
    return serde.serialize(Allocator().wrap(x.clone(), fmt))


# (kind, block size, heads, head size, packing, layout): vLLM's CPU layout with both of its
# packings, GPU layouts (plain), groups of lanes that span two rows (heads * size not a multiple
# of 64), MLA.
CASES = [
    ("mha", 16, 3, 64, "cpu_vec", "LBHNC"),
    ("mha", 64, 3, 64, "cpu_vec", "LBHNC"),  # whole 32-token tiles: streamed a cache line a lane
    ("mha", 32, 2, 64, "cpu_amx", "LBHNC"),
    ("mha", 16, 2, 32, "plain", "LBNHC"),
    ("mha", 16, 3, 20, "plain", "BLNHC"),
    ("mha", 8, 1, 24, "cpu_vec", "LBHNC"),
    ("mla", 16, 1, 72, "plain", "LBHNC"),
]


# cpu_amx packing is defined for 2-byte dtypes only.
PARAMS = [pytest.param(case, dtype, id=f"{case[0]}-{case[4]}-{case[5]}-h{case[2]}d{case[3]}-{str(dtype)[6:]}")
          for case in CASES for dtype in (torch.bfloat16, torch.float32)
          if case[4] != "cpu_amx" or dtype == torch.bfloat16]


@pytest.mark.parametrize("case, dtype", PARAMS)
def test_a_placed_decode_writes_what_decode_then_scatter_writes(case, dtype, cpp_lib):
    kind, block, heads, size, packing, layout = case
    spec = PagedKVSpec(kind, block, heads, size, dtype, packing)
    layers, tokens = 3, 72
    shape = spec.chunk_shape(layers, tokens)
    fmt = KVFormat.MLA if kind == "mla" else KVFormat.KV
    blocks = [7, 2, 19, 11, 4, 15, 21, 9, 13, 17][: -(-tokens // block)]
    copier = get_copier(spec, torch.device("cpu"))
    for locality, exact in ((0, 1), (4, 3)):
        serde = CacheGenSerde(locality=locality, exact_tokens=exact)
        data = encoded(serde, kv(shape, dtype, seed=block + heads), fmt)
        decoded = serde.deserialize(data)
        for first, last in ((0, tokens), (5, 33), (3, 70), (32, 64), (0, 1), (tokens - 1, tokens)):
            slots = slots_of(blocks, block, first, last)
            want = allocate_paged_layers(spec, layout, layers, NUM_BLOCKS)
            got = allocate_paged_layers(spec, layout, layers, NUM_BLOCKS)
            for layer in want + got:
                layer.view(torch.uint8).fill_(0xA5)  # untouched bytes must stay as they were
            copier.scatter(want, spec, slots, decoded.tensor[:, :, first:last])
            obj = serde.deserialize(data, defer_check=True)
            assert isinstance(obj.deferred_check, PendingDecode)
            assert obj.deferred_check.place(copier.placement(got, spec, slots, tokens, first)) is True
            obj.spend()
            assert obj.tensor is None and obj.checked
            obj.ref_down()
            for index, (a, b) in enumerate(zip(want, got, strict=True)):
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (locality, first, last, index)


def test_the_portable_decoder_places_the_same_bytes(cpp_lib):
    """The scalar build (no AVX2) writes through a placement the same way."""
    portable = cpp.CppCoder(cpp.build_library(cpp.PORTABLE), 2)
    spec = PagedKVSpec("mha", 16, 3, 64, torch.bfloat16, "cpu_vec")
    shape = spec.chunk_shape(2, 48)
    serde = CacheGenSerde()
    data = encoded(serde, kv(shape, torch.bfloat16, seed=3))
    _, payload = parse_header(data)
    plan, coded, step, exact = codec.parse_payload(payload, shape, "cpu", torch.bfloat16)
    copier = get_copier(spec, torch.device("cpu"))
    slots = slots_of([3, 9, 1], 16, 0, 48)
    native = allocate_paged_layers(spec, "LBHNC", 2, 12)
    scalar = allocate_paged_layers(spec, "LBHNC", 2, 12)
    for layers, coder in ((native, serde.coder), (scalar, portable)):
        coder.run(coder.prepare(coded, plan, step), placement=copier.placement(layers, spec, slots, 48), exact=exact)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(native, scalar, strict=True))


def test_a_deferred_decode_called_fills_the_chunk_and_is_not_a_view_of_the_bytes(cpp_lib):
    x = kv((2, 3, 40, 2, 32), torch.bfloat16, seed=5)
    alloc = Allocator()
    serde = CacheGenSerde(alloc)
    data = encoded(serde, x)
    meta = ChunkMeta(KVFormat.KV, x.dtype, tuple(x.shape))
    at_once = serde.deserialize(data, meta)
    received = bytearray(data)
    deferred = serde.deserialize(memoryview(received), meta, defer_check=True)
    assert not deferred.checked
    received[HEADER_SIZE:] = bytes(len(received) - HEADER_SIZE)  # the receive buffer reused meanwhile
    assert deferred.check() and deferred.checked
    assert torch.equal(deferred.tensor, at_once.tensor)


def test_what_cannot_wait_decodes_at_once(cpp_lib):
    """fp16 (the native decoder writes it through fp32) and the numpy coder have no deferred decode."""
    for dtype, backend in ((torch.float16, "cpp"), (torch.bfloat16, "numpy")):
        serde = CacheGenSerde(backend=backend)
        obj = serde.deserialize(encoded(serde, kv((2, 2, 16, 1, 16), dtype)), defer_check=True)
        assert obj.checked and obj.tensor is not None


def _forge_body(data: bytes, mutate) -> bytearray:
    """The value with its payload mutated behind a recomputed (valid) header."""
    header, payload = parse_header(data)
    body = bytearray(payload)
    mutate(body)
    return bytearray(pack_header(1, header.meta, body)) + body


def test_a_corrupt_stream_found_by_a_placed_decode_is_reported(cpp_lib):
    """Behind a valid header the payload passes its checksum: the decoder's own end-of-lane checks
    find the damage. place() says False (the caller reports the blocks); the plain call too."""
    spec = PagedKVSpec("mha", 16, 2, 32, torch.bfloat16, "cpu_vec")
    shape = spec.chunk_shape(2, 32)
    serde = CacheGenSerde()
    data = _forge_body(encoded(serde, kv(shape, torch.bfloat16, seed=8)),
                       lambda body: body.__setitem__(len(body) - 7, body[len(body) - 7] ^ 0x5A))
    layers = allocate_paged_layers(spec, "LBHNC", 2, 8)
    placement = get_copier(spec, torch.device("cpu")).placement(layers, spec, slots_of([1, 5], 16, 0, 32), 32)
    corrupt = []
    obj = serde.deserialize(data, defer_check=True).on_corrupt(lambda: corrupt.append(1))
    assert obj.deferred_check.place(placement) is False
    assert obj.check() is False and corrupt == [1]
    with pytest.raises(CorruptValueError):
        serde.deserialize(data)


def test_a_placement_for_another_chunk_writes_nothing(cpp_lib):
    spec = PagedKVSpec("mha", 16, 2, 32, torch.bfloat16, "cpu_vec")
    serde = CacheGenSerde()
    obj = serde.deserialize(encoded(serde, kv(spec.chunk_shape(2, 32), torch.bfloat16)), defer_check=True)
    copier = get_copier(spec, torch.device("cpu"))
    longer = allocate_paged_layers(spec, "LBHNC", 2, 8)
    fp32 = PagedKVSpec("mha", 16, 2, 32, torch.float32, "cpu_vec")
    other_dtype = allocate_paged_layers(fp32, "LBHNC", 2, 8)
    before = [layer.clone() for layer in longer]
    assert obj.deferred_check.place(copier.placement(longer, spec, slots_of([1, 2, 3], 16, 0, 48), 48)) is None
    assert obj.deferred_check.place(
        get_copier(fp32, torch.device("cpu")).placement(other_dtype, fp32, slots_of([1, 2], 16, 0, 32), 32)) is None
    assert all(torch.equal(a, b) for a, b in zip(before, longer, strict=True))
    assert obj.check()  # still usable the ordinary way


def test_placement_rejects_bad_slots_and_token_ranges():
    spec = PagedKVSpec("mha", 16, 2, 32, torch.bfloat16, "cpu_vec")
    layers = allocate_paged_layers(spec, "LBHNC", 2, 4)
    copier = TorchCopier()
    with pytest.raises(ValueError, match="out of range"):
        copier.placement(layers, spec, torch.tensor([0, 64]), 32)
    with pytest.raises(ValueError, match="inside a 32-token chunk"):
        copier.placement(layers, spec, torch.arange(10), 32, first=30)
    placement = copier.placement(layers, spec, torch.arange(5, 9), 32, first=2)
    assert (placement.first, placement.last, placement.planes) == (2, 6, 2)
    assert placement.rows.shape == (4,) and placement.channels.shape == (2, 64)


def test_an_engine_sets_its_cachegen_coder_up_at_start_not_in_the_first_load(tmp_path, cpp_lib, caplog):
    """The coder, its table bank and threads cost a fresh process's first load ~0.2 s here
    (benchmarks/RESULTS.md): the engine's start-up pre-warm does that work; a geometry CacheGen
    cannot code is a warning, not a failed start."""
    import logging

    from vllm_kvcache_plugin.config import load_config
    from vllm_kvcache_plugin.engine import ChunkShape, KVCacheEngine
    from vllm_kvcache_plugin.serde.cachegen import tables

    engine = KVCacheEngine(load_config({"remote_url": f"fs://{tmp_path}", "remote_serde": "cachegen",
                                        "local_cpu": False}, env={}), "m")
    try:
        serde = engine.storage.remote.serde
        tables.table_set.cache_clear()
        assert serde._coder is None
        engine.prewarm(ChunkShape(KVFormat.KV, torch.bfloat16, 3, 2, 32))
        assert serde._coder is not None and tables.table_set.cache_info().currsize == 1
        with caplog.at_level(logging.WARNING):
            engine.prewarm(ChunkShape(KVFormat.KV, torch.uint8, 3, 2, 32))  # fp8 storage: not coded
        assert "could not set up for torch.uint8 chunks" in caplog.text
    finally:
        engine.close()

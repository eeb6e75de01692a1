"""The CPU fast path (C + OpenMP via ctypes) against the element model and the torch reference."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch

from tests.test_kernels_support import (
    DTYPES,
    MODEL_CASES,
    assert_same_bits,
    build_layers,
    check_gather,
    check_scatter,
    check_separate_layers,
    make_spec,
    random_chunk,
    slot_patterns,
    storage_bits,
)
from vllm_kvcache_plugin.kernels import PagedKVSpec, TorchCopier, get_copier
from vllm_kvcache_plugin.kernels.cpu_fast import CpuCopier, build_library


@pytest.fixture(scope="module")
def fast(tmp_path_factory) -> CpuCopier:
    try:
        return CpuCopier.create()
    except RuntimeError as exc:  # no C compiler: the dispatcher falls back to torch, nothing to test
        pytest.skip(f"the CPU fast path cannot be built here: {exc}")


@pytest.mark.parametrize(("kind", "layout", "block_size", "dtype"), MODEL_CASES, ids=str)
def test_fast_path_matches_model(fast, layout, block_size, dtype, kind):
    spec = make_spec(kind, block_size, dtype, head_size=16 if kind == "mha" else 24)
    layers = build_layers(spec, layout, num_layers=3, num_blocks=6, seed=block_size + 1)
    for name, slots in slot_patterns(6, block_size, seed=5).items():
        check_gather(fast, layers, spec, slots)
        check_scatter(fast, layers, spec, slots, random_chunk(spec, 3, slots.numel(), seed=len(name)))


PACKED_CASES = [("cpu_vec", dtype) for dtype in DTYPES] + [("cpu_amx", torch.bfloat16), ("cpu_amx", torch.float16)]


@pytest.mark.parametrize(("packing", "dtype"), PACKED_CASES, ids=str)
@pytest.mark.parametrize("block_size", [32, 128])
@pytest.mark.parametrize("head_size", [32, 80])
def test_fast_path_packed_matches_model(fast, packing, block_size, dtype, head_size):
    spec = make_spec("mha", block_size, dtype, heads=2, head_size=head_size, packing=packing)
    layers = build_layers(spec, "LBHNC", num_layers=2, num_blocks=6, seed=head_size)
    for name, slots in slot_patterns(6, block_size, seed=9).items():
        check_gather(fast, layers, spec, slots)
        check_scatter(fast, layers, spec, slots, random_chunk(spec, 2, slots.numel(), seed=len(name)))


def test_fast_path_equals_reference_on_a_real_shape(fast):
    """SmolLM2's shape (3 KV heads, head 64), vLLM's CPU case: LBHNC, block 128, vec packing."""
    spec = PagedKVSpec("mha", 128, 3, 64, torch.bfloat16, "cpu_vec")
    layers = build_layers(spec, "LBHNC", num_layers=4, num_blocks=5, seed=3)
    slots = torch.cat([torch.arange(256, 384), torch.arange(0, 100)])  # block 2 whole, block 0 partial
    ours, theirs = (torch.empty(spec.chunk_shape(4, slots.numel()), dtype=spec.dtype) for _ in range(2))
    fast.gather(layers, spec, slots, ours)
    TorchCopier().gather(layers, spec, slots, theirs)
    assert_same_bits(ours, theirs, "gather")


def test_fast_path_with_separate_layers(fast):
    check_separate_layers(fast)


def test_out_of_range_slot_writes_nothing(fast):
    spec = make_spec("mha", 16, torch.float16)
    layers = build_layers(spec, "LBNHC", num_layers=3, num_blocks=4)
    before = storage_bits(layers[0]).clone()
    slots = torch.tensor([0, 1, 2, 70, 3])  # 64 slots exist; the bad one sits after good ones
    with pytest.raises(ValueError, match=r"slot 70 out of range \[0, 64\)"):
        fast.scatter(layers, spec, slots, random_chunk(spec, 3, 5))
    assert torch.equal(storage_bits(layers[0]), before)
    with pytest.raises(ValueError, match=r"slot -3 out of range"):
        fast.gather(layers, spec, torch.tensor([-3]), torch.empty(spec.chunk_shape(3, 1), dtype=spec.dtype))


def test_int32_slots_and_sliced_out(fast):
    spec = make_spec("mha", 32, torch.float32)
    layers = build_layers(spec, "BLHNC", num_layers=2, num_blocks=4)
    slots = slot_patterns(4, 32)["partial"]
    big = torch.zeros(spec.chunk_shape(2, slots.numel() + 3), dtype=spec.dtype)
    fast.gather(layers, spec, slots.to(torch.int32), big[:, :, 3:])
    expected = torch.empty(spec.chunk_shape(2, slots.numel()), dtype=spec.dtype)
    TorchCopier().gather(layers, spec, slots, expected)
    assert_same_bits(big[:, :, 3:], expected)
    assert not big[:, :, :3].any()


def test_single_thread_matches_multi_thread(fast):
    spec = make_spec("mha", 16, torch.bfloat16, heads=4, head_size=64)
    layers = build_layers(spec, "LBNHC", num_layers=8, num_blocks=80)
    slots = torch.randperm(80 * 16)[:1000]  # ~2 MB: enough work for two threads
    threads = torch.get_num_threads()
    outs = []
    try:
        for count in (1, max(2, threads)):
            torch.set_num_threads(count)
            out = torch.empty(spec.chunk_shape(8, slots.numel()), dtype=spec.dtype)
            fast.gather(layers, spec, slots, out)
            outs.append(out)
    finally:
        torch.set_num_threads(threads)
    assert_same_bits(outs[0], outs[1])


def test_library_is_cached(fast, monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_KVCACHE_KERNEL_CACHE", str(tmp_path))
    first = build_library()
    stamp = first.stat().st_mtime_ns
    assert build_library() == first and first.stat().st_mtime_ns == stamp
    assert first.parent.parent == tmp_path


def test_dispatcher_picks_fast_path_on_cpu(fast, monkeypatch):
    from vllm_kvcache_plugin.kernels import dispatch

    monkeypatch.setattr(dispatch, "_cache", {})
    monkeypatch.delenv("VLLM_KVCACHE_KERNEL", raising=False)
    assert get_copier(make_spec(), "cpu").name == "cpu"
    monkeypatch.setenv("VLLM_KVCACHE_KERNEL", "torch")
    assert get_copier(make_spec(), "cpu").name == "torch"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="vLLM is not installed (its op is the ground truth)")
@pytest.mark.parametrize("isa", ["vec", "vec16"])
def test_fast_scatter_equals_vllm_op(fast, isa):
    from vllm import _custom_ops as ops

    spec = make_spec("mha", 128, torch.bfloat16, heads=2, head_size=64, packing=PagedKVSpec.packing_for_cpu_isa(isa))
    by_vllm = build_layers(spec, "LBHNC", num_layers=2, num_blocks=6, seed=4)
    ours = build_layers(spec, "LBHNC", num_layers=2, num_blocks=6, seed=4)
    slots = slot_patterns(6, 128, seed=1)["full"][:200]
    chunk = torch.randn(spec.chunk_shape(2, slots.numel())).to(spec.dtype)
    for index, layer in enumerate(by_vllm):
        key_cache, value_cache = layer.view(6, 2, 256, 64).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(chunk[0, index].contiguous(), chunk[1, index].contiguous(),
                                       key_cache, value_cache, slots, isa)
    fast.scatter(ours, spec, slots, chunk)
    assert_same_bits(storage_bits(ours[0]), storage_bits(by_vllm[0]), "scatter vs vLLM op")
    out = torch.empty_like(chunk)
    fast.gather(by_vllm, spec, slots, out)
    assert_same_bits(out, chunk, "gather of vLLM-written tokens")


def test_failed_build_falls_back_to_torch_and_is_not_retried(monkeypatch, tmp_path):
    from vllm_kvcache_plugin.kernels import cpu_fast, dispatch

    monkeypatch.setattr(cpu_fast, "_library", None)
    monkeypatch.setattr(cpu_fast, "_load_error", None)
    monkeypatch.setattr(dispatch, "_cache", {})
    monkeypatch.setenv("VLLM_KVCACHE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", shutil.which("false"))  # a "compiler" that always fails
    monkeypatch.delenv("VLLM_KVCACHE_KERNEL", raising=False)
    builds = []
    real_build = cpu_fast.build_library
    monkeypatch.setattr(cpu_fast, "build_library", lambda: builds.append(1) or real_build())
    with pytest.raises(RuntimeError, match="building the CPU fast path failed"):
        cpu_fast.load_library()
    with pytest.raises(RuntimeError, match="CPU fast path unavailable"):
        cpu_fast.load_library()
    assert len(builds) == 1
    assert get_copier(make_spec(), "cpu").name == "torch"


@pytest.mark.parametrize(("kind", "packing", "block_size"),
                         [("mha", "cpu_vec", 128), ("mha", "plain", 16), ("mla", "plain", 32)], ids=str)
def test_scatter_verified_writes_like_scatter_and_hashes_each_slab(fast, kind, packing, block_size):
    """The verify-and-scatter pass: the same blocks as a plain scatter, and the xxh3 of every
    (kv, layer) slab of the chunk, as the naive serde's segmented checksum defines them."""
    from vllm_kvcache_plugin.serde.header import segment_digests

    spec = make_spec(kind, block_size, torch.bfloat16, heads=3 if kind == "mha" else 1,
                     head_size=64 if kind == "mha" else 24, packing=packing)
    plain, verified = (build_layers(spec, "LBHNC" if packing == "cpu_vec" else "LBNHC", num_layers=4,
                                    num_blocks=8, seed=2) for _ in range(2))
    slots = torch.cat([torch.arange(2 * block_size, 4 * block_size), torch.arange(5, 5 + block_size // 2)])
    src = random_chunk(spec, 4, slots.numel(), seed=11)
    fast.scatter(plain, spec, slots, src)
    digests = fast.scatter_verified(verified, spec, slots, src)
    for ours, theirs in zip(verified, plain, strict=True):
        assert_same_bits(storage_bits(ours), storage_bits(theirs), "verified scatter")
    slab = src[0, 0].numel() * src.element_size()
    assert digests == segment_digests(src.view(torch.uint8).reshape(-1).numpy(), slab)
    assert len(digests) == 8 * src.shape[0] * src.shape[1]


def test_scatter_verified_declines_a_strided_chunk(fast):
    """Only a whole contiguous chunk has its slabs where the checksum expects them: anything else
    is left to verify-then-scatter, and nothing is written."""
    spec = make_spec("mha", 16, torch.bfloat16, heads=2, head_size=16)
    layers = build_layers(spec, "LBNHC", num_layers=2, num_blocks=4, seed=1)
    before = storage_bits(layers[0]).clone()
    big = random_chunk(spec, 2, 20)
    assert fast.scatter_verified(layers, spec, torch.arange(16), big[:, :, 4:]) is None
    assert torch.equal(storage_bits(layers[0]), before)
    assert TorchCopier().scatter_verified(layers, spec, torch.arange(20), big) is None


def test_hash_copy_hashes_each_piece_and_copies_it(fast):
    """The verify-and-stage pass of a GPU cache's load: the digests of every ``segment``-byte piece
    (the last one shorter), the order segment_digests gives, on one thread or many; with a target,
    the bytes copied there too; without one, nothing but the digests."""
    from vllm_kvcache_plugin.kernels import copy_threads
    from vllm_kvcache_plugin.kernels.cpu_fast import hash_copy
    from vllm_kvcache_plugin.serde.header import segment_digests

    src = torch.randint(0, 256, (3 * (1 << 20) + 12346,), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    segment = 1 << 19
    expected = segment_digests(src.numpy(), segment)
    dst = torch.zeros_like(src)
    assert hash_copy(src, dst, segment) == expected
    assert torch.equal(dst, src)
    with copy_threads(1):
        assert hash_copy(src.view(torch.int16)[: src.numel() // 2 - 1], None, segment) == segment_digests(
            src[: src.numel() - 2].numpy(), segment)
    untouched = torch.zeros_like(src)
    assert hash_copy(src, untouched[:-1], segment) is None  # not the same bytes: declined
    assert hash_copy(src[::2], None, segment) is None  # not contiguous: declined
    assert hash_copy(src, None, 0) is None
    assert not untouched.any()

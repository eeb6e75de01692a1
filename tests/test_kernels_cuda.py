"""GPU copiers (CUDA extension, Triton compiled, torch on CUDA) against the element model.

Skipped without a CUDA device. Needs no vLLM, so benchmarks/gpu_check.sh runs it on a bare GPU box
(``pytest --noconftest tests/test_kernels_cuda.py``).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.test_kernels_support import (
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
from vllm_kvcache_plugin.kernels import PagedKVSpec, TorchCopier, available_copiers, get_copier

if not torch.cuda.is_available():
    pytest.skip("no CUDA device (benchmarks/gpu_check.sh runs these on a GPU machine)", allow_module_level=True)

GPU_IMPLEMENTATIONS = ("cuda", "triton", "torch")


@pytest.fixture(scope="module", params=GPU_IMPLEMENTATIONS)
def copier(request):
    found = available_copiers(make_spec(), "cuda")[request.param]
    if isinstance(found, str):
        pytest.fail(f"{request.param} copier unavailable on a CUDA machine: {found}")
    return found


@pytest.mark.parametrize(("kind", "layout", "block_size", "dtype"), MODEL_CASES, ids=str)
def test_gpu_copier_matches_model(copier, kind, layout, block_size, dtype):
    spec = make_spec(kind, block_size, dtype, heads=4, head_size=64 if kind == "mha" else 96)
    layers = build_layers(spec, layout, num_layers=3, num_blocks=6, device="cuda", seed=block_size)
    for name, slots in slot_patterns(6, block_size).items():
        check_gather(copier, layers, spec, slots)
        check_scatter(copier, layers, spec, slots, random_chunk(spec, 3, slots.numel(), seed=len(name), device="cuda"))


@pytest.mark.parametrize("head_size", [12, 20, 7])  # rows of 24, 40, 14 bytes: 8-, 8-, 2-byte vectors
def test_gpu_copier_narrow_rows(copier, head_size):
    spec = make_spec("mha", 16, torch.float16, heads=3, head_size=head_size)
    layers = build_layers(spec, "LBNHC", num_layers=2, num_blocks=6, device="cuda")
    for slots in slot_patterns(6, 16).values():
        check_gather(copier, layers, spec, slots)
        check_scatter(copier, layers, spec, slots, random_chunk(spec, 2, slots.numel(), device="cuda"))


@pytest.mark.parametrize("pinned", [True, False])
def test_gpu_copier_host_chunk(copier, pinned):
    """``out``/``src`` in host memory: pinned goes direct (CUDA), pageable through a staging copy."""
    spec = PagedKVSpec("mha", 16, 3, 64, torch.bfloat16)
    layers = build_layers(spec, "LBNHC", num_layers=4, num_blocks=40, device="cuda")
    slots = slot_patterns(40, 16)["partial"]
    expected = torch.empty(spec.chunk_shape(4, slots.numel()), dtype=spec.dtype, device="cuda")
    TorchCopier().gather(layers, spec, slots, expected)
    out = torch.full(expected.shape, float("nan"), dtype=spec.dtype, pin_memory=pinned)
    copier.gather(layers, spec, slots, out)
    assert_same_bits(out, expected, "gather to host")
    src = random_chunk(spec, 4, slots.numel(), seed=8)
    if pinned:
        src = src.pin_memory()
    copier.scatter(layers, spec, slots, src)
    back = torch.empty_like(expected)
    TorchCopier().gather(layers, spec, slots, back)
    assert_same_bits(back, src, "scatter from host")


def test_gpu_copier_real_shape_equals_reference(copier):
    """Llama-8B's per-layer shape (8 KV heads, head 128), FlashAttention's LBNHC, block 16, 256 tokens."""
    spec = PagedKVSpec("mha", 16, 8, 128, torch.bfloat16)
    layers = build_layers(spec, "LBNHC", num_layers=8, num_blocks=64, device="cuda", seed=5)
    slots = (torch.randperm(64)[:16, None] * 16 + torch.arange(16)).reshape(-1).cuda()
    ours = torch.empty(spec.chunk_shape(8, 256), dtype=spec.dtype, device="cuda")
    theirs = torch.empty_like(ours)
    copier.gather(layers, spec, slots, ours)
    TorchCopier().gather(layers, spec, slots, theirs)
    assert_same_bits(ours, theirs)


def test_gpu_copier_with_separate_layers(copier):
    check_separate_layers(copier, device="cuda")


def test_gpu_out_of_range_writes_nothing(copier):
    spec = make_spec("mha", 16, torch.bfloat16, heads=2, head_size=64)
    layers = build_layers(spec, "LBHNC", num_layers=2, num_blocks=4, device="cuda")
    before = storage_bits(layers[0]).clone()
    with pytest.raises(ValueError, match=r"slot 64 out of range \[0, 64\)"):
        copier.scatter(layers, spec, torch.tensor([3, 64], device="cuda"), random_chunk(spec, 2, 2, device="cuda"))
    assert torch.equal(storage_bits(layers[0]), before)


def _cuda_copier():
    copier = available_copiers(make_spec(), "cuda")["cuda"]
    if isinstance(copier, str):
        pytest.fail(f"cuda copier unavailable: {copier}")
    return copier


def test_cuda_is_one_launch_for_all_layers():
    copier = _cuda_copier()
    spec = PagedKVSpec("mha", 16, 3, 64, torch.bfloat16)
    layers = build_layers(spec, "LBNHC", num_layers=30, num_blocks=32, device="cuda")
    slots = torch.arange(256, device="cuda")
    out = torch.empty(spec.chunk_shape(30, 256), dtype=spec.dtype, device="cuda")
    copier.gather(layers, spec, slots, out)  # builds and caches the layer table
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        copier.gather(layers, spec, slots, out)
        torch.cuda.synchronize()
    launches = [event for event in profile.events() if "kv_copy_kernel" in event.name]
    assert len(launches) == 1, [event.name for event in profile.events()]


def test_dispatcher_prefers_cuda_on_gpu(monkeypatch):
    from vllm_kvcache_plugin.kernels import dispatch

    monkeypatch.setattr(dispatch, "_cache", {})
    monkeypatch.delenv("VLLM_KVCACHE_KERNEL", raising=False)
    assert get_copier(make_spec(), "cuda").name == "cuda"
    monkeypatch.setenv("VLLM_KVCACHE_KERNEL", "triton")
    assert get_copier(make_spec(), "cuda").name == "triton"
    assert get_copier(make_spec(packing="cpu_vec"), "cuda").name == "torch"



@pytest.mark.parametrize("source", ["pinned", "pageable", "read-only mapping"])
def test_cuda_scatter_verified_writes_like_scatter_and_hashes_each_slab(source):
    """A GPU load's verify-and-scatter: a host chunk's (kv, layer) slabs hashed as the naive serde's
    segmented checksum defines them, staged through pinned memory where the chunk is not pinned
    (a view of the lm server's shared memory or of a mapped file is read-only), the blocks the same
    as a plain scatter's."""
    from vllm_kvcache_plugin.serde.header import segment_digests

    copier = _cuda_copier()
    spec = PagedKVSpec("mha", 16, 3, 64, torch.bfloat16)
    plain, verified = (build_layers(spec, "LBNHC", num_layers=6, num_blocks=40, device="cuda", seed=3)
                       for _ in range(2))
    slots = slot_patterns(40, 16)["partial"].cuda()
    src = random_chunk(spec, 6, slots.numel(), seed=12)
    raw = src.view(torch.uint8).reshape(-1).numpy().tobytes()
    if source == "pinned":
        src = src.pin_memory()
    elif source == "read-only mapping":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "the given buffer is not writable": as intended
            src = torch.frombuffer(memoryview(raw), dtype=torch.uint8).view(spec.dtype).view(src.shape)
    TorchCopier().scatter(plain, spec, slots, src.cuda())
    digests = copier.scatter_verified(verified, spec, slots, src)
    torch.cuda.synchronize()
    for ours, theirs in zip(verified, plain, strict=True):
        assert_same_bits(storage_bits(ours), storage_bits(theirs), "verified scatter")
    assert digests == segment_digests(raw, src[0, 0].numel() * src.element_size())
    assert copier.scatter_verified(verified, spec, slots, src.cuda()) is None  # a device chunk: no host pass

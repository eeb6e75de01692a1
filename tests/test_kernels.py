"""The torch reference copier, the spec, the layouts and the dispatcher.

The reference is checked against an element-by-element model of vLLM's memory layout (see
test_kernels_support.py), against vLLM's own allocator (strides) and against vLLM's CPU attention op
``cpu_attn_reshape_and_cache`` (the packing), when vLLM is importable.
"""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from tests.test_kernels_support import (
    LAYOUTS,
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
from vllm_kvcache_plugin.kernels import (
    ENV_VAR,
    PagedKVSpec,
    TorchCopier,
    allocate_paged_layers,
    available_copiers,
    get_copier,
)
from vllm_kvcache_plugin.kernels import dispatch as dispatch_module

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (its op is the ground truth)")

REF = TorchCopier()


# -- the spec -------------------------------------------------------------------------------------

def test_spec_rejects_bad_fields():
    with pytest.raises(ValueError, match="kind"):
        PagedKVSpec("gqa", 16, 2, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="packing"):
        PagedKVSpec("mha", 16, 2, 64, torch.bfloat16, "tiled")
    with pytest.raises(ValueError, match="block_size"):
        PagedKVSpec("mha", 0, 2, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="one latent head"):
        PagedKVSpec("mla", 16, 2, 576, torch.bfloat16)
    with pytest.raises(ValueError, match="cpu_amx"):
        PagedKVSpec("mha", 16, 2, 64, torch.bfloat16, "cpu_amx")
    with pytest.raises(ValueError, match="2-byte"):
        PagedKVSpec("mha", 32, 2, 64, torch.float32, "cpu_amx")


def test_packing_for_cpu_isa():
    assert PagedKVSpec.packing_for_cpu_isa("vec") == "cpu_vec"
    assert PagedKVSpec.packing_for_cpu_isa("vec16") == "cpu_vec"
    assert PagedKVSpec.packing_for_cpu_isa("neon") == "cpu_vec"
    assert PagedKVSpec.packing_for_cpu_isa("amx") == "cpu_amx"
    with pytest.raises(ValueError, match="unknown CPU attention ISA 'sse9'"):
        PagedKVSpec.packing_for_cpu_isa("sse9")


def test_chunk_shapes():
    assert make_spec("mha", heads=3, head_size=64).chunk_shape(30, 256) == (2, 30, 256, 3, 64)
    assert make_spec("mla", head_size=576).chunk_shape(4, 7) == (1, 4, 7, 1, 576)


# -- layouts: our allocator helper builds exactly what vLLM builds ------------------------------------

@needs_vllm
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("padded", [False, True])
def test_allocate_matches_vllm_views(layout, padded):
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheTensor,
        compute_layout_strides,
        create_kv_cache_views,
    )
    from vllm.v1.kv_cache_layout import KVCacheLayout

    num_layers, num_blocks = 4, 5
    vllm_layout = KVCacheLayout[layout]
    vllm_spec = FullAttentionSpec(block_size=16, num_kv_heads=3, head_size=8, dtype=torch.bfloat16)
    page = vllm_spec.page_size_bytes
    fixed = None
    if padded:  # another group's pages between ours (block-outer) or a padded page (block-compact)
        if vllm_layout.is_block_outermost:
            fixed = page * num_layers + 512
        elif vllm_layout.is_block_compact:
            fixed = page + 256
        else:
            pytest.skip(f"vLLM cannot pad pages in {layout}")
    layer_stride, block_stride, *_ = compute_layout_strides(
        vllm_spec, num_blocks, num_layers, vllm_layout, fixed_strides=(None, fixed, None, None, None))
    tensor = KVCacheTensor(size=0, layers=[f"l{i}" for i in range(num_layers)],
                           layer_stride=layer_stride, block_stride=block_stride)
    theirs = create_kv_cache_views(torch.zeros(1 << 20, dtype=torch.int8), vllm_spec, num_blocks, vllm_layout, tensor)
    ours = allocate_paged_layers(make_spec(heads=3, head_size=8), layout, num_layers, num_blocks, block_stride=fixed)
    for mine, vllm_view in zip(ours, theirs, strict=True):
        assert (mine.shape, mine.stride(), mine.storage_offset(), mine.dtype) == (
            vllm_view.shape, vllm_view.stride(), vllm_view.storage_offset(), vllm_view.dtype)


# -- the reference against the element model ---------------------------------------------------------

@pytest.mark.parametrize(("kind", "layout", "block_size", "dtype"), MODEL_CASES, ids=str)
def test_reference_matches_model(layout, block_size, dtype, kind):
    spec = make_spec(kind, block_size, dtype, head_size=16 if kind == "mha" else 24)
    layers = build_layers(spec, layout, num_layers=3, num_blocks=6, seed=block_size)
    for name, slots in slot_patterns(6, block_size).items():
        check_gather(REF, layers, spec, slots)
        src = random_chunk(spec, len(layers), slots.numel(), seed=len(name))
        check_scatter(REF, layers, spec, slots, src)


@pytest.mark.parametrize("packing", ["cpu_vec", "cpu_amx"])
@pytest.mark.parametrize("block_size", [32, 128])
def test_reference_packed_matches_model(packing, block_size):
    """The AMX packing is checked against the formula model only: this machine's vLLM op rejects 'amx'."""
    spec = make_spec("mha", block_size, torch.bfloat16, heads=2, head_size=32, packing=packing)
    layers = build_layers(spec, "LBHNC", num_layers=2, num_blocks=4, seed=7)
    for name, slots in slot_patterns(4, block_size).items():
        check_gather(REF, layers, spec, slots)
        check_scatter(REF, layers, spec, slots, random_chunk(spec, 2, slots.numel(), seed=len(name)))


def test_reference_with_separate_layers():
    check_separate_layers(REF)


def test_block_outermost_with_foreign_pages_untouched():
    """Block-outer buffers interleave other groups' pages: a scatter must leave them alone."""
    spec = make_spec("mha", 16, torch.float16)
    page = spec.num_kv_heads * spec.block_size * spec.content_size * spec.element_size
    layers = build_layers(spec, "BLNHC", num_layers=3, num_blocks=5, block_stride=3 * page + 384)
    slots = slot_patterns(5, 16)["partial"]
    check_scatter(REF, layers, spec, slots, random_chunk(spec, 3, slots.numel()))


def test_cross_layout_round_trip():
    """A chunk gathered from one layout / packing / block size scatters into another unchanged."""
    source_spec = make_spec("mha", 128, torch.bfloat16, head_size=32, packing="cpu_vec")
    source = build_layers(source_spec, "LBHNC", num_layers=2, num_blocks=6, seed=11)
    slots = slot_patterns(6, 128)["partial"]
    chunk = torch.empty(source_spec.chunk_shape(2, slots.numel()), dtype=torch.bfloat16)
    REF.gather(source, source_spec, slots, chunk)
    for layout, block_size, packing in [("LBNHC", 16, "plain"), ("BHLNC", 32, "plain"), ("LBHNC", 32, "cpu_amx")]:
        spec = make_spec("mha", block_size, torch.bfloat16, head_size=32, packing=packing)
        target = build_layers(spec, layout, num_layers=2, num_blocks=24, seed=block_size)
        target_slots = torch.randperm(24 * block_size)[: slots.numel()]
        REF.scatter(target, spec, target_slots, chunk)
        back = torch.empty_like(chunk)
        REF.gather(target, spec, target_slots, back)
        assert_same_bits(back, chunk, f"{layout}/{block_size}/{packing}")


# -- bad inputs ------------------------------------------------------------------------------------

def test_out_of_range_slots_write_nothing():
    spec = make_spec("mha", 16)
    layers = build_layers(spec, "LBNHC", num_layers=2, num_blocks=4)
    before = storage_bits(layers[0]).clone()
    src = random_chunk(spec, 2, 3)
    for bad_slots, culprit in (([0, 5, 64], 64), ([-1, 2, 3], -1)):
        with pytest.raises(ValueError, match=rf"slot {culprit} out of range \[0, 64\)"):
            REF.scatter(layers, spec, torch.tensor(bad_slots), src)
    assert torch.equal(storage_bits(layers[0]), before)
    out = torch.zeros(spec.chunk_shape(2, 3), dtype=spec.dtype)
    with pytest.raises(ValueError, match="out of range"):
        REF.gather(layers, spec, torch.tensor([0, 1, 64]), out)
    assert not out.any()


def test_mismatched_arguments_rejected():
    spec = make_spec("mha", 16)
    layers = build_layers(spec, "LBHNC", num_layers=2, num_blocks=4)
    slots = torch.arange(5)
    out = torch.empty(spec.chunk_shape(2, 5), dtype=spec.dtype)
    with pytest.raises(ValueError, match="expected"):
        REF.gather(layers, spec, slots, out[:, :, :4])
    with pytest.raises(ValueError, match="dtype"):
        REF.gather(layers, spec, slots, out.float())
    with pytest.raises(ValueError, match="does not match the spec"):
        REF.gather(layers, make_spec("mha", 32), slots, out)
    with pytest.raises(ValueError, match="int64"):
        REF.gather(layers, spec, slots.float(), out)
    with pytest.raises(ValueError, match="differs from layer 0"):
        REF.gather([layers[0], layers[1][:3]], spec, slots, out)
    with pytest.raises(ValueError, match="no KV layers"):
        REF.gather([], spec, slots, out)
    vec = make_spec("mha", 16, packing="cpu_vec")
    with pytest.raises(ValueError, match="region contiguous"):
        REF.gather(build_layers(vec, "LBNHC", 2, 4), vec, slots, out)


def test_empty_slots_is_a_no_op():
    spec = make_spec("mla", 16, head_size=24)
    layers = build_layers(spec, "LHBNC", 2, 3)
    before = storage_bits(layers[0]).clone()
    REF.scatter(layers, spec, torch.empty(0, dtype=torch.int64), torch.empty(spec.chunk_shape(2, 0), dtype=spec.dtype))
    assert torch.equal(storage_bits(layers[0]), before)


def test_gather_into_non_contiguous_out():
    """``out`` may be a token slice of a larger chunk buffer."""
    spec = make_spec("mha", 16, torch.float32)
    layers = build_layers(spec, "BLHNC", num_layers=2, num_blocks=4)
    slots = slot_patterns(4, 16)["partial"]
    big = torch.zeros(spec.chunk_shape(2, slots.numel() + 4), dtype=spec.dtype)
    REF.gather(layers, spec, slots, big[:, :, 2:-2])
    expected = torch.empty(spec.chunk_shape(2, slots.numel()), dtype=spec.dtype)
    REF.gather(layers, spec, slots, expected)
    assert_same_bits(big[:, :, 2:-2], expected)
    assert not big[:, :, :2].any() and not big[:, :, -2:].any()


# -- vLLM's CPU attention op is the ground truth for the packing -----------------------------------------

@pytest.fixture(scope="module")
def vllm_ops():
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed (its op is the ground truth)")
    from vllm import _custom_ops

    return _custom_ops


def write_with_vllm(ops, layers, spec, slots, chunk, isa):
    for index, layer in enumerate(layers):
        blocks, heads, n, _ = layer.shape
        key_cache, value_cache = layer.view(blocks, heads, 2 * n, -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(chunk[0, index].contiguous(), chunk[1, index].contiguous(),
                                       key_cache, value_cache, slots, isa)


@pytest.mark.parametrize("isa", ["vec", "vec16"])
@pytest.mark.parametrize("block_size", [32, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_reference_inverts_vllm_cpu_op(vllm_ops, isa, block_size, dtype):
    spec = make_spec("mha", block_size, dtype, heads=2, head_size=32,
                     packing=PagedKVSpec.packing_for_cpu_isa(isa))
    for name, slots in slot_patterns(4, block_size).items():
        chunk = torch.randn(spec.chunk_shape(2, slots.numel())).to(dtype)
        by_vllm = build_layers(spec, "LBHNC", num_layers=2, num_blocks=4, seed=3)
        ours = build_layers(spec, "LBHNC", num_layers=2, num_blocks=4, seed=3)
        write_with_vllm(vllm_ops, by_vllm, spec, slots, chunk, isa)
        check_gather(REF, by_vllm, spec, slots)
        out = torch.empty_like(chunk)
        REF.gather(by_vllm, spec, slots, out)
        assert_same_bits(out, chunk, f"gather after vLLM write ({name})")
        REF.scatter(ours, spec, slots, chunk)
        assert_same_bits(storage_bits(ours[0]), storage_bits(by_vllm[0]), f"scatter vs vLLM ({name})")


@needs_vllm
def test_vllm_rejects_or_matches_amx(vllm_ops):
    """Where vLLM's op accepts 'amx' (AMX CPUs), our reference must match it; elsewhere say so."""
    spec = make_spec("mha", 32, torch.bfloat16, heads=1, head_size=32, packing="cpu_amx")
    layers = build_layers(spec, "LBHNC", num_layers=1, num_blocks=2)
    slots = torch.arange(40)
    chunk = torch.randn(spec.chunk_shape(1, 40)).to(torch.bfloat16)
    try:
        write_with_vllm(vllm_ops, layers, spec, slots, chunk, "amx")
    except RuntimeError as exc:
        pytest.skip(f"vLLM's op rejects 'amx' on this CPU ({str(exc)[:80]}); the amx model test covers it")
    out = torch.empty_like(chunk)
    REF.gather(layers, spec, slots, out)
    assert_same_bits(out, chunk, "amx gather after vLLM write")


# -- the dispatcher ---------------------------------------------------------------------------------

@pytest.fixture
def fresh_dispatch(monkeypatch):
    monkeypatch.setattr(dispatch_module, "_cache", {})
    monkeypatch.setattr(dispatch_module, "_logged", set())
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return monkeypatch


def test_dispatch_env_override_and_log_once(fresh_dispatch, caplog):
    spec = make_spec("mha", 16)
    fresh_dispatch.setenv(ENV_VAR, "torch")
    with caplog.at_level(logging.INFO, logger=dispatch_module.__name__):
        first = get_copier(spec, "cpu")
        second = get_copier(spec, "cpu")
    assert first.name == "torch" and second is first
    chosen = [r for r in caplog.records if "KV copy kernel for" in r.getMessage()]
    assert len(chosen) == 1


def test_dispatch_falls_back_with_warning(fresh_dispatch, caplog):
    spec = make_spec("mha", 16)
    fresh_dispatch.setenv(ENV_VAR, "cuda")
    with caplog.at_level(logging.INFO, logger=dispatch_module.__name__):
        copier = get_copier(spec, "cpu")
    assert copier.name in ("cpu", "torch")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'cuda'" in warnings[0].getMessage()


def test_dispatch_rejects_unknown_name(fresh_dispatch):
    fresh_dispatch.setenv(ENV_VAR, "fortran")
    with pytest.raises(ValueError, match="not one of"):
        get_copier(make_spec(), "cpu")


def test_available_copiers_report_reasons(fresh_dispatch):
    found = available_copiers(make_spec(), "cpu")
    assert found["torch"].name == "torch"
    assert "CUDA tensors" in found["cuda"]
    assert "TRITON_INTERPRET" in found["triton"]

"""The Triton copier on CPU tensors under TRITON_INTERPRET=1 (no GPU needed), against the element model.

The interpreter runs each program in Python (~10 ms each), so shapes are tiny: a dozen tokens that
cross a block boundary plus a few scattered ones, two layers.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from tests.test_kernels_support import (
    BLOCK_SIZES,
    DTYPES,
    LAYOUTS,
    assert_same_bits,
    build_layers,
    check_gather,
    check_scatter,
    check_separate_layers,
    chunk_slots,
    make_spec,
    random_chunk,
)
from vllm_kvcache_plugin.kernels import TorchCopier, available_copiers

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
]

# Every layout; block sizes and dtypes rotate so each meets every layout; then MLA.
CASES = [("mha", layout, BLOCK_SIZES[i % 3], DTYPES[i % 4]) for i, layout in enumerate(LAYOUTS)]
CASES += [("mla", "LBNHC", 16, torch.bfloat16), ("mla", "BLHNC", 128, torch.uint8)]


@pytest.fixture(scope="module")
def copier():
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        found = available_copiers(make_spec(), "cpu")["triton"]
        if isinstance(found, str):
            pytest.skip(f"triton copier unavailable: {found}")
        yield found
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def tiny_slots(block_size: int) -> torch.Tensor:
    """Nine tokens crossing from block 3 into block 1 (a partial chunk), then three scattered ones."""
    crossing = chunk_slots([3, 1], block_size, 9, start=block_size - 5)
    return torch.cat([crossing, torch.tensor([2 * block_size + 1, 7, 5 * block_size + block_size - 1])])


@pytest.mark.parametrize(("kind", "layout", "block_size", "dtype"), CASES, ids=str)
def test_triton_matches_model(copier, kind, layout, block_size, dtype):
    spec = make_spec(kind, block_size, dtype, heads=2, head_size=8 if kind == "mha" else 12)
    layers = build_layers(spec, layout, num_layers=2, num_blocks=6, seed=block_size)
    slots = tiny_slots(block_size)
    check_gather(copier, layers, spec, slots)
    check_scatter(copier, layers, spec, slots, random_chunk(spec, 2, slots.numel(), seed=3))


def test_triton_with_separate_layers(copier):
    check_separate_layers(copier, num_tokens=10)


def test_triton_out_of_range_writes_nothing(copier):
    spec = make_spec("mha", 16, torch.float16, head_size=8)
    layers = build_layers(spec, "LBNHC", num_layers=2, num_blocks=2)
    before = torch.cat([layer.flatten() for layer in layers]).clone()
    with pytest.raises(ValueError, match="slot 32 out of range"):
        copier.scatter(layers, spec, torch.tensor([1, 32]), random_chunk(spec, 2, 2))
    assert_same_bits(torch.cat([layer.flatten() for layer in layers]), before)


def test_triton_round_trip_across_layouts(copier):
    """Gathered from LBNHC/16 by the reference, scattered into BHLNC/32 by Triton, read back equal."""
    source_spec = make_spec("mha", 16, torch.bfloat16, head_size=8)
    target_spec = make_spec("mha", 32, torch.bfloat16, head_size=8)
    source = build_layers(source_spec, "LBNHC", num_layers=2, num_blocks=6)
    target = build_layers(target_spec, "BHLNC", num_layers=2, num_blocks=3, seed=9)
    slots = tiny_slots(16)
    chunk = torch.empty(source_spec.chunk_shape(2, slots.numel()), dtype=torch.bfloat16)
    TorchCopier().gather(source, source_spec, slots, chunk)
    target_slots = torch.randperm(96)[: slots.numel()]
    copier.scatter(target, target_spec, target_slots, chunk)
    back = torch.empty_like(chunk)
    TorchCopier().gather(target, target_spec, target_slots, back)
    assert_same_bits(back, chunk)

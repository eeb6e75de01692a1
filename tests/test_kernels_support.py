"""Shared helpers for the kernel tests (no tests here): paged caches built the way vLLM builds them,
filled with random bits, and an element-by-element model of where each token's KV lives.

The model computes storage offsets straight from the formulas in ENVIRONMENT.md (plain strides, the
CPU ``vec`` transposed K, the CPU ``amx`` tiles); it shares no code with the copiers it checks.
"""

from __future__ import annotations

import torch

from vllm_kvcache_plugin.kernels import LAYOUT_ORDERS, PagedKVSpec, allocate_paged_layers

LAYOUTS = tuple(LAYOUT_ORDERS)
BLOCK_SIZES = (16, 32, 128)
FP8 = torch.uint8
DTYPES = (torch.bfloat16, torch.float16, torch.float32, FP8)
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _model_cases() -> list[tuple[str, str, int, torch.dtype]]:
    """(kind, layout, block size, dtype) covering every layout x dtype for MHA and every layout for
    MLA, with the block size rotating so each layout and each dtype meets all three block sizes."""
    cases = []
    for index, (layout, dtype) in enumerate((lay, dt) for lay in LAYOUTS for dt in DTYPES):
        cases.append(("mha", layout, BLOCK_SIZES[index % len(BLOCK_SIZES)], dtype))
    for index, layout in enumerate(LAYOUTS):
        cases.append(("mla", layout, BLOCK_SIZES[index % len(BLOCK_SIZES)], DTYPES[index % len(DTYPES)]))
    return cases


MODEL_CASES = _model_cases()


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(_BITS[tensor.element_size()])


def storage_bits(layer: torch.Tensor) -> torch.Tensor:
    """The layer's whole backing storage as a flat integer tensor of its element width."""
    raw = torch.empty(0, dtype=torch.uint8, device=layer.device).set_(layer.untyped_storage())
    return bits(raw[: raw.numel() // layer.element_size() * layer.element_size()].view(layer.dtype))


def make_spec(kind: str = "mha", block_size: int = 16, dtype: torch.dtype = torch.bfloat16,
              heads: int = 2, head_size: int = 16, packing: str = "plain") -> PagedKVSpec:
    if kind == "mla":
        heads = 1
    return PagedKVSpec(kind, block_size, heads, head_size, dtype, packing)


def fill_random_bits(tensor_or_layer: torch.Tensor, generator: torch.Generator) -> None:
    """Fill the whole backing storage with random bytes (never zeros: NaN payloads included)."""
    raw = torch.empty(0, dtype=torch.uint8, device=tensor_or_layer.device).set_(tensor_or_layer.untyped_storage())
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=generator).to(raw.device))


def build_layers(spec: PagedKVSpec, layout: str, num_layers: int = 3, num_blocks: int = 6,
                 device: str | torch.device = "cpu", block_stride: int | None = None,
                 seed: int = 0) -> list[torch.Tensor]:
    layers = allocate_paged_layers(spec, layout, num_layers, num_blocks, device=device, block_stride=block_stride)
    fill_random_bits(layers[0], torch.Generator().manual_seed(seed))
    return layers


def random_chunk(spec: PagedKVSpec, num_layers: int, num_tokens: int, seed: int = 1,
                 device: str | torch.device = "cpu") -> torch.Tensor:
    shape = spec.chunk_shape(num_layers, num_tokens)
    gen = torch.Generator().manual_seed(seed)
    count = 1
    for size in shape:
        count *= size
    raw = torch.randint(0, 256, (count * spec.element_size,), dtype=torch.uint8, generator=gen)
    return raw.view(spec.dtype).reshape(shape).to(device)


def chunk_slots(block_ids: list[int], block_size: int, num_tokens: int, start: int = 0) -> torch.Tensor:
    """Slots of ``num_tokens`` tokens laid over ``block_ids`` in order, starting ``start`` tokens in."""
    positions = torch.arange(start, start + num_tokens)
    blocks = torch.tensor(block_ids)[positions // block_size]
    return blocks * block_size + positions % block_size


def slot_patterns(num_blocks: int, block_size: int, seed: int = 2) -> dict[str, torch.Tensor]:
    """Whole blocks, a partial chunk starting mid-block, and scattered single tokens."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    return {
        "full": chunk_slots(order[:2], block_size, 2 * block_size),
        "partial": chunk_slots(order[2:5], block_size, 2 * block_size - 5, start=3),
        "scattered": torch.randperm(num_blocks * block_size, generator=gen)[:block_size // 2 + 3],
    }


def model_offsets(layer: torch.Tensor, spec: PagedKVSpec, slots: torch.Tensor) -> torch.Tensor:
    """Storage offsets (in elements) of every chunk element of one layer: [num_kv, T, H, D]."""
    n, d = spec.block_size, spec.head_size
    sb, sh, sn, _ = layer.stride()
    slots = slots.to(torch.int64).cpu()
    o = (slots % n).view(-1, 1, 1)
    b = (slots // n).view(-1, 1, 1)
    h = torch.arange(spec.num_kv_heads).view(1, -1, 1)
    c = torch.arange(d).view(1, 1, -1)
    base = layer.storage_offset() + b * sb + h * sh
    offsets = []
    for k in range(spec.num_kv):
        if spec.packing == "plain":
            inner = o * sn + k * d + c
        elif spec.packing == "cpu_vec":
            inner = c * n + o if k == 0 else n * d + o * d + c
        elif k == 0:  # cpu_amx K
            inner = (o // 16) * 16 * d + (c // 2) * 32 + (o % 16) * 2 + c % 2
        else:  # cpu_amx V
            inner = n * d + (c // 16) * 16 * n + (o // 2) * 32 + (c % 16) * 2 + o % 2
        offsets.append(base + inner)
    return torch.stack(offsets)


def model_gather(layers: list[torch.Tensor], spec: PagedKVSpec, slots: torch.Tensor) -> torch.Tensor:
    per_layer = [storage_bits(layer).cpu()[model_offsets(layer, spec, slots)] for layer in layers]
    return torch.stack(per_layer, dim=1).view(spec.dtype)


def separate_layers(spec: PagedKVSpec, num_layers: int, num_blocks: int, device: str | torch.device = "cpu",
                    seed: int = 0) -> list[torch.Tensor]:
    """Layers as unrelated allocations (no common buffer or layer stride), random bits."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(num_layers):
        layer = torch.empty(spec.layer_shape(num_blocks), dtype=spec.dtype, device=device)
        fill_random_bits(layer, gen)
        layers.append(layer)
    return layers


def model_scatter(layers: list[torch.Tensor], spec: PagedKVSpec, slots: torch.Tensor,
                  src: torch.Tensor) -> torch.Tensor:
    """The whole storage (as bits) after writing ``src`` at ``slots``, computed without the copiers."""
    flat = storage_bits(layers[0]).cpu().clone()
    src_bits = bits(src.cpu())
    for index, layer in enumerate(layers):
        flat[model_offsets(layer, spec, slots)] = src_bits[:, index]
    return flat


def poisoned_like(chunk: torch.Tensor, byte: int) -> torch.Tensor:
    out = torch.empty_like(chunk)
    raw = torch.empty(0, dtype=torch.uint8, device=out.device).set_(out.untyped_storage())
    raw.fill_(byte)
    return out


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    a, e = bits(actual.cpu()), bits(expected.cpu())
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    diff = (a != e).nonzero()
    assert diff.numel() == 0, f"{what}: {diff.shape[0]} of {a.numel()} elements differ, first at {diff[0].tolist()}"


def check_gather(copier, layers: list[torch.Tensor], spec: PagedKVSpec, slots: torch.Tensor,
                 out_device: str | torch.device | None = None) -> None:
    """Gather into outputs poisoned two ways (0xFF, 0x00): every element must match the model."""
    expected = model_gather(layers, spec, slots)
    for poison in (0xFF, 0x00):
        out = poisoned_like(expected, poison).to(out_device or layers[0].device)
        copier.gather(layers, spec, slots, out)
        assert_same_bits(out, expected, f"{copier.name} gather (poison {poison:#x})")


def check_scatter(copier, layers: list[torch.Tensor], spec: PagedKVSpec, slots: torch.Tensor,
                  src: torch.Tensor) -> None:
    """Scatter and compare the whole storage with the model: the tokens land, nothing else changes."""
    expected = model_scatter(layers, spec, slots, src)
    copier.scatter(layers, spec, slots, src)
    assert_same_bits(storage_bits(layers[0]), expected, f"{copier.name} scatter")


def check_separate_layers(copier, device: str | torch.device = "cpu", num_tokens: int | None = None) -> None:
    """Layers in unrelated allocations (no common layer stride): gather matches the model, and a
    scatter writes exactly the chosen tokens of each layer."""
    spec = make_spec("mha", 16, torch.bfloat16, heads=2, head_size=16)
    layers = separate_layers(spec, num_layers=3, num_blocks=6, device=device, seed=4)
    slots = slot_patterns(6, 16)["partial"][:num_tokens]
    check_gather(copier, layers, spec, slots)
    before = [storage_bits(layer).cpu().clone() for layer in layers]
    src = random_chunk(spec, 3, slots.numel(), seed=6, device=device)
    copier.scatter(layers, spec, slots, src)
    for index, layer in enumerate(layers):
        expected = before[index].clone()
        expected[model_offsets(layer, spec, slots)] = bits(src[:, index].cpu())
        assert_same_bits(storage_bits(layer), expected, f"layer {index}")

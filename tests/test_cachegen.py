"""CacheGen serde on the CPU: error bound, byte-identical coders, edge cases, corrupt streams, bins.

The Triton twin is in test_cachegen_triton.py; real-KV ratio/quality in test_cachegen_real.py.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from vllm_kvcache_plugin.config import load_config
from vllm_kvcache_plugin.errors import ConfigError, CorruptValueError
from vllm_kvcache_plugin.memory import Allocator, ChunkMeta, KVFormat
from vllm_kvcache_plugin.serde import create_serde
from vllm_kvcache_plugin.serde.cachegen import CacheGenSerde, UnsupportedValueError, codec, quant, tables
from vllm_kvcache_plugin.serde.cachegen import format as wire
from vllm_kvcache_plugin.serde.header import HEADER_SIZE, pack_header, parse_header

cpp = pytest.importorskip("vllm_kvcache_plugin.serde.cachegen.rans_cpp")


def synthetic_kv(planes=2, layers=4, tokens=40, heads=2, size=24, dtype=torch.bfloat16, seed=0) -> torch.Tensor:
    """KV-like data: per-channel offsets and spreads, a few outlier channels, smooth drift over tokens."""
    g = torch.Generator().manual_seed(seed)
    shape = (planes, layers, 1, heads, size)
    offset = torch.randn(shape, generator=g) * 0.5
    spread = torch.rand(shape, generator=g) * 2 + 0.05
    spread[..., :2] *= 12  # outlier channels, as real keys have
    drift = torch.cumsum(torch.randn(planes, layers, tokens, heads, size, generator=g) * 0.1, dim=2)
    noise = torch.randn(planes, layers, tokens, heads, size, generator=g)
    return (offset + spread * (noise + drift)).to(dtype)


def coders(lib) -> dict[str, codec.LaneCoder]:
    return {"numpy": codec.NumpyCoder(), "cpp1": cpp.CppCoder(lib, 1), "cpp2": cpp.CppCoder(lib, 2)}


def roundtrip(serde: CacheGenSerde, x: torch.Tensor, fmt=KVFormat.KV):
    alloc = Allocator()
    obj = alloc.wrap(x, fmt)
    data = serde.serialize(obj)
    out = serde.deserialize(data, obj.meta)
    return data, out.tensor


def stored_steps(data, x: torch.Tensor) -> torch.Tensor:
    """Quantisation step per (row, token) as stored in the stream: [R, T]."""
    planes, layers, tokens, heads, size = x.shape
    _, payload = parse_header(data)
    stream = wire.parse(payload, planes, layers, tokens, heads * size, x.element_size())
    half = torch.from_numpy(stream.half.astype(np.int64))
    scale = (torch.from_numpy(stream.scale_bits.astype(np.int32)) << 16).view(torch.float32)
    return scale, half, quant.steps_from_bits(torch.from_numpy(stream.scale_bits.astype(np.int32)), half)


RELATIVE_ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-23}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("backend", ["cpp", "numpy"])
def test_every_element_within_half_a_step_of_its_token_scale(dtype, backend, cpp_lib):
    x = synthetic_kv(dtype=dtype, seed=1)
    serde = CacheGenSerde(backend=backend, key_bins="32:2,16", value_bins="16:1,8")
    data, y = roundtrip(serde, x)
    assert y.shape == x.shape and y.dtype == x.dtype
    planes, layers, tokens, _heads, _size = x.shape
    scale, half, step = stored_steps(data, x)
    peak = x.float().reshape(planes * layers, tokens, -1).abs().amax(-1)
    assert (scale[:, 1:] >= peak[:, 1:]).all() and (scale[:, 1:] <= peak[:, 1:] * (1 + 2.0**-7)).all()  # bf16, up
    assert (scale[:, 0] == 0).all()  # token 0 is stored exactly
    assert half.tolist() == [15, 15, 7, 7, 7, 3, 3, 3]  # 32 bins -> C=15, 16 -> 7, 8 -> 3
    err = (y.float() - x.float()).reshape(planes * layers, tokens, -1).abs()
    bound = step[..., None] / 2 * (1 + 1e-6) + y.float().reshape(err.shape).abs() * RELATIVE_ULP[dtype]
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"
    assert (err > 0).any()  # lossy: the check above is not vacuous


@pytest.fixture(scope="module")
def portable_lib(cpp_lib):
    """The coder built without -march=native: on an AVX2 machine, the scalar decoder the default build
    replaces with its eight-lane one."""
    return cpp.build_library(cpp.PORTABLE)


# Groups of one row and of several, lane counts that are and are not multiples of 8, MLA, SmolLM2's 192.
CODER_SHAPES = [(2, 3, 17, 3, 20), (2, 2, 1, 1, 8), (1, 3, 33, 1, 72), (2, 1, 65, 2, 64), (2, 2, 30, 3, 64),
                (2, 1, 9, 1, 13)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_coders_write_identical_bytes(dtype, cpp_lib, portable_lib):
    for shape in CODER_SHAPES:
        fmt = KVFormat.MLA if shape[0] == 1 else KVFormat.KV
        x = synthetic_kv(*shape, dtype=dtype, seed=sum(shape))
        for locality in (0, 4):
            settings = codec.EncodeSettings("32:1,16", "16", locality)
            payloads = {name: bytes(codec.encode(x, settings, c)) for name, c in coders(cpp_lib).items()}
            assert len(set(payloads.values())) == 1, (shape, locality, {k: len(v) for k, v in payloads.items()})
            decoded = {}
            for name, c in [*coders(cpp_lib).items(), ("portable", cpp.CppCoder(portable_lib, 2))]:
                out = torch.empty_like(x)
                codec.decode(payloads["numpy"], x.shape, out, c)
                decoded[name] = out
            for name, out in decoded.items():
                assert torch.equal(decoded["numpy"], out), (name, shape, fmt, locality, dtype)


def test_cpp_quantiser_matches_the_torch_reference(cpp_lib):
    x = synthetic_kv(layers=3, tokens=50, dtype=torch.float32, seed=3).reshape(6, 50, -1)
    half = np.array([15, 15, 15, 7, 7, 0])
    coder = cpp.CppCoder(cpp_lib, 2)
    bits = coder.scale_bits(x)
    assert torch.equal(bits, quant.scale_bits(x))
    step = quant.steps_from_bits(bits, torch.from_numpy(half))
    sym, s1, s2 = coder.quantize(x, step, half)
    ref = quant.quantize(x, step, torch.from_numpy(half))
    assert torch.equal(sym, ref)
    centred = ref.to(torch.int64) - torch.from_numpy(half)[:, None, None]
    assert np.array_equal(s1, centred.sum(1).reshape(-1).numpy())
    assert np.array_equal(s2, (centred * centred).sum(1).reshape(-1).numpy())


def test_locality_is_lossless_and_changes_only_the_coding(cpp_lib):
    x = synthetic_kv(tokens=37, seed=4)
    plain, y0 = roundtrip(CacheGenSerde(backend="cpp"), x)
    grouped, y4 = roundtrip(CacheGenSerde(backend="cpp", locality=4), x)
    assert torch.equal(y0, y4)
    assert bytes(plain) != bytes(grouped)


def test_mla_roundtrip(cpp_lib):
    x = synthetic_kv(planes=1, layers=3, tokens=20, heads=1, size=96, seed=5)
    data, y = roundtrip(CacheGenSerde(), x, KVFormat.MLA)
    assert parse_header(data)[0].meta.fmt == KVFormat.MLA
    _, _half, step = stored_steps(data, x)
    err = (y.float() - x.float()).reshape(3, 20, -1).abs()
    assert (err <= step[..., None] / 2 * (1 + 1e-6) + y.float().reshape(err.shape).abs() * 2.0**-8).all()
    with pytest.raises(UnsupportedValueError):
        CacheGenSerde().serialize(Allocator().wrap(synthetic_kv(planes=1, heads=2), KVFormat.MLA))


def test_all_zero_tokens_and_one_token(cpp_lib):
    x = synthetic_kv(tokens=12, seed=6)
    x[:, :, 3] = 0  # a token of zeros in every layer
    x[1, 2] = 0  # a whole layer of zeros
    data, y = roundtrip(CacheGenSerde(), x)
    assert (y[:, :, 3] == 0).all() and (y[1, 2] == 0).all()
    zeros = torch.zeros(2, 4, 16, 2, 32, dtype=torch.bfloat16)
    data, y = roundtrip(CacheGenSerde(), zeros)
    assert torch.equal(y, zeros)
    stream = wire.parse(parse_header(data)[1], 2, 4, 16, 64)
    assert len(stream.coded.words) * 16 < 0.05 * zeros.numel()  # the most peaked table: ~0.01 bit a symbol
    one = synthetic_kv(tokens=1, seed=7)
    _, y = roundtrip(CacheGenSerde(), one)
    assert y.shape == one.shape and torch.allclose(y.float(), one.float(), rtol=0.1, atol=0.1 * one.float().abs().max())


@pytest.mark.parametrize("dtype, big", [(torch.bfloat16, 3.0e38), (torch.float32, 3.4e38), (torch.float16, 65504.0)])
def test_very_large_values_stay_finite_and_bounded(dtype, big, cpp_lib):
    x = synthetic_kv(tokens=8, dtype=torch.float32, seed=8)
    x = (x / x.abs().max() * big).to(dtype)
    data, y = roundtrip(CacheGenSerde(), x)
    assert torch.isfinite(y).all()
    _, _, step = stored_steps(data, x)
    err = (y.double() - x.double()).reshape(8, 8, -1).abs()
    assert (err <= step.double()[..., None] / 2 * (1 + 1e-6) + y.double().reshape(err.shape).abs() * 2.0**-7).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_are_rejected_at_serialize(bad, cpp_lib):
    for backend in ("cpp", "numpy"):
        x = synthetic_kv(seed=9)
        x[1, 2, 5, 1, 3] = bad
        with pytest.raises(UnsupportedValueError, match="NaN or inf"):
            CacheGenSerde(backend=backend).serialize(Allocator().wrap(x))


def test_other_dtypes_and_layouts_are_rejected():
    with pytest.raises(UnsupportedValueError, match="bf16/fp16/fp32"):
        CacheGenSerde().serialize(Allocator().wrap(torch.zeros(2, 1, 4, 1, 8, dtype=torch.uint8)))
    with pytest.raises(UnsupportedValueError, match="2 planes"):
        CacheGenSerde().serialize(Allocator().wrap(torch.zeros(3, 1, 4, 1, 8)))


def _forge(data, mutate) -> bytearray:
    """A value whose payload is changed by ``mutate`` and whose header checksums still match."""
    header, payload = parse_header(data)
    body = bytearray(payload)
    mutate(body)
    return bytearray(pack_header(1, header.meta, body)) + body


def test_corrupt_and_truncated_values_raise_corrupt_value_error(cpp_lib, portable_lib, monkeypatch):
    x = synthetic_kv(tokens=24, seed=10)
    with monkeypatch.context() as patch:
        patch.setattr(cpp, "load_library", lambda: portable_lib)
        portable = CacheGenSerde(backend="cpp")
        assert portable.coder.lib is portable_lib
    for serde in (CacheGenSerde(backend="cpp"), portable, CacheGenSerde(backend="numpy")):
        data, _ = roundtrip(serde, x)
        meta = ChunkMeta(KVFormat.KV, x.dtype, tuple(x.shape))
        for cut in (0, 10, HEADER_SIZE, HEADER_SIZE + 3, len(data) // 2, len(data) - 1):
            with pytest.raises(CorruptValueError):
                serde.deserialize(bytes(data[:cut]), meta)
        flipped = bytearray(data)
        flipped[-5] ^= 0x10
        with pytest.raises(CorruptValueError, match="checksum"):
            serde.deserialize(flipped, meta)
        # Behind a forged (valid) header the codec's own checks must hold: a flipped word or state
        # desynchronises its lane, which then does not end at the initial state.
        rng = np.random.default_rng(0)
        planes, layers, tokens, heads, size = x.shape
        fixed = wire.payload_size(planes * layers, tokens, planes * layers * heads * size, 1, 0)
        states_at = fixed - 2 * planes * layers * tokens - 2 * planes * layers * heads * size - 4 * 192
        for pos in [*rng.integers(fixed, len(data) - HEADER_SIZE, 25), *rng.integers(states_at, states_at + 700, 5)]:
            def flip(body, pos=int(pos)):
                body[pos] ^= 0x5A
            with pytest.raises(CorruptValueError):
                serde.deserialize(_forge(data, flip), meta)
        # Codec-level truncation behind a valid header.
        with pytest.raises(CorruptValueError):
            serde.deserialize(_forge(data, lambda body: body.__delitem__(slice(len(body) - 2, None))), meta)


@pytest.mark.parametrize("what, mutate, message", [
    ("magic", lambda b: b.__setitem__(slice(0, 4), b"XXXX"), "magic"),
    ("version", lambda b: b.__setitem__(4, 9), "version"),
    ("prob bits", lambda b: b.__setitem__(5, 12), "probability bits"),
    ("tables", lambda b: b.__setitem__(8, 2), "tables per lane"),
    ("fingerprint", lambda b: b.__setitem__(12, b[12] ^ 1), "fingerprint"),
    ("half levels", lambda b: b.__setitem__(16, 200), "half levels"),
    ("group length", lambda b: struct.pack_into("<I", b, 24, struct.unpack_from("<I", b, 24)[0] + 1), "sum to"),
])
def test_structural_corruption_is_named(what, mutate, message, cpp_lib):
    x = synthetic_kv(layers=2, tokens=8, seed=11)
    serde = CacheGenSerde()
    data, _ = roundtrip(serde, x)
    with pytest.raises(CorruptValueError, match=message):
        serde.deserialize(_forge(data, mutate))


def test_bad_scale_exact_tokens_and_table_row_are_rejected(cpp_lib):
    x = synthetic_kv(layers=2, tokens=8, seed=12)
    serde = CacheGenSerde()
    data, _ = roundtrip(serde, x)
    rows, lanes = 4, 4 * 48
    at = wire.section_offsets(rows, 8, lanes, 1, rows * 1 * 48 * 2)
    with pytest.raises(CorruptValueError, match="scale"):
        serde.deserialize(_forge(data, lambda b: struct.pack_into("<H", b, at["scales"] + 2, 0x7F80)))
    with pytest.raises(CorruptValueError, match="exact tokens must have zero scales"):
        serde.deserialize(_forge(data, lambda b: struct.pack_into("<H", b, at["scales"], 0x3F80)))
    with pytest.raises(CorruptValueError, match="exact tokens"):
        serde.deserialize(_forge(data, lambda b: b.__setitem__(9, 9)))
    with pytest.raises(CorruptValueError, match="table row"):
        serde.deserialize(_forge(data, lambda b: struct.pack_into("<H", b, at["tables"], 60000)))


def test_exact_leading_tokens_are_bit_exact(cpp_lib):
    x = synthetic_kv(tokens=30, seed=17)
    for exact in (0, 1, 3):
        data, y = roundtrip(CacheGenSerde(exact_tokens=exact), x)
        assert torch.equal(y[:, :, :exact], x[:, :, :exact])
        if exact < 3:
            assert not torch.equal(y[:, :, :3], x[:, :, :3])
        assert parse_header(data)[1][9] == exact


def test_expected_meta_and_serde_id_are_checked(cpp_lib):
    x = synthetic_kv(seed=13)
    data, _ = roundtrip(CacheGenSerde(), x)
    other = ChunkMeta(KVFormat.KV, x.dtype, (2, 5, 40, 2, 24))
    with pytest.raises(CorruptValueError, match="does not fit"):
        CacheGenSerde().deserialize(data, other)
    naive = create_serde("naive").serialize(Allocator().wrap(x))
    with pytest.raises(CorruptValueError, match="serde id"):
        CacheGenSerde().deserialize(naive)


def test_allocator_counts_a_failed_decode_as_freed(cpp_lib):
    alloc = Allocator()
    serde = CacheGenSerde(alloc)
    data = serde.serialize(alloc.wrap(synthetic_kv(seed=14)))

    def flip(body):
        body[-3] ^= 0xFF
    with pytest.raises(CorruptValueError):
        serde.deserialize(_forge(data, flip))
    assert alloc.live == 1  # only the input chunk


def test_bins_specs_and_defaults():
    assert quant.default_bins(30, 0) == [64] * 30 and quant.default_bins(3, 1) == [24] * 3
    assert quant.resolve_bins("32:10,16", 12, 0) == [32] * 10 + [16] * 2
    assert quant.resolve_bins("32:2,24:2", 6, 0) == [32, 32, 24, 24, 24, 24]  # last group extends
    assert quant.resolve_bins("32:40,16", 4, 0) == [32] * 4
    assert quant.resolve_bins(8, 3, 1) == [8, 8, 8]
    with pytest.raises(ConfigError, match="key_bins"):
        CacheGenSerde(key_bins="32:x")
    with pytest.raises(ConfigError, match="value_bins"):
        CacheGenSerde(value_bins=[16, 600])
    with pytest.raises(ConfigError, match="unknown option"):
        CacheGenSerde(bins=3)
    with pytest.raises(ConfigError, match="backend"):
        CacheGenSerde(backend="cuda")


def test_serde_from_registry_and_config(cpp_lib):
    config = load_config(extra_config={"remote_serde": "cachegen", "cachegen_key_bins": "16",
                                       "cachegen_value_bins": "8"}, env={})
    serde = CacheGenSerde.from_config(config)
    x = synthetic_kv(layers=2, seed=15)
    data, _ = roundtrip(serde, x)
    _, half, _ = stored_steps(data, x)
    assert half.tolist() == [7, 7, 3, 3]
    assert isinstance(create_serde("cachegen", key_bins="16"), CacheGenSerde)


def test_more_bins_cost_more_bytes_and_less_error(cpp_lib):
    x = synthetic_kv(layers=3, tokens=64, seed=16)
    sizes, errors = [], []
    for bins in (8, 16, 32, 64):
        data, y = roundtrip(CacheGenSerde(key_bins=bins, value_bins=bins), x)
        sizes.append(len(data))
        errors.append(((y.float() - x.float()).norm() / x.float().norm()).item())
    assert sizes == sorted(sizes) and errors == sorted(errors, reverse=True)
    assert x.numel() * 2 / sizes[1] > 3  # 16 bins on KV-like data: several times smaller than bf16


def test_table_bank_is_stable():
    """Streams of codec version 1 are decodable only with exactly these tables: changing the bank
    needs a new codec version (bump format.CODEC_VERSION), never a silent edit."""
    assert tables.table_set((7, 15)).fingerprint == 0x93CE98EC
    for half in (1, 7, 15, 40):
        bank = tables.bank(half)
        assert (bank.freq.sum(1) == tables.PROB_SCALE).all() and (bank.freq >= 1).all()
    bank = tables.bank(7)
    budget = tables.PROB_SCALE - bank.n
    for j, k in [(0, 0), (7, 5), (14, 20), (3, 27)]:
        exact = np.maximum(tables._exact_row(7, bank.loc_steps, j, bank.variances[k], budget), 1)
        exact[exact.argmax()] += tables.PROB_SCALE - exact.sum()
        assert np.array_equal(exact, bank.freq[j * bank.num_vars + k])


def test_table_choice_follows_the_lane_moments():
    half = np.array([7, 7, 7])
    t = 100
    s1 = np.array([0, 7 * t, -3 * t])  # mean 0, +7 (top symbol), -3
    s2 = np.array([t // 4, 49 * t, 9 * t + 4 * t])  # variances 0.25, 0, 4
    rows = tables.select_tables(half, s1, s2, np.full(3, t))
    bank = tables.bank(7)
    loc, var = np.divmod(rows, bank.num_vars)
    assert list(loc) == [bank.loc_steps, 2 * bank.loc_steps, bank.loc_steps - 6]
    assert float(bank.variances[var[1]]) == pytest.approx(float(tables.VAR_MIN))
    for v, idx in ((0.25, var[0]), (4.0, var[2])):
        grid = np.array([float(g) for g in bank.variances])
        assert idx == np.argmin(np.abs(np.log(grid / v)))


def test_without_a_compiler_auto_falls_back_to_numpy(monkeypatch):
    monkeypatch.setattr(cpp, "load_library", lambda: None)
    assert isinstance(CacheGenSerde().coder, codec.NumpyCoder)
    with pytest.raises(ConfigError, match="could not be built"):
        _ = CacheGenSerde(backend="cpp").coder

"""The Triton twin writes and reads exactly the bytes the CPU coders do.

With CUDA the tests run on the GPU (plus one chunk of realistic size). Without, they run under
TRITON_INTERPRET=1 on small shapes, in a child pytest process: the interpreter must be on before
anything imports triton, and turning it on in this process would leak into every later test (and
the vLLM servers they start). Self-contained (no fixtures): ``pytest --noconftest`` works on a GPU
machine without the project's servers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

HAS_CUDA = torch.cuda.is_available()
RUN_HERE = HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.triton
here = pytest.mark.skipif(not RUN_HERE, reason="runs in the TRITON_INTERPRET=1 child process")

from vllm_kvcache_plugin.errors import CorruptValueError  # noqa: E402
from vllm_kvcache_plugin.serde.cachegen import codec, rans_cpp  # noqa: E402

if not RUN_HERE:

    def test_triton_suite_under_the_interpreter():
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        result = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-x", "--noconftest", "-p",
                                 "no:cacheprovider"], cwd=Path(__file__).resolve().parents[1], env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
        assert " passed" in result.stdout and "failed" not in result.stdout


def kv(planes, layers, tokens, heads, size, dtype=torch.bfloat16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(planes, layers, 1, heads, size, generator=g)
    spread = torch.rand(planes, layers, 1, heads, size, generator=g) * 3 + 0.1
    return (offset + spread * torch.randn(planes, layers, tokens, heads, size, generator=g)).to(dtype)


@pytest.fixture(scope="module")
def cpu_coder():
    lib = rans_cpp.load_library()
    return rans_cpp.CppCoder(lib, 2) if lib is not None else codec.NumpyCoder()


@pytest.fixture(scope="module")
def gpu_coder():
    from vllm_kvcache_plugin.serde.cachegen.triton_coder import TritonCoder

    return TritonCoder(DEVICE)


CASES = [
    # (shape, dtype, locality, key bins, value bins); channels not a multiple of 64 make groups span rows
    ((2, 2, 9, 2, 40), torch.bfloat16, 0, "32:1,16", "16"),
    ((2, 2, 11, 1, 24), torch.float32, 3, "32", "8"),
    ((1, 2, 7, 1, 72), torch.bfloat16, 0, "16", None),  # MLA
    ((2, 1, 1, 1, 64), torch.float16, 0, "32", "32"),  # one token
]


@here
@pytest.mark.parametrize("shape, dtype, locality, key_bins, value_bins", CASES)
def test_triton_and_cpu_streams_are_identical(shape, dtype, locality, key_bins, value_bins, cpu_coder, gpu_coder):
    x = kv(*shape, dtype=dtype, seed=sum(shape))
    settings = codec.EncodeSettings(key_bins, value_bins, locality)
    cpu_bytes = bytes(codec.encode(x, settings, cpu_coder))
    gpu_bytes = bytes(codec.encode(x.to(DEVICE), settings, gpu_coder))
    assert gpu_bytes == cpu_bytes
    on_cpu = torch.empty_like(x)
    codec.decode(gpu_bytes, x.shape, on_cpu, cpu_coder)
    on_gpu = torch.empty(x.shape, dtype=dtype, device=DEVICE)
    codec.decode(cpu_bytes, x.shape, on_gpu, gpu_coder)
    assert torch.equal(on_gpu.cpu(), on_cpu)


@here
def test_all_zero_chunk(cpu_coder, gpu_coder):
    x = torch.zeros(2, 1, 5, 1, 64, dtype=torch.bfloat16)
    settings = codec.EncodeSettings()
    data = bytes(codec.encode(x.to(DEVICE), settings, gpu_coder))
    assert data == bytes(codec.encode(x, settings, cpu_coder))
    out = torch.ones(x.shape, dtype=x.dtype, device=DEVICE)
    codec.decode(data, x.shape, out, gpu_coder)
    assert (out == 0).all()


@here
def test_triton_decoder_rejects_a_corrupt_stream(cpu_coder, gpu_coder):
    x = kv(2, 1, 8, 1, 64, seed=3)
    payload = bytearray(codec.encode(x, codec.EncodeSettings(), cpu_coder))
    payload[-3] ^= 0x5A
    with pytest.raises(CorruptValueError):
        codec.decode(bytes(payload), x.shape, torch.empty(x.shape, dtype=x.dtype, device=DEVICE), gpu_coder)


@here
def test_batched_decode_matches_one_by_one(cpu_coder, gpu_coder):
    xs = [kv(2, 2, 6, 1, 64, seed=seed) for seed in (5, 6, 7)]
    settings = codec.EncodeSettings("32", "16")
    payloads = [bytes(codec.encode(x, settings, cpu_coder)) for x in xs]
    parsed = [codec.parse_payload(p, xs[0].shape, DEVICE) for p in payloads]
    out = torch.empty((len(xs), *xs[0].shape), dtype=torch.bfloat16, device=DEVICE)
    plans, coded, steps, exact = zip(*parsed, strict=True)
    errors = gpu_coder.prepare_decode(list(coded), list(plans), list(steps), out, list(exact))()
    assert not errors.any()
    for i, payload in enumerate(payloads):
        ref = torch.empty_like(xs[i])
        codec.decode(payload, xs[i].shape, ref, cpu_coder)
        assert torch.equal(out[i].cpu(), ref)


@pytest.mark.skipif(not HAS_CUDA, reason="a full-size chunk is too slow for the Triton interpreter")
def test_full_size_chunk_on_the_gpu(cpu_coder, gpu_coder):
    x = kv(2, 30, 256, 3, 64, seed=4)
    settings = codec.EncodeSettings("32:10,16", "32:2,16")
    cpu_bytes = bytes(codec.encode(x, settings, cpu_coder))
    assert bytes(codec.encode(x.cuda(), settings, gpu_coder)) == cpu_bytes
    out = torch.empty(x.shape, dtype=x.dtype, device="cuda")
    codec.decode(cpu_bytes, x.shape, out, gpu_coder)
    ref = torch.empty_like(x)
    codec.decode(cpu_bytes, x.shape, ref, cpu_coder)
    assert torch.equal(out.cpu(), ref)

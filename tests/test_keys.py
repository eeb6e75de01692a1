"""Chunk keys: format, escaping, chaining, and stability across processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vllm_kvcache_plugin.keys import ChunkKey, KeyBuilder, chained_hashes


def test_seed_format_round_trip():
    key = ChunkKey("vllm", "/models/opt-125m/", 1, 0, "3d29b8" + "0" * 58)
    text = key.to_string()
    assert text == "vllm@/models/opt-125m/@1@0@3d29b8" + "0" * 58
    assert ChunkKey.from_string(text) == key


@pytest.mark.parametrize("model", ["a@b", "@@", "50%@x", "%40", "name%25@"])
def test_model_names_with_at_sign_round_trip(model):
    key = ChunkKey("vllm", model, 2, 1, "ab")
    text = key.to_string()
    assert text.count("@") == 4
    assert ChunkKey.from_string(text) == key


def test_escaping_keeps_models_apart():
    # A crafted model name must not be able to address another model's keys.
    a = ChunkKey("vllm", "m@1@0", 1, 0, "h").to_string()
    b = ChunkKey("vllm", "m", 1, 0, "h").to_string()
    assert a != b


def test_hashes_are_chained():
    tokens = list(range(1000, 1040))
    full = chained_hashes(tokens, 16)
    assert [(c.start, c.end) for c in full] == [(0, 16), (16, 32), (32, 40)]
    # Changing the first token changes every later chunk's hash.
    changed = chained_hashes([0, *tokens[1:]], 16)
    assert all(a.chunk_hash != b.chunk_hash for a, b in zip(full, changed, strict=True))
    # A shared prefix gives shared leading hashes.
    other = chained_hashes([*tokens[:32], 7, 7, 7], 16)
    assert other[:2] == full[:2] and other[2] != full[2]
    assert chained_hashes(tokens, 16, include_partial=False) == full[:2]


def test_same_key_in_another_process_with_another_hash_seed():
    tokens = list(range(300))
    builder = KeyBuilder("model", 1, 0)
    here = [builder.key(c.chunk_hash) for c in chained_hashes(tokens, 256)]
    code = ("from vllm_kvcache_plugin.keys import KeyBuilder, chained_hashes; b = KeyBuilder('model', 1, 0);"
            "print('\\n'.join(b.key(c.chunk_hash) for c in chained_hashes(range(300), 256)))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == here


def test_token_ids_out_of_range_rejected():
    with pytest.raises(ValueError):
        chained_hashes([-1], 4)

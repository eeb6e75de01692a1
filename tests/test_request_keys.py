"""Every input that changes a request's K/V is in its chunk keys (vLLM's real Request objects).

vLLM's own prefix cache hashes the LoRA adapter, cache_salt, multimodal items and prompt embeddings
into its block hashes; the store must too, or a request loads KV computed for other inputs. The
end-to-end versions (real engine, real adapter, real salts and embeddings) are in
tests/test_e2e_isolation.py; multimodal keys are tested here only (no small vision model at hand).
"""

from __future__ import annotations

import uuid

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM's Request objects are needed (pip install -e '.[cpu]')")

from vllm.lora.request import LoRARequest
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
from vllm.sampling_params import SamplingParams
from vllm.v1.request import Request

from tests.test_vllm_adapter import BLOCK, CHUNK, Harness, make_request, step
from vllm_kvcache_plugin.integration.vllm.connector import worker_rank
from vllm_kvcache_plugin.integration.vllm.lookup import lookup_address
from vllm_kvcache_plugin.integration.vllm.request_keys import RequestKeys
from vllm_kvcache_plugin.keys import chained_hashes

TOKENS = list(range(1000, 1000 + 5 * CHUNK + 7))  # five whole chunks and a partial one
KEYS = RequestKeys(CHUNK, include_partial=True)


def request(tokens=TOKENS, **kwargs) -> Request:
    return Request(uuid.uuid4().hex, tokens, SamplingParams(max_tokens=4), None, **kwargs)


def hashes(req: Request) -> list[str]:
    return [c.chunk_hash for c in KEYS.chunks(req)]


def image(identifier: str, offset: int, length: int) -> MultiModalFeatureSpec:
    return MultiModalFeatureSpec(data=None, modality="image", identifier=identifier,
                                 mm_position=PlaceholderRange(offset=offset, length=length))


def test_plain_request_keeps_the_token_only_keys():
    assert KEYS.chunks(request()) == chained_hashes(TOKENS, CHUNK)


def test_each_salt_has_its_own_key_space_and_never_appears_in_a_key():
    plain, a, a_again, b = (hashes(request(cache_salt=s)) for s in (None, "tenant-a", "tenant-a", "tenant-b"))
    assert a == a_again
    for other in (plain, b):  # every chunk differs: the salt is in the chain's root
        assert all(x != y for x, y in zip(a, other, strict=True))
    assert not any("tenant" in h for h in a + b)


def test_lora_adapter_name_and_path_are_both_in_the_keys():
    base = hashes(request())
    ad = hashes(request(lora_request=LoRARequest("ad", 1, "/adapters/ad")))
    renamed = hashes(request(lora_request=LoRARequest("ad2", 2, "/adapters/ad")))
    repointed = hashes(request(lora_request=LoRARequest("ad", 1, "/adapters/ad-v2")))
    assert ad == hashes(request(lora_request=LoRARequest("ad", 7, "/adapters/ad")))  # the int id is not identity
    for other in (base, renamed, repointed):
        assert all(x != y for x, y in zip(ad, other, strict=True))


def test_different_images_behind_the_same_placeholders_get_different_keys():
    start = 2 * CHUNK + 5  # the image's placeholder tokens sit in chunks 2 and 3
    first = hashes(request(mm_features=[image("img-cat", start, CHUNK)]))
    second = hashes(request(mm_features=[image("img-dog", start, CHUNK)]))
    moved = hashes(request(mm_features=[image("img-cat", start + 1, CHUNK)]))
    text = hashes(request())
    assert first == hashes(request(mm_features=[image("img-cat", start, CHUNK)]))
    # Chunks before the image are shared (a common prefix stays a hit); from its chunk on, all differ.
    for other in (second, moved, text):
        assert first[:2] == other[:2]
        assert all(x != y for x, y in zip(first[2:], other[2:], strict=True))


def test_mixed_prompt_embeddings_are_in_the_keys():
    n = len(TOKENS)
    mask = [not (CHUNK <= i < CHUNK + 8) for i in range(n)]  # 8 embedded positions in chunk 1
    tokens = [t if m else 0 for t, m in zip(TOKENS, mask, strict=True)]  # the sentinel id, as vLLM keeps it
    embeds = torch.randn(n, 16, generator=torch.Generator().manual_seed(0))
    other = embeds.clone()
    other[CHUNK + 3] += 1.0

    def keys(e: torch.Tensor) -> list[str]:
        return hashes(request(tokens, prompt_embeds=e, prompt_is_token_ids=mask))

    same, changed = keys(embeds), keys(other)
    assert same == keys(embeds.clone())
    assert same[0] == changed[0] and all(x != y for x, y in zip(same[1:], changed[1:], strict=True))
    assert keys(embeds.to(torch.bfloat16)) != same  # the embeddings' dtype is part of them
    assert hashes(request(tokens)) != same


def test_a_prompt_of_embeddings_only_is_not_cached(caplog):
    keys = RequestKeys(CHUNK, include_partial=True)
    req = Request(uuid.uuid4().hex, None, SamplingParams(max_tokens=4), None, prompt_embeds=torch.randn(40, 16))
    with caplog.at_level("INFO"):
        assert keys.chunks(req) == [] and keys.chunks(req) == []
    assert sum("only as prompt embeddings are not cached" in r.getMessage() for r in caplog.records) == 1


def test_instance_variant_changes_every_key():
    quantized = RequestKeys(CHUNK, True, (("quantization", "fp8"),))
    assert all(x != y for x, y in zip(hashes(request()), [c.chunk_hash for c in quantized.chunks(request())],
                                      strict=True))


def test_worker_ranks_and_lookup_addresses_are_distinct_per_stage():
    """Pipeline parallel: each stage holds other layers, so TP x PP ranks name keys and channels.
    With PP=1 the rank is the TP rank (the seed's keys); the end-to-end TP=2 test is in
    tests/test_e2e_parallel.py."""
    tp, pp = 2, 2
    ranks = [worker_rank(t, p, tp) for p in range(pp) for t in range(tp)]
    assert ranks == [0, 1, 2, 3]
    assert [worker_rank(t, 0, tp) for t in range(tp)] == [0, 1]
    assert len({lookup_address("engine", 0, r) for r in ranks}) == tp * pp


def test_scheduler_asks_every_worker_of_a_pipeline_parallel_instance(model_dir):
    """vLLM's CPU build cannot run PP=2 here (its model runner asserts on missing intermediate
    tensors, with or without a connector), so the scheduler side is built from vLLM's own config
    objects: TP=3 x PP=2 means 6 workers, 6 lookup channels, world size 6 in the keys."""
    from vllm.config import KVTransferConfig, ModelConfig, ParallelConfig, VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from vllm_kvcache_plugin.integration.vllm import plugin
    from vllm_kvcache_plugin.integration.vllm.connector import LMCacheConnector

    plugin.register()
    config = VllmConfig(model_config=ModelConfig(model=str(model_dir), dtype="float32"),
                        parallel_config=ParallelConfig(pipeline_parallel_size=2, tensor_parallel_size=3),
                        kv_transfer_config=KVTransferConfig(kv_connector="LMCacheConnector", kv_role="kv_both"))
    connector = LMCacheConnector(config, KVConnectorRole.SCHEDULER, None)
    try:
        addresses = connector.scheduler_side.lookups.client.addresses
        assert connector.world_size == 6 and len(set(addresses)) == 6
        assert addresses == [lookup_address(config.kv_transfer_config.engine_id, 0, r) for r in range(6)]
    finally:
        connector.shutdown()


# -- through the scheduler and worker sides: stored under one scope, loaded only by it ----------
def store_prompt(h: Harness, req: Request, kv: torch.Tensor) -> None:
    assert h.matched(req, 0) == (0, False)
    blocks = h.blocks(-(-len(TOKENS) // BLOCK))
    h.sched.update_state_after_alloc(req, (blocks,), 0)
    meta = h.sched.build_meta(step(new=[(req, blocks, 0)], scheduled={req.request_id: len(TOKENS)}))
    h.forward(blocks, 0, len(TOKENS), kv)
    h.worker.save(meta)
    h.sched.build_meta(step(finished=[req.request_id]))


def hit(h: Harness, req: Request) -> int:
    return h.matched(req, 0)[0]


def test_scheduler_hits_only_the_scope_a_prompt_was_stored_under():
    h = Harness()
    try:
        kv = torch.randn(2, 3, len(TOKENS), 2, 32).to(torch.bfloat16)
        store_prompt(h, request(cache_salt="a", lora_request=LoRARequest("ad", 1, "/ad")), kv)
        assert hit(h, request(cache_salt="a", lora_request=LoRARequest("ad", 1, "/ad"))) == len(TOKENS) - 1
        for other in (request(), request(cache_salt="b", lora_request=LoRARequest("ad", 1, "/ad")),
                      request(cache_salt="a"), make_request(TOKENS)):
            assert hit(h, other) == 0
    finally:
        h.close()

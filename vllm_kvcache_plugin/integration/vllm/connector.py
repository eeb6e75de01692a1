"""``LMCacheConnector``: the KVConnectorBase_V1 face of the plugin. It picks a role and delegates.

The scheduler-role instance (engine core process) owns a :class:`SchedulerSide`; the worker-role
instance (each worker process) owns a :class:`WorkerSide` with the storage tiers. The per-step
:class:`StepMetadata` is the only thing that flows from one to the other (plus lookups, which the
scheduler sends over the workers' lookup channel).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from ... import events
from ...config import KVCacheConfig
from ...engine import KVCacheEngine, TierName, describe_remote
from ...errors import ConfigError
from ...kernels import AttentionKind, Packing, PagedKVSpec
from ...settings import load_settings
from .cpus import place_connector_threads
from .layout import CacheLayout, cache_layout, plain_layout
from .lookup import AsyncLookups, LookupClient, lookup_address
from .metadata import StepMetadata
from .request_keys import instance_variant
from .scheduler import SchedulerSide
from .stats import KVCacheConnectorStats, PromMetrics, flatten_storage_stats
from .worker import WorkerSide, build_registered_cache, registered_parts

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig as VllmKVCacheConfig
    from vllm.v1.request import Request

logger = logging.getLogger("vllm_kvcache_plugin")

_TIER_SOURCE = {TierName.HOT: CacheHitSource.HOST, TierName.DISK: CacheHitSource.DISK,
                TierName.REMOTE: CacheHitSource.EXTERNAL_UNSPECIFIED}


def connector_config(vllm_config: VllmConfig) -> KVCacheConfig:
    """Our settings: LMCACHE_CONFIG_FILE, LMCACHE_* env vars, then kv_connector_extra_config."""
    extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
    config = load_settings(extra)
    logging.getLogger("vllm_kvcache_plugin").setLevel(config.log_level)
    events.configure(config.log_events)
    return config


def shutdown_hint(can_save: bool, shutdown_timeout: int | None) -> str | None:
    """vLLM's default ``--shutdown-timeout 0`` kills the workers at once on SIGTERM, before the
    connector's shutdown can finish the writes still queued: the last requests before a restart
    would then miss. Any grace period lets them finish (they take milliseconds)."""
    if not can_save or shutdown_timeout != 0:
        return None
    return ("vllm-kvcache-plugin: vLLM runs with --shutdown-timeout 0, so on SIGTERM it kills its workers at "
            "once and chunk writes still queued (the last requests before a restart) are lost; start vLLM "
            "with --shutdown-timeout 10 to let them finish")


def worker_rank(tp_rank: int, pp_rank: int, tp_size: int) -> int:
    """The rank in keys and lookup addresses: stage-major, so PP=1 keeps the TP rank."""
    return pp_rank * tp_size + tp_rank


def model_name_for_keys(vllm_config: VllmConfig, config: KVCacheConfig) -> str:
    return config.model_name or vllm_config.model_config.model


class LMCacheConnector(KVConnectorBase_V1, SupportsHMA):
    """Subclasses ``SupportsHMA``: vLLM keeps its hybrid KV-cache manager on (sliding-window layers
    hold only their window, SSM hybrids start at all); layout.py says what a chunk then holds."""

    _cache_hit_source = CacheHitSource.EXTERNAL_UNSPECIFIED

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: VllmKVCacheConfig | None = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        try:
            self.config = connector_config(vllm_config)
        except ConfigError as exc:
            # One line for the operator, not a traceback wall from deep inside vLLM's start-up.
            logger.error("vllm-kvcache-plugin: invalid configuration: %s", exc)
            raise SystemExit(f"vllm-kvcache-plugin: invalid configuration: {exc}") from None
        ktc = vllm_config.kv_transfer_config
        self.can_save = ktc.kv_role in ("kv_producer", "kv_both")
        self.can_load = ktc.kv_role in ("kv_consumer", "kv_both")
        parallel = vllm_config.parallel_config
        # Keys and lookup channels are per worker of this replica: TP x PP ranks (a PP stage holds
        # other layers, so its chunks are other values). With PP=1 this is the seed's TP rank.
        self.tp_size = parallel.tensor_parallel_size
        self.world_size = self.tp_size * parallel.pipeline_parallel_size
        self.layout = cache_layout(kv_cache_config) if kv_cache_config is not None else plain_layout()
        self.block_size = vllm_config.cache_config.block_size
        if self.layout.hybrid:
            sizes = {group.kv_cache_spec.block_size for group in kv_cache_config.kv_cache_groups}
            if len(sizes) > 1:
                self.layout = CacheLayout(self.layout.groups, (), f"its KV-cache groups have different block "
                                          f"sizes {sorted(sizes)}")
            else:
                self.block_size = sizes.pop()
        if self.layout.uncached_reason:
            self.can_load = self.can_save = False
        engine_id = ktc.engine_id or "default"
        dp_rank = parallel.data_parallel_rank
        self.scheduler_side: SchedulerSide | None = None
        self.worker_side: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            if ktc.kv_load_failure_policy != "recompute":
                # A cache miss must never fail a request: recompute what could not be loaded.
                ktc.kv_load_failure_policy = "recompute"
                logger.info("vllm-kvcache-plugin: kv_load_failure_policy set to 'recompute' "
                            "(a chunk that cannot be loaded is recomputed, not an error)")
            addresses = [lookup_address(engine_id, dp_rank, r) for r in range(self.world_size)]
            lookups = AsyncLookups(LookupClient(addresses, self.config.blocking_timeout_secs))
            self.scheduler_side = SchedulerSide(self.config, lookups,
                                                self.can_load, self.can_save, self.block_size,
                                                instance_variant(vllm_config), self.layout)
            self._log_layout(vllm_config.model_config.model)
            remote = describe_remote(self.config.remote_url)
            logger.info("vllm-kvcache-plugin scheduler side ready: role %s, chunk %d tokens, remote %s, serde %s",
                        ktc.kv_role, self.config.chunk_size, remote, self.config.remote_serde)
            events.emit("ready", side="scheduler", role=ktc.kv_role, chunk_size=self.config.chunk_size,
                        remote=remote, serde=self.config.remote_serde, world_size=self.world_size)
            if hint := shutdown_hint(self.can_save, getattr(vllm_config, "shutdown_timeout", None)):
                logger.warning(hint)
        else:
            from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

            rank = worker_rank(get_tensor_model_parallel_rank(), get_pp_group().rank_in_group, self.tp_size)
            place_connector_threads(self.config)  # before the engine starts its threads
            engine = KVCacheEngine(self.config, model_name_for_keys(vllm_config, self.config), self.world_size, rank)
            self.worker_side = WorkerSide(engine, self.block_size, lookup_address(engine_id, dp_rank, rank),
                                          self.layout)
            logger.info("vllm-kvcache-plugin worker %d/%d ready: tiers %s, keys %s",
                        rank, self.world_size, "+".join(engine.tiers) or "none", engine.key_pattern)
            events.emit("ready", side="worker", rank=rank, world_size=self.world_size, tiers=engine.tiers,
                        keys=engine.key_pattern)

    def _log_layout(self, model: str) -> None:
        layout = self.layout
        if layout.uncached_reason:
            logger.warning("vllm-kvcache-plugin: %s is not cached: %s; every request is a cache miss "
                           "(nothing is saved or loaded)", model, layout.uncached_reason)
        elif layout.hybrid:
            logger.info("vllm-kvcache-plugin: hybrid KV-cache manager on: %s; hits load asynchronously%s",
                        layout.describe(), "" if self.config.async_loading else
                        " (async_loading false does not apply: vLLM takes a hybrid model's failed load only "
                        "from an asynchronous one)")
        events.emit("layout", model=model, groups=len(layout.groups), parts=[p.name for p in layout.parts],
                    uncached=layout.uncached_reason)

    # ==============================  worker side  ==============================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self.worker_side is not None
        if self.layout.uncached_reason:
            logger.info("KV cache not registered: %s", self.layout.uncached_reason)
            return
        if not self.layout.hybrid:
            names, layers = _distinct_layers(kv_caches)
            spec = self._paged_spec(names[0], layers[0])
            self.worker_side.register([build_registered_cache(names, layers, spec)])
            return
        caches = registered_parts(self.layout, kv_caches, self._paged_spec)
        self.worker_side.register(caches)

    def _paged_spec(self, first_name: str, first_layer: torch.Tensor) -> PagedKVSpec:
        from vllm.v1.kv_cache_interface import AttentionSpec, MLAAttentionSpec

        groups = self._kv_cache_config.kv_cache_groups
        specs = [g.kv_cache_spec for g in groups if isinstance(g.kv_cache_spec, AttentionSpec)]
        if not specs:
            raise RuntimeError("vllm-kvcache-plugin supports attention KV caches only")
        attn = specs[0]
        kind = AttentionKind.MLA if isinstance(attn, MLAAttentionSpec) else AttentionKind.MHA
        packing = Packing.PLAIN
        layer_module = self._vllm_config.compilation_config.static_forward_context.get(first_name)
        isa = getattr(layer_module, "isa", None)
        if isa is not None and first_layer.device.type == "cpu":
            packing = PagedKVSpec.packing_for_cpu_isa(isa)
        block_size = first_layer.shape[2]
        head_size = first_layer.shape[3] // (2 if kind is AttentionKind.MHA else 1)
        return PagedKVSpec(kind=kind, block_size=block_size, num_kv_heads=first_layer.shape[1],
                           head_size=head_size, dtype=first_layer.dtype, packing=packing)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        if self.worker_side is not None and self.can_load:
            self.worker_side.load(self._step_meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # a synchronous load is complete when start_load_kv returns

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """Finished loads, and (hybrid models) the failed ones among them, which vLLM recomputes."""
        _, finished = self.get_finished(finished_req_ids)
        failed = self.worker_side.take_failed_loads() if self.worker_side is not None else set()
        return KVConnectorTransferResults(finished_recving=set(finished or ()), failed_recving=failed)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Requests whose asynchronous load ended (loaded, failed into load errors, or cancelled)."""
        if self.worker_side is None:
            return None, None
        meta = self._get_connector_metadata() if self.has_connector_metadata() else None
        idle = isinstance(meta, StepMetadata) and meta.idle
        return None, self.worker_side.take_finished_loads(wait=idle) or None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return None  # all layers are gathered at once in wait_for_save

    def wait_for_save(self) -> None:
        if self.worker_side is not None and self.can_save and self.has_connector_metadata():
            self.worker_side.save(self._step_meta())

    def _step_meta(self) -> StepMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, StepMetadata)
        return meta

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker_side.take_load_errors() if self.worker_side is not None else set()

    def get_kv_connector_stats(self) -> KVCacheConnectorStats | None:
        if self.worker_side is None:
            return None
        snapshot = flatten_storage_stats(self.worker_side.engine.stats())
        data = self.worker_side.stats.take(snapshot)
        return KVCacheConnectorStats(data=data) if data else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVCacheConnectorStats:
        return KVCacheConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> PromMetrics:
        return PromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self.worker_side is not None:
            self.worker_side.close()
            self.worker_side = None
        if self.scheduler_side is not None:
            lookups = self.scheduler_side.lookups
            waits = lookups.wait_summary()
            logger.info("vllm-kvcache-plugin: %d idle scheduler steps waited for lookup answers (p50 %.3f ms, p99 "
                        "%.3f ms, max %.3f ms; budget %.1f ms a step); %d busy steps asked and did not wait",
                        waits["steps"], waits["p50_ms"], waits["p99_ms"], waits["max_ms"], 1e3 * lookups.step_budget,
                        waits["busy_steps_asked"])
            events.emit("lookup_waits", **waits)
            lookups.close()

    # ==============================  scheduler side  ==============================
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self.scheduler_side is not None
        return self.scheduler_side.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self.scheduler_side is not None
        self.scheduler_side.update_state_after_alloc(request, blocks.get_block_ids(), num_external_tokens)

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[CacheHitSource, int]:
        if not num_external_tokens or self.scheduler_side is None:
            return {}
        tracker = self.scheduler_side.trackers.get(request.request_id)
        if tracker is None:
            return {CacheHitSource.EXTERNAL_UNSPECIFIED: num_external_tokens}
        # The outermost tier that served the request, for vLLM's prefix-cache hit metrics.
        tiers = tracker.tiers
        for tier in reversed(TierName):
            if tiers.get(tier.value):
                return {_TIER_SOURCE[tier]: num_external_tokens}
        return {CacheHitSource.EXTERNAL_UNSPECIFIED: num_external_tokens}

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> StepMetadata:
        assert self.scheduler_side is not None
        return self.scheduler_side.build_meta(scheduler_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self.scheduler_side is not None:
            self.scheduler_side.request_finished(request)
        return False, None  # saves never hold blocks: they are gathered in the step that computed them

    def request_finished_all_groups(self, request: Request,
                                    block_ids: tuple[list[int], ...]) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished(request, block_ids[0] if block_ids else [])


def _distinct_layers(kv_caches: dict[str, torch.Tensor]) -> tuple[list[str], list[torch.Tensor]]:
    """Layers in model order, each storage once (layers that share KV appear under several names)."""
    from vllm.model_executor.models.utils import extract_layer_index

    def order(name: str) -> tuple[int, str]:
        try:
            return extract_layer_index(name), name
        except (AssertionError, ValueError):
            return 1 << 30, name

    names, layers, seen = [], [], set()
    for name in sorted(kv_caches, key=order):
        tensor = kv_caches[name]
        ident = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if ident in seen:
            continue
        seen.add(ident)
        names.append(name)
        layers.append(tensor)
    return names, layers

"""Where a worker's connector threads run: vLLM's OpenMP binding for the worker, or the setting.

vLLM's CPU worker (``VLLM_CPU_OMP_THREADS_BIND``, ``auto`` by default) binds its OpenMP team one
thread per core through OpenMP's own variables, which the worker process inherits; the model
runner's thread holds the first of those cores. ``threads`` explains why that matters to a thread
the connector starts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from ...config import KVCacheConfig
from ...threads import INHERIT, format_cpu_list, openmp_bound_cpus, parse_cpu_list, set_background_cpus

logger = logging.getLogger(__name__)


def connector_thread_cpus(config: KVCacheConfig, env: Mapping[str, str]) -> tuple[frozenset[int] | None, str]:
    """The CPUs for the connector's threads (None: where they start) and why."""
    if config.thread_cpus == INHERIT:
        return None, "thread_cpus: inherit"
    if config.thread_cpus:
        return parse_cpu_list(config.thread_cpus), f"thread_cpus from {config.source('thread_cpus')}"
    bound = openmp_bound_cpus(env)
    if bound is None:
        return None, "vLLM binds no OpenMP thread here"
    cpus, variable = bound
    return cpus, f"this worker's OpenMP binding, {variable}"


def place_connector_threads(config: KVCacheConfig, env: Mapping[str, str] = os.environ) -> frozenset[int] | None:
    """Decide once per worker process, before the connector starts a thread, and log it."""
    cpus, why = connector_thread_cpus(config, env)
    set_background_cpus(cpus)
    if cpus is None:
        logger.info("vllm-kvcache-plugin: connector threads run where they start (%s)", why)
    else:
        logger.info("vllm-kvcache-plugin: connector threads run on CPUs %s (%s)", format_cpu_list(cpus), why)
    return cpus

"""One typed configuration, merged from four sources.

Precedence, lowest to highest: defaults < the YAML file named by ``LMCACHE_CONFIG_FILE`` <
``LMCACHE_<KEY>`` environment variables < vLLM's ``kv_connector_extra_config`` (bare keys or keys
prefixed ``lmcache.``). This module checks types and ranges and remembers each value's source; the
values a component owns (a serde's name and options, the remote URL) are checked by that
component's registry (``settings.load_settings`` runs both). Every bad value raises
:class:`ConfigError` with one line that names the key, where it came from and what is allowed, so a
typo stops start-up instead of silently caching nothing.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError

logger = logging.getLogger(__name__)

ENV_PREFIX = "LMCACHE_"
CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"
EXTRA_CONFIG_PREFIX = "lmcache."

# Set by LMCache's own docs and the seed's command line; meaningless here but harmless.
IGNORED_ENV_KEYS = frozenset({"USE_EXPERIMENTAL", "TRACK_USAGE"})

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class KVCacheConfig:
    """Every setting of the connector. Field docs become the README table."""

    chunk_size: int = 256
    """Tokens per stored chunk (the unit of keys, storage and retrieval)."""
    local_cpu: bool = True
    """Keep a CPU hot cache (LRU) of recently stored / loaded chunks in the worker."""
    max_local_cpu_size: float = 5.0
    """Hot cache budget in GB (10^9 bytes); the cache never holds more."""
    local_disk: str | None = None
    """Folder (or file:// URL) of the local disk tier; unset disables it."""
    max_local_disk_size: float = 5.0
    """Disk tier budget in GB; least recently used files are deleted beyond it."""
    remote_url: str | None = None
    """Remote store URL, chosen by scheme: lm, redis, rediss, unix, redis-sentinel,
    redis-cluster, valkey, mooncakestore, fs, blackhole."""
    remote_serde: str = "naive"
    """Wire format of values in the remote store: naive (the exact KV) or cachegen (~4.2x smaller, lossy:
    perplexity unchanged, but 32 greedy tokens after a hit differed from a naive hit's in 15 of 20 prompts
    on vLLM, 9 of 20 with bins 256 / 96 at 2.7x; docs/cachegen.md)."""
    save_unfull_chunk: bool = True
    """Also store a prompt's trailing partial chunk (else its tokens are recomputed on a hit)."""
    blocking_timeout_secs: float = 2.0
    """Longest wait for the remote in the request path (a lookup; a load waits this plus its bytes at
    min_load_gb_per_sec) before treating it as a miss."""
    min_load_gb_per_sec: float = 0.5
    """Slowest remote transfer rate (GB/s) a load is given time for: a load of B bytes may take
    blocking_timeout_secs + B / this before it is a miss, so a long prompt or a big model's chunks
    do not time out on a store that is slow but alive."""
    async_loading: bool = True
    """While other requests run, load hits that need I/O (disk, remote) in the background, so their
    decode never waits for it (vLLM's asynchronous KV loads). Hot-cache hits, and hits while nothing
    else runs, load before the step's forward (no one waits, and it saves a step). false: every
    load stops the step until it is done."""
    thread_cpus: str | None = None
    """CPUs the connector's threads run on in a worker (fetch, loader, writer, I/O), e.g. "0-3,8";
    unset: every CPU vLLM bound the worker's OpenMP team to (VLLM_CPU_OMP_THREADS_BIND), not just the
    model runner's first core that a new thread would inherit; inherit: leave them where they start.
    One list serves every worker of the host (with TP > 1 their threads share it)."""
    existence_cache_ttl_secs: float = 10.0
    """How long a positive existence answer from the remote is trusted without asking again
    (0 disables the existence cache)."""
    put_queue_size: int = 256
    """Pending disk / remote writes; when full the oldest pending write is dropped (and counted)."""
    put_queue_max_gb: float = 1.0
    """Bytes of chunks the pending writes may hold (GB), whatever their count (256 chunks of a 7B
    model are ~8.6 GB); beyond it the oldest pending writes are dropped (and counted)."""
    model_name: str | None = None
    """Model name used in keys instead of vLLM's model name/path (share a store across paths)."""
    log_level: str = "INFO"
    """Log level of this package's loggers."""
    log_events: bool = False
    """Also log structured events, one JSON object per line after "kvcache-event" (docs/events.md):
    each request's lookup at INFO, each chunk saved / loaded with its checksum at DEBUG."""
    remote_options: dict[str, Any] = field(default_factory=dict)
    """Connector-specific settings (e.g. Mooncake's), passed to the remote connector."""
    cachegen_key_bins: str | None = None
    """CacheGen key quantisation bins per layer group, e.g. "32:10,16" (32 bins for the first 10
    layers, then 16); unset: 64 in every layer (keys matter ~4x more than values, measured)."""
    cachegen_value_bins: str | None = None
    """CacheGen value quantisation bins, same syntax as cachegen_key_bins; unset: 24 in every layer."""

    @property
    def max_local_cpu_bytes(self) -> int:
        return int(self.max_local_cpu_size * 1e9)

    @property
    def put_queue_max_bytes(self) -> int:
        return int(self.put_queue_max_gb * 1e9)

    @property
    def max_local_disk_bytes(self) -> int:
        return int(self.max_local_disk_size * 1e9)

    @property
    def local_disk_path(self) -> str | None:
        if not self.local_disk:
            return None
        path = self.local_disk
        if path.startswith("file://"):
            path = path[len("file://") :]
        return path

    def source(self, key: str) -> str:
        """Where ``key``'s value came from (a file, an environment variable, vLLM's extra config)."""
        return self.__dict__.get("_sources", {}).get(key, "default")

    def invalid(self, key: str, message: str) -> ConfigError:
        """The one-line start-up error for a bad value of ``key``, naming where it came from."""
        return ConfigError(f"{key} (from {self.source(key)}): {message}")

    def replace(self, **changes: Any) -> KVCacheConfig:
        return load_config(extra_config={**self.as_dict(), **changes}, env={}, source="replace")

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


FIELD_TYPES: dict[str, str] = {
    "chunk_size": "int",
    "local_cpu": "bool",
    "max_local_cpu_size": "float",
    "local_disk": "optional_str",
    "max_local_disk_size": "float",
    "remote_url": "optional_str",
    "remote_serde": "str",
    "save_unfull_chunk": "bool",
    "blocking_timeout_secs": "float",
    "min_load_gb_per_sec": "float",
    "async_loading": "bool",
    "thread_cpus": "optional_str",
    "existence_cache_ttl_secs": "float",
    "put_queue_size": "int",
    "put_queue_max_gb": "float",
    "model_name": "optional_str",
    "log_level": "str",
    "log_events": "bool",
    "remote_options": "dict",
    "cachegen_key_bins": "optional_str",
    "cachegen_value_bins": "optional_str",
}

# LMCache spellings accepted as synonyms (the key they mean here).
ALIASES = {"exists_cache_ttl": "existence_cache_ttl_secs", "save_unfull_chunks": "save_unfull_chunk"}


def _type_hint(kind: str) -> str:
    return {
        "int": "an integer",
        "float": "a number",
        "bool": "true/false (True, False, 1, 0, yes, no)",
        "str": "a string",
        "optional_str": "a string (or empty to unset)",
        "dict": "a mapping",
    }[kind]


def _coerce(key: str, raw: Any, source: str) -> Any:
    kind = FIELD_TYPES[key]
    bad = ConfigError(f"{key} (from {source}): {raw!r} is not {_type_hint(kind)}")
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, int) and raw in (0, 1):
            return bool(raw)
        if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise bad
    if kind == "int":
        if isinstance(raw, bool):
            raise bad
        if isinstance(raw, int):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw.strip())
            except ValueError:
                raise bad from None
        raise bad
    if kind == "float":
        if isinstance(raw, bool):
            raise bad
        if not isinstance(raw, (int, float, str)):
            raise bad
        try:
            value = float(raw.strip() if isinstance(raw, str) else raw)
        except ValueError:
            raise bad from None
        if not math.isfinite(value):  # "inf" would be a wait with no end, "nan" compares false to every bound
            raise ConfigError(f"{key} (from {source}): {raw!r} must be a finite number")
        return value
    if kind == "dict":
        if isinstance(raw, Mapping):
            return dict(raw)
        raise bad
    # str / optional_str
    if raw is None:
        if kind == "optional_str":
            return None
        raise bad
    if isinstance(raw, (dict, list, tuple)):
        raise bad
    text = str(raw).strip()
    if kind == "optional_str" and text.lower() in ("", "none", "null"):
        return None
    return text


def _validate(values: dict[str, Any], sources: dict[str, str]) -> None:
    """Types and ranges. What a component owns (a serde's name and options, the remote URL) is
    checked by that component's registry: ``settings.load_settings`` runs both."""
    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"{key} (from {sources.get(key, 'default')}): {msg}")

    if values["chunk_size"] <= 0:
        fail("chunk_size", f"{values['chunk_size']} must be a positive number of tokens")
    for key in ("max_local_cpu_size", "max_local_disk_size"):
        if values[key] < 0:
            fail(key, f"{values[key]} must be >= 0 (GB)")
    for key in ("blocking_timeout_secs", "existence_cache_ttl_secs"):
        if values[key] < 0:
            fail(key, f"{values[key]} must be >= 0 (seconds)")
    if values["blocking_timeout_secs"] == 0:
        fail("blocking_timeout_secs", "0 would make every remote lookup a miss; use > 0")
    if values["min_load_gb_per_sec"] <= 0:
        fail("min_load_gb_per_sec", f"{values['min_load_gb_per_sec']} must be > 0 (GB/s)")
    if values["put_queue_max_gb"] <= 0:
        fail("put_queue_max_gb", f"{values['put_queue_max_gb']} must be > 0 (GB)")
    if values["put_queue_size"] <= 0:
        fail("put_queue_size", f"{values['put_queue_size']} must be a positive count")
    level = str(values["log_level"]).upper()
    if level not in _LOG_LEVELS:
        fail("log_level", f"{values['log_level']!r} is not one of {', '.join(_LOG_LEVELS)}")
    values["log_level"] = level



def _normalise_key(key: str) -> str:
    key = key.strip()
    if key.startswith(EXTRA_CONFIG_PREFIX):
        key = key[len(EXTRA_CONFIG_PREFIX) :]
    key = key.lower()
    return ALIASES.get(key, key)


def _unknown(key: str, source: str) -> ConfigError:
    import difflib

    name = _normalise_key(key[len(ENV_PREFIX):] if key.startswith(ENV_PREFIX) else key)
    close = difflib.get_close_matches(name, FIELD_TYPES, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "."
    return ConfigError(f"{key} (from {source}): unknown key{hint} Known keys: {', '.join(FIELD_TYPES)}")


def _read_yaml(path: str) -> dict[str, Any]:
    import yaml

    source = f"{CONFIG_FILE_ENV}={path}"
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{CONFIG_FILE_ENV}: file {path!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{CONFIG_FILE_ENV}: cannot read {path!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"{source}: not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of key: value")
    return dict(data)


def load_config(
    extra_config: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    source: str = "kv_connector_extra_config",
) -> KVCacheConfig:
    """Merge defaults, the YAML file, the environment and vLLM's extra config (highest wins)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {
        f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
        for f in fields(KVCacheConfig)
    }
    sources: dict[str, str] = {}

    def apply(key: str, raw: Any, src: str) -> None:
        name = _normalise_key(key)
        if name not in FIELD_TYPES:
            raise _unknown(key, src)
        values[name] = _coerce(name, raw, src)
        sources[name] = src

    config_file = env.get(CONFIG_FILE_ENV)
    if config_file:
        for key, raw in _read_yaml(config_file).items():
            apply(str(key), raw, f"{config_file}")

    for env_key, raw in env.items():
        if not env_key.startswith(ENV_PREFIX) or env_key == CONFIG_FILE_ENV:
            continue
        key = env_key[len(ENV_PREFIX) :]
        if key in IGNORED_ENV_KEYS:
            logger.debug("Ignoring %s=%s (an LMCache setting with no meaning here)", env_key, raw)
            continue
        name = _normalise_key(key)
        if name not in FIELD_TYPES:
            raise _unknown(env_key, "environment")
        if FIELD_TYPES[name] == "dict":
            raise ConfigError(f"{env_key} (from environment): {name} can only be set in YAML or extra config")
        apply(key, raw, f"env {env_key}")

    for key, raw in (extra_config or {}).items():
        apply(str(key), raw, source)

    _validate(values, sources)
    config = KVCacheConfig(**values)
    object.__setattr__(config, "_sources", dict(sources))  # not a setting: where each one came from
    return config


def describe_keys() -> list[tuple[str, str, str, str]]:
    """(key, env var, default, meaning) for every key: the README table is generated from this."""
    import inspect

    docs = _field_docs()
    rows = []
    for f in fields(KVCacheConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        env_var = f"{ENV_PREFIX}{f.name.upper()}" if FIELD_TYPES[f.name] != "dict" else "(YAML / extra config only)"
        rows.append((f.name, env_var, repr(default), inspect.cleandoc(docs.get(f.name, ""))))
    return rows


def _field_docs() -> dict[str, str]:
    """Read the attribute docstrings under each field from this module's source."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(KVCacheConfig))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs

"""Mooncake Store settings: one typed object merged from MOONCAKE_CONFIG_PATH's JSON, then
``remote_options``, then the URL; every bad value is a one-line ConfigError naming key and source."""

from __future__ import annotations

import difflib
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..errors import ConfigError
from .url import RemoteURL

logger = logging.getLogger(__name__)

CONFIG_PATH_ENV = "MOONCAKE_CONFIG_PATH"
MiB = 1 << 20
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(raw: Any) -> int:
    """Bytes from an int or a string such as "512MB", "4 GiB" (binary units, as Mooncake reads them)."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise ValueError(f"{raw!r} is not a size")
    if isinstance(raw, (int, float)):
        value = int(raw)
    else:
        match = _SIZE_RE.match(raw)
        if not match:
            raise ValueError(f"{raw!r} is not a size such as 536870912, '512MB' or '4 GiB'")
        value = int(float(match[1]) * _UNITS[match[2].lower()[:1]])
    if value < 0:
        raise ValueError(f"{raw!r} is negative")
    return value


def _string(pattern: str = "", hint: str = "", lower: bool = False) -> Callable[[Any], str]:
    regex = re.compile(pattern, re.I) if pattern else None

    def parse(raw: Any) -> str:
        if not isinstance(raw, str):
            raise ValueError(f"{raw!r} is not a string")
        text = raw.strip().lower() if lower else raw.strip()
        if regex is not None and not regex.match(text):
            raise ValueError(f"{raw!r} is not {hint}")
        return text

    return parse


def _positive(kind: type) -> Callable[[Any], Any]:
    def parse(raw: Any) -> Any:
        try:
            value = kind(raw) if not isinstance(raw, bool) else None
        except (TypeError, ValueError):
            value = None
        if value is None or value <= 0 or (kind is int and isinstance(raw, float) and raw != value):
            raise ValueError(f"{raw!r} is not a positive {'integer' if kind is int else 'number'}")
        return value

    return parse


def _flag(raw: Any) -> bool:
    text = str(raw).strip().lower()
    if isinstance(raw, bool) or text in ("true", "false", "1", "0", "yes", "no"):
        return raw if isinstance(raw, bool) else text in ("true", "1", "yes")
    raise ValueError(f"{raw!r} is not true or false")


@dataclass(frozen=True)
class MooncakeSettings:
    """Everything the Mooncake client needs; see docs/mooncake.md for each key."""

    local_hostname: str
    metadata_server: str
    master_server_address: str
    protocol: str = "tcp"
    device_name: str = ""
    global_segment_size: int = 512 * MiB
    local_buffer_size: int = 128 * MiB
    replica_num: int = 1
    transfer_timeout: float = 10.0
    staging_buffer_size: int = 64 * MiB
    metrics_address: str | None = None
    tenant_id: str = "default"
    overwrite: bool = False

    @classmethod
    def load(cls, url: RemoteURL, options: Mapping[str, Any], env: Mapping[str, str]) -> MooncakeSettings:
        """Merge the JSON file < remote_options < the URL; every problem is one ConfigError line."""
        values: dict[str, Any] = {}
        path = env.get(CONFIG_PATH_ENV)
        if path:
            _merge(values, _read_json(path), f"{CONFIG_PATH_ENV}={path}")
        _merge(values, options, "remote_options")
        from_url = {k: v for k, v in url.query.items() if k != "device"}
        if url.device is not None:
            from_url["device_name"] = url.device
        if url.host:
            from_url["master_server_address"] = f"{url.host}:{url.port or 50051}"
        _merge(values, from_url, f"remote URL {url.redacted()!r}")
        for required in ("local_hostname", "metadata_server", "master_server_address"):
            if not values.get(required):
                where = f"the JSON file {path!r}" if path else f"a JSON file named by {CONFIG_PATH_ENV} (unset)"
                raise ConfigError(f"{required}: not set; add it to {where} or to remote_options")
        return cls(**values)

    def servers(self) -> list[tuple[str, int]]:
        """(host, port) of the master and of the metadata server (none for P2PHANDSHAKE): what must
        accept connections before Mooncake's setup is worth calling."""
        found = []
        for address in (self.master_server_address,
                        self.metadata_server.split("://")[-1].split(";")[0].split("/")[0]):
            host, _, port = address.rpartition(":")
            if host and port.isdigit():
                found.append((host.strip("[]"), int(port)))
        return found


_text, _address = _string(), _string(r"^\S+:\d+$", "host:port")
_PARSERS: dict[str, Callable[[Any], Any]] = {
    "local_hostname": _text, "master_server_address": _address, "metrics_address": _address,
    "metadata_server": _string(r"^(P2PHANDSHAKE|(etcd|http|https|redis)://\S+|[\w.\-]+:\d+(;[\w.\-]+:\d+)*)$",
                               "P2PHANDSHAKE, etcd://host:port, http://host:port/metadata or redis://..."),
    "protocol": _string(r"^(tcp|rdma)$", "tcp or rdma", lower=True), "device_name": _text, "tenant_id": _text,
    "global_segment_size": parse_size, "local_buffer_size": parse_size, "staging_buffer_size": parse_size,
    "replica_num": _positive(int), "transfer_timeout": _positive(float), "overwrite": _flag,
}
assert set(_PARSERS) == {f.name for f in fields(MooncakeSettings)}
_ALIASES = {"replica_count": "replica_num", "rdma_devices": "device_name", "master_metrics_address": "metrics_address"}
# Keys Mooncake's own tools read that mean nothing here: accepted so one file serves both.
_IGNORED = {"enable_ssd_offload", "ssd_offload_path", "enable_client_http_server", "client_http_port"}


def _merge(values: dict[str, Any], source: Mapping[str, Any], where: str) -> None:
    for raw_key, raw in source.items():
        key = _ALIASES.get(str(raw_key), str(raw_key))
        if key in _IGNORED:
            logger.debug("Mooncake setting %s (from %s) is not used by this connector", key, where)
            continue
        if key not in _PARSERS:
            close = difflib.get_close_matches(key, list(_PARSERS), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(_PARSERS)}"
            raise ConfigError(f"{raw_key} (from {where}): unknown Mooncake setting; {hint}")
        try:
            values[key] = _PARSERS[key](raw)
        except ValueError as exc:
            raise ConfigError(f"{raw_key} (from {where}): {exc}") from None


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{CONFIG_PATH_ENV}: file {path!r} does not exist; point it at your mooncake.json") from None
    except OSError as exc:
        raise ConfigError(f"{CONFIG_PATH_ENV}: cannot read {path!r}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{CONFIG_PATH_ENV}={path}: not valid JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{CONFIG_PATH_ENV}={path}: the top level must be a JSON object of settings")
    return data

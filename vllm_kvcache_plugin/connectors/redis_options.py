"""What a redis-family URL may say (``redis://``, ``rediss://``, ``unix://``, ``valkey://``,
``redis-sentinel://``, ``redis-cluster://``), checked offline into one :class:`RedisOptions`."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from ..errors import URLError
from .url import RemoteURL

#: Query options each scheme accepts (anything else is an error naming these).
_BASIC = ("db", "password", "threads")
QUERY_OPTIONS: dict[str, tuple[str, ...]] = {
    "redis": _BASIC, "valkey": _BASIC, "unix": _BASIC,
    "rediss": (*_BASIC, "ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname"),
    "redis-sentinel": (*_BASIC, "service_name", "sentinel_password"),
    "redis-cluster": ("password", "threads"),
}
#: What each scheme's host part must look like (checked offline, in the error message).
_URL_SHAPES = {
    "unix": "unix:///path/to/redis.sock[?db=N]",
    "redis-sentinel": "redis-sentinel://h1:p1,h2:p2,h3:p3/<service>",
    "redis-cluster": "redis-cluster://h1:p1,h2:p2,...",
}
DEFAULT_PORTS = {"redis-sentinel": 26379}
DEFAULT_SENTINEL_SERVICE = "mymaster"


@dataclass(frozen=True)
class RedisOptions:
    """Everything a redis-family URL says, checked offline."""

    db: int = 0
    username: str | None = None
    password: str | None = None
    threads: int = 4
    ssl: dict[str, Any] | None = None
    service_name: str = DEFAULT_SENTINEL_SERVICE
    sentinel_password: str | None = None

    @classmethod
    def from_url(cls, url: RemoteURL) -> RedisOptions:
        scheme, query = url.scheme, url.query
        if scheme == "unix":
            shape_ok = not url.hosts and bool(url.path)
        elif scheme in ("redis-sentinel", "redis-cluster"):
            shape_ok = bool(url.hosts)
        else:
            shape_ok = len(url.hosts) == 1
        if not shape_ok:
            shape = _URL_SHAPES.get(scheme, f"{scheme}://host:port[/db] (exactly one host:port)")
            raise URLError(f"remote URL {url.redacted()!r}: write {shape}")
        allowed = QUERY_OPTIONS.get(scheme, QUERY_OPTIONS["redis"])
        unknown = sorted(set(query) - set(allowed))
        if unknown:
            raise URLError(f"remote URL {url.redacted()!r}: unknown option(s) {', '.join(unknown)}; "
                           f"{scheme}:// accepts {', '.join(allowed)}")
        db_text = query.get("db")
        path = url.path.strip("/")
        service = query.get("service_name") or DEFAULT_SENTINEL_SERVICE
        if scheme == "redis-sentinel" and path:
            service = path
        elif scheme not in ("unix", "redis-sentinel") and path:
            if db_text is not None and db_text != path:
                raise URLError(f"remote URL {url.redacted()!r}: database given twice ({path!r} and db={db_text})")
            db_text = path
        db = _parse_int(url, "database", db_text or "0", minimum=0)
        if scheme == "redis-cluster" and db != 0:
            raise URLError(f"remote URL {url.redacted()!r}: a Redis cluster has only database 0")
        ssl = _ssl_options(url) if scheme == "rediss" else None
        return cls(
            db=db,
            username=url.username,
            password=query.get("password") or url.password,
            threads=_parse_int(url, "threads", query.get("threads", "4"), minimum=1),
            ssl=ssl,
            service_name=service,
            sentinel_password=query.get("sentinel_password"),
        )


def _parse_int(url: RemoteURL, what: str, text: str, minimum: int) -> int:
    if not text.isdigit() or int(text) < minimum:
        raise URLError(f"remote URL {url.redacted()!r}: {what} {text!r} is not an integer >= {minimum}")
    return int(text)


def _ssl_options(url: RemoteURL) -> dict[str, Any]:
    query = url.query
    options: dict[str, Any] = {"ssl_cert_reqs": query.get("ssl_cert_reqs", "required")}
    if options["ssl_cert_reqs"] not in ("none", "optional", "required"):
        raise URLError(f"remote URL {url.redacted()!r}: ssl_cert_reqs must be none, optional or required")
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if query.get(name):
            options[name] = query[name]
    check = query.get("ssl_check_hostname", "true" if options["ssl_cert_reqs"] != "none" else "false")
    if check.lower() not in ("true", "false", "1", "0"):
        raise URLError(f"remote URL {url.redacted()!r}: ssl_check_hostname must be true or false")
    options["ssl_check_hostname"] = check.lower() in ("true", "1")
    return options


_SECRET_QUERY = re.compile(r"([?&](?:password|sentinel_password)=)[^&]*")


def mask_query_secrets(url: RemoteURL) -> RemoteURL:
    """The URL with ``?password=`` values masked in its text (``redacted()`` only masks the
    ``user:pass@`` form), so logs and reprs that print ``url.redacted()`` never show them."""
    masked = _SECRET_QUERY.sub(r"\1***", url.raw)
    return url if masked == url.raw else dataclasses.replace(url, raw=masked)

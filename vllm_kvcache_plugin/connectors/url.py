"""Remote URLs: ``<scheme>://[user[:pass]@]<host0>:<port0>,<host1>:<port1>/<path>?device=<name>&k=v``.

The seed's form, with several hosts for sentinel and cluster, an optional path (redis database,
sentinel service name, fs folder) and query options (``device`` for RDMA NICs, ``token`` for the lm
server, ...). A parse error names the URL and what is wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote

from ..errors import URLError

_USERINFO_PASSWORD_RE = re.compile(r"(://[^/@:?]*:)[^/?]*@")
_SECRET_QUERY_RE = re.compile(r"(?<=[?&])(password|sentinel_password|token)=([^&]*)")
_URL_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<rest>.*)$", re.S)


@dataclass(frozen=True)
class RemoteURL:
    raw: str
    scheme: str
    hosts: tuple[tuple[str, int | None], ...] = ()
    path: str = ""
    query: dict[str, str] = field(default_factory=dict)
    username: str | None = None
    password: str | None = None

    @property
    def host(self) -> str | None:
        return self.hosts[0][0] if self.hosts else None

    @property
    def port(self) -> int | None:
        return self.hosts[0][1] if self.hosts else None

    @property
    def device(self) -> str | None:
        return self.query.get("device")

    def redacted(self) -> str:
        """The URL with any password or token replaced, for logs."""
        text = _USERINFO_PASSWORD_RE.sub(r"\1***@", self.raw, count=1)
        return _SECRET_QUERY_RE.sub(lambda m: m.group(1) + "=***", text)

    def __repr__(self) -> str:  # never leak a password through repr()
        return f"RemoteURL({self.redacted()!r})"


def _parse_host(url: str, item: str) -> tuple[str, int | None]:
    if item.startswith("["):  # [::1]:6379
        end = item.find("]")
        if end < 0:
            raise URLError(f"remote URL {url!r}: unclosed '[' in host {item!r}")
        host, rest = item[1:end], item[end + 1 :]
        if rest and not rest.startswith(":"):
            raise URLError(f"remote URL {url!r}: expected ':port' after {item[: end + 1]!r}")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = item.partition(":")
    if not host:
        raise URLError(f"remote URL {url!r}: empty host in {item!r}")
    if port_text == "":
        return host, None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise URLError(f"remote URL {url!r}: port {port_text!r} of host {host!r} is not a number in 0..65535")
    return host, int(port_text)


def parse_remote_url(url: str, require_known_scheme: bool = False) -> RemoteURL:
    """Split ``url`` into its parts; with ``require_known_scheme`` the scheme must be registered."""
    if not isinstance(url, str) or not url.strip():
        raise URLError("remote URL is empty; write e.g. redis://127.0.0.1:6379 or lm://127.0.0.1:65432")
    text = url.strip()
    match = _URL_RE.match(text)
    if not match:
        raise URLError(f"remote URL {url!r} has no scheme; write <scheme>://host:port (e.g. redis://127.0.0.1:6379)")
    scheme = match["scheme"].lower()
    rest = match["rest"]
    rest, _, query_text = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    path = slash + path if slash else ""
    username = password = None
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    hosts = tuple(_parse_host(url, item.strip()) for item in netloc.split(",") if item.strip())
    if netloc.strip() and any(not item.strip() for item in netloc.split(",")):
        raise URLError(f"remote URL {url!r}: empty entry in the host list {netloc!r}")
    try:
        query = dict(parse_qsl(query_text, keep_blank_values=True, strict_parsing=bool(query_text)))
    except ValueError:
        raise URLError(f"remote URL {url!r}: query {query_text!r} is not key=value&key=value") from None
    parsed = RemoteURL(text, scheme, hosts, unquote(path), query, username, password)
    if require_known_scheme:
        from .registry import CONNECTORS

        if scheme not in CONNECTORS:
            raise URLError(
                f"remote URL {parsed.redacted()!r}: unknown scheme {scheme!r}; "
                f"known: {', '.join(CONNECTORS.names())}"
            )
    return parsed

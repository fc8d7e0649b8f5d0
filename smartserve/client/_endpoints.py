"""Where to connect: ``bzr://`` and ``bzr+ssh://`` URLs, and the endpoints for them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional
from urllib.parse import quote, unquote, urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint

from .._quiet import connect_quietly
from ..protocol import DEFAULT_LIMITS, Limits
from ._protocol import SmartClientProtocol

__all__ = ["Target", "parse_url", "BZR_PORT", "SSH_PORT", "connector_for_endpoint"]

BZR_PORT = 4155
"""The default port of ``bzr://``."""

SSH_PORT = 22
"""The default port of ``bzr+ssh://``."""

_DEFAULT_PORTS = {"bzr": BZR_PORT, "bzr+ssh": SSH_PORT}


@dataclass(frozen=True)
class Target:
    """A parsed smart server URL.

    ``path`` is the URL's path, unquoted; ``remote_path`` turns a path
    relative to it into the argument a VFS verb expects.
    """

    scheme: str
    host: str
    port: int
    path: str
    user: Optional[str] = None

    def remote_path(self, relpath: str = "") -> bytes:
        """The server-side path of ``relpath`` below this URL, URL-quoted as Breezy sends it."""
        base = self.path if self.path.endswith("/") else self.path + "/"
        joined = base + relpath.lstrip("/") if relpath else self.path or "/"
        return quote(joined, safe="/~").encode("ascii")


def parse_url(url: str) -> Target:
    """Parse ``bzr://host[:port]/path`` or ``bzr+ssh://[user@]host[:port]/path``.

    Raises ``ValueError`` for another scheme or a URL without a host.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"unsupported URL scheme {parts.scheme!r}: use bzr:// or bzr+ssh://")
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in {url!r}: {exc}") from None
    if port == 0:
        raise ValueError(f"port 0 in {url!r}: give the server's port, or leave it out for {_DEFAULT_PORTS[scheme]}")
    return Target(
        scheme=scheme,
        host=parts.hostname,
        port=_DEFAULT_PORTS[scheme] if port is None else port,
        path=unquote(parts.path) or "/",
        user=unquote(parts.username) if parts.username else None,
    )


def connector_for_endpoint(
    endpoint, clock, limits: Limits = DEFAULT_LIMITS
) -> Callable[[], Deferred]:
    """A function that connects a new ``SmartClientProtocol`` through ``endpoint``."""

    def connect() -> Deferred:
        return connect_quietly(endpoint, SmartClientProtocol(clock, limits))

    return connect


def tcp_endpoint(reactor, target: Target, timeout: float):
    """The endpoint for a ``bzr://`` target; an IP address needs no name lookup."""
    if isIPAddress(target.host):
        return TCP4ClientEndpoint(reactor, target.host, target.port, timeout=timeout)
    if isIPv6Address(target.host):
        return TCP6ClientEndpoint(reactor, target.host, target.port, timeout=timeout)
    return HostnameEndpoint(reactor, target.host.encode("idna"), target.port, timeout=timeout)

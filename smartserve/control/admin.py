"""The admin HTTP endpoint: ``/health`` for load balancers, ``/metrics`` for Prometheus."""

from __future__ import annotations

from typing import Optional

from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Site

from ..metrics import CONTENT_TYPE_LATEST, ServerMetrics
from ..server.drain import DrainController, DrainState
from ..server.protocol import ClosedAtOnce

__all__ = ["admin_site", "ADMIN_TIMEOUT", "ADMIN_MAX_CONNECTIONS"]

log = Logger()

# A health check or a scrape sends its request at once and is answered in
# milliseconds; anything slower is a stuck or hostile client.
ADMIN_TIMEOUT = 5.0
# Far more than a few load balancers and Prometheus servers ever hold.
ADMIN_MAX_CONNECTIONS = 64


class HealthResource(Resource):
    """200 while serving, 503 once draining, so a balancer routes elsewhere first."""

    isLeaf = True

    def __init__(self, controller: DrainController):
        super().__init__()
        self._controller = controller

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        state = self._controller.state
        if state is not DrainState.SERVING:
            request.setResponseCode(503)
        return f"{state.value}\n".encode("ascii")

    def render_HEAD(self, request):
        """The status and headers of GET with no body: Twisted logs a warning for each HEAD answered with one."""
        self.render_GET(request)
        return b""


class MetricsResource(Resource):
    """Every server metric in the Prometheus text format."""

    isLeaf = True

    def __init__(self, metrics: ServerMetrics):
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request):
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return self._metrics.render()


class _AdminChannel(HTTPChannel):
    """An HTTP connection that must send each whole request within ``timeOut`` of connecting or of its last answer.

    Twisted's channel restarts its timer at every byte received, so a client
    trickling its headers a byte at a time would hold the connection for good.
    """

    def resetTimeout(self) -> None:
        pass

    def connectionMade(self) -> None:
        self.site.open_connections += 1
        super().connectionMade()

    def connectionLost(self, reason) -> None:
        self.site.open_connections -= 1
        super().connectionLost(reason)


class _AdminSite(Site):
    """A site with a short timeout and a bound on open connections, which does not log every request.

    Health checks come every second; a client that connects and sends
    nothing, or half a request, is closed after ``timeout`` seconds (and cut
    as many seconds later if it does not read), and connections beyond
    ``max_connections`` are closed as soon as they are made, so such clients
    cannot use up the process's file descriptors.
    """

    protocol = _AdminChannel

    def __init__(self, resource, *, timeout: float, max_connections: int, reactor=None):
        super().__init__(resource, timeout=timeout, reactor=reactor)
        self.max_connections = max_connections
        self.open_connections = 0
        self._refusing = False

    def buildProtocol(self, addr):
        if self.open_connections >= self.max_connections:
            if not self._refusing:
                # Once per burst, not once per connection of a flood.
                self._refusing = True
                log.warn(
                    "refusing admin connections: {count} open, the limit",
                    count=self.open_connections,
                )
            return ClosedAtOnce()
        self._refusing = False
        channel = super().buildProtocol(addr)
        channel.abortTimeout = self.timeOut
        return channel

    def log(self, request) -> None:
        pass


class _NotFound(Resource):
    """A plain-text 404 (``twisted.web.pages`` would cost the server 20 ms more start-up to import)."""

    isLeaf = True

    def render(self, request):
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"not found\n"


class _AdminRoot(Resource):
    """The admin site's root: its children, and a plain 404 for anything else."""

    def getChild(self, path, request):
        return _NotFound()


def admin_site(
    controller: DrainController,
    metrics: Optional[ServerMetrics] = None,
    *,
    timeout: float = ADMIN_TIMEOUT,
    max_connections: int = ADMIN_MAX_CONNECTIONS,
    clock=None,
) -> Site:
    """The admin web site for ``controller``, with ``/metrics`` when ``metrics`` is given.

    A connection has ``timeout`` seconds to send each request; at most
    ``max_connections`` are open at once. ``clock`` times them (the reactor
    by default).
    """
    root = _AdminRoot()
    root.putChild(b"health", HealthResource(controller))
    if metrics is not None:
        root.putChild(b"metrics", MetricsResource(metrics))
    site = _AdminSite(root, timeout=timeout, max_connections=max_connections, reactor=clock)
    site.noisy = False
    return site

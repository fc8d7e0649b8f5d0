"""The admin HTTP endpoint: ``/health`` for load balancers, ``/metrics`` for Prometheus."""

from __future__ import annotations

from typing import Optional

from twisted.web.resource import Resource
from twisted.web.server import Site

from ..metrics import CONTENT_TYPE_LATEST, ServerMetrics
from ..server.drain import DrainController, DrainState

__all__ = ["admin_site"]


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

    render_HEAD = render_GET


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


class _QuietSite(Site):
    """A site that does not log every request: health checks come every second."""

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


def admin_site(controller: DrainController, metrics: Optional[ServerMetrics] = None) -> Site:
    """The admin web site for ``controller``, with ``/metrics`` when ``metrics`` is given."""
    root = _AdminRoot()
    root.putChild(b"health", HealthResource(controller))
    if metrics is not None:
        root.putChild(b"metrics", MetricsResource(metrics))
    site = _QuietSite(root)
    site.noisy = False
    return site

"""The admin HTTP endpoint: ``/health`` for load balancers."""

from __future__ import annotations

from twisted.web.resource import Resource
from twisted.web.server import Site

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


class _QuietSite(Site):
    """A site that does not log every request: health checks come every second."""

    def log(self, request) -> None:
        pass


def admin_site(controller: DrainController) -> Site:
    """The admin web site for ``controller``."""
    root = Resource()
    root.putChild(b"health", HealthResource(controller))
    site = _QuietSite(root)
    site.noisy = False
    return site

"""The admin site's /health resource follows the drain state."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from smartserve.control.admin import admin_site
from smartserve.server.drain import DrainController


def get(site, path: bytes, method: bytes = b"GET") -> DummyRequest:
    """Render ``path`` on ``site`` and return the finished request."""
    request = DummyRequest(path.lstrip(b"/").split(b"/"))
    request.method = method
    resource = site.getResourceFor(request)
    body = resource.render(request)
    if isinstance(body, bytes):
        request.write(body)
    return request


def status_of(request: DummyRequest) -> int:
    return request.responseCode or 200


def test_health_serving_is_200():
    """While serving, /health answers 200 with the state."""
    site = admin_site(DrainController(Clock()))
    request = get(site, b"/health")
    assert status_of(request) == 200
    assert b"".join(request.written) == b"serving\n"
    assert request.responseHeaders.getRawHeaders(b"cache-control") == [b"no-store"]


def test_health_draining_is_503_before_grace_ends():
    """Once a drain starts, /health answers 503 at once, during the grace delay."""
    clock = Clock()
    controller = DrainController(clock, grace=5.0)
    site = admin_site(controller)
    controller.drain()
    request = get(site, b"/health")
    assert status_of(request) == 503
    assert b"".join(request.written) == b"draining\n"


def test_health_drained_is_503():
    """After the drain, /health still answers 503."""
    controller = DrainController(Clock())
    site = admin_site(controller)
    controller.drain()
    request = get(site, b"/health")
    assert status_of(request) == 503
    assert b"".join(request.written) == b"drained\n"


def test_health_head_follows_state():
    """HEAD /health gives the same status as GET, for checks that send HEAD, and no body.

    Found wrong: the body GET sends made Twisted log a warning for every
    check of a balancer that sends HEAD.
    """
    controller = DrainController(Clock())
    site = admin_site(controller)
    serving = get(site, b"/health", b"HEAD")
    assert status_of(serving) == 200 and serving.written == [b""]
    controller.drain()
    assert status_of(get(site, b"/health", b"HEAD")) == 503


def test_health_other_path_is_404():
    """A path other than /health is not found."""
    request = get(admin_site(DrainController(Clock())), b"/other")
    assert status_of(request) == 404

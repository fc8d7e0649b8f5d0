"""The idle timeout counts only the time a connection waits on its peer."""

from __future__ import annotations

from twisted.internet.task import Clock

from smartserve.testing import MemoryBackend, encode_request, response_args, serve_in_memory


def _serving(backend=None):
    clock = Clock()
    factory, protocol, transport = serve_in_memory(
        backend or MemoryBackend({b"f": b"data"}), clock=clock, idle_timeout=10.0
    )
    return clock, protocol, transport


def _closes_after_the_timeout(clock, transport) -> None:
    """Assert that the connection closes 10 s (the timeout) from now, not before."""
    clock.advance(9.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting


def test_protocol_idle_connection_closes_after_the_timeout():
    """A connection with no request closes once idle for the timeout, not before."""
    clock, protocol, transport = _serving()
    _closes_after_the_timeout(clock, transport)


def test_protocol_each_request_starts_the_idle_countdown_afresh():
    """Requests less than the timeout apart keep a connection open indefinitely; idleness after the last one closes it."""
    clock, protocol, transport = _serving()
    for _ in range(20):
        clock.advance(6.0)
        protocol.dataReceived(encode_request([b"get", b"f"]))
    assert not transport.disconnecting
    _closes_after_the_timeout(clock, transport)
    assert protocol.requests_served == 20


def test_protocol_request_running_longer_than_the_timeout_is_not_cut():
    """A request the server works on for three timeouts is answered; the countdown starts when its response is written."""
    backend = MemoryBackend({b"f": b"data"})
    backend.hold(b"get")
    clock, protocol, transport = _serving(backend)
    clock.advance(5.0)
    protocol.dataReceived(encode_request([b"get", b"f"]))
    clock.advance(30.0)
    assert not transport.disconnecting
    backend.release()
    assert response_args(transport.value()) == [(b"ok",)]
    _closes_after_the_timeout(clock, transport)


def test_protocol_request_body_trickling_in_keeps_the_connection():
    """Body parts arriving less than the timeout apart keep the request alive; a stalled body is cut after the timeout."""
    clock, protocol, transport = _serving()
    request = encode_request([b"put", b"g", b""], body=b"x" * 100)
    protocol.dataReceived(request[:-40])
    for index in range(3):
        clock.advance(8.0)
        protocol.dataReceived(request[-40 + index : -40 + index + 1])
    assert not transport.disconnecting
    clock.advance(10.1)
    assert transport.disconnecting

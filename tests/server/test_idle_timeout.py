"""The idle timeout counts only the time a connection waits on its peer."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import formatEvent

from smartserve.server.jail import Writable
from smartserve.testing import MemoryBackend, encode_request, response_args, serve_in_memory
from support import logged_events


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


def _serving_with_rate(rate: int = 100, grace: float = 10.0):
    from smartserve.server.caller import Caller
    from smartserve.server.dispatcher import Dispatcher
    from smartserve.server.protocol import SmartServerFactory
    from twisted.internet.testing import StringTransport

    clock = Clock()
    factory = SmartServerFactory(
        Dispatcher(MemoryBackend({b"f": b"data"})),
        clock=clock,
        idle_timeout=300.0,
        tcp_writable=Writable.everywhere(),
        min_request_rate=rate,
        request_grace=grace,
    )
    protocol = factory.build_protocol(Caller(None, "memory", factory.tcp_writable))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return clock, protocol, transport


def _trickle(clock, protocol, transport, data: bytes, every: float, until: float) -> float:
    """Send ``data`` a byte every ``every`` seconds until the connection closes or ``until`` passes; when it closed."""
    for byte in data:
        if transport.disconnecting or clock.seconds() >= until:
            break
        protocol.dataReceived(bytes([byte]))
        clock.advance(every)
    return clock.seconds()


def test_protocol_request_trickling_slower_than_the_minimum_rate_is_cut_after_its_grace():
    """A body sent a byte every 5 s, each byte well inside the idle timeout, is cut once the grace and what the
    bytes earned (one second per 100 bytes) are spent, and the cut is logged.

    Found wrong: every byte restarted the idle countdown, so a trickle held the
    connection, its body memory and a drain for as long as it liked.
    """
    clock, protocol, transport = _serving_with_rate()
    request = encode_request([b"put", b"g", b""], body=b"x" * 1000)
    with logged_events(lambda event: "slower than --min-request-rate" in event.get("log_format", "")) as events:
        protocol.dataReceived(request[:100])  # the opening and part of the body, at once
        clock.advance(1.0)
        closed_at = _trickle(clock, protocol, transport, request[100:], every=5.0, until=100.0)
    assert transport.disconnecting
    assert 10.0 < closed_at <= 16.0  # 10 s of grace, one more for the first 100 bytes, then the next byte's wait
    [event] = events
    assert "slower than --min-request-rate 100 bytes/s after --request-grace 10 s" in formatEvent(event)


def test_protocol_request_opening_trickling_in_is_cut_too():
    """The bytes before a request's arguments are complete count as well: a half-sent opening is not a free hold."""
    clock, protocol, transport = _serving_with_rate()
    closed_at = _trickle(clock, protocol, transport, encode_request([b"get", b"f" * 200]), every=3.0, until=100.0)
    assert transport.disconnecting and closed_at <= 15.0


def test_protocol_slow_but_steady_request_is_not_cut():
    """A body arriving at twice the minimum rate, for ten times the grace, is taken whole and answered."""
    clock, protocol, transport = _serving_with_rate()
    request = encode_request([b"put", b"g", b""], body=b"x" * 20000)
    for start in range(0, len(request), 200):
        protocol.dataReceived(request[start : start + 200])
        clock.advance(1.0)
    assert not transport.disconnecting
    assert response_args(transport.value()) == [(b"ok",)]


def test_protocol_each_request_is_timed_from_its_own_first_bytes():
    """Time before a request's first byte (an idle connection, a response the client was slow to read) is not
    charged to it: it gets its whole grace from its first byte on."""
    clock, protocol, transport = _serving_with_rate()
    protocol.dataReceived(encode_request([b"get", b"f"]))
    protocol.pauseProducing()
    clock.advance(200.0)
    protocol.resumeProducing()
    protocol.dataReceived(encode_request([b"get", b"f"])[:10])
    clock.advance(9.0)
    assert not transport.disconnecting
    clock.advance(2.0)
    assert transport.disconnecting

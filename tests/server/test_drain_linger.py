"""A draining server with a drain linger serves requests that follow at once, then closes."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from smartserve.testing import MemoryBackend, encode_request, response_args, serve_in_memory


def _lingering(linger: float):
    clock = Clock()
    factory, protocol, transport = serve_in_memory(MemoryBackend({b"f": b"data"}), clock=clock)
    factory.drain_linger = linger
    return clock, factory, protocol, transport


def test_protocol_linger_serves_request_that_follows_drain():
    """A request that arrives within the linger after a drain began is served, not refused."""
    clock, factory, protocol, transport = _lingering(2.0)
    protocol.dataReceived(encode_request([b"hello"]))
    factory.drain()
    clock.advance(1.5)
    assert not transport.disconnecting
    protocol.dataReceived(encode_request([b"get", b"f"]))
    assert response_args(transport.value()) == [(b"ok", b"2"), (b"ok",)]
    assert not transport.disconnecting


def test_protocol_linger_closes_after_idle_for_linger():
    """A draining connection idle since before the drain closes once idle for the linger, marked as closed for the drain."""
    clock, factory, protocol, transport = _lingering(2.0)
    protocol.dataReceived(encode_request([b"hello"]))
    clock.advance(0.5)
    factory.drain()
    clock.advance(1.4)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting
    assert protocol.closing_for_drain is True


def test_protocol_linger_ends_for_busy_client():
    """A client that keeps sending requests is closed at its first idle moment once the linger after the drain is over."""
    clock, factory, protocol, transport = _lingering(2.0)
    factory.drain()
    for _ in range(5):
        clock.advance(0.6)
        protocol.dataReceived(encode_request([b"hello"]))
    assert transport.disconnecting
    assert len(response_args(transport.value())) == 3


def test_protocol_linger_closes_long_idle_connection_at_once():
    """A connection idle for longer than the linger when the drain starts closes at once."""
    clock, factory, protocol, transport = _lingering(2.0)
    clock.advance(5)
    factory.drain()
    assert transport.disconnecting


def test_protocol_without_linger_serves_nothing_after_drain():
    """With no linger an idle connection closes as the drain starts, and a request sent after it is not run."""
    clock, factory, protocol, transport = _lingering(0.0)
    factory.drain()
    assert transport.disconnecting
    protocol.dataReceived(encode_request([b"get", b"f"]))
    assert transport.value() == b""


class _FixedDraws:
    """Stands in for the factory's random source: hands out the given draws in order."""

    def __init__(self, *draws: float):
        self.draws = list(draws)

    def uniform(self, low: float, high: float) -> float:
        draw = self.draws.pop(0)
        assert low <= draw <= high
        return draw


def test_protocol_drain_spread_closes_busy_connections_at_their_own_moments():
    """With a spread, connections busy through the linger each close at their first idle moment after linger + their own draw."""
    clock = Clock()
    factory, first, first_transport = serve_in_memory(MemoryBackend({b"f": b"data"}), clock=clock)
    second = factory.build_protocol(first.caller)
    second.makeConnection(StringTransport())
    factory.drain_linger = 2.0
    factory.drain_spread = 1.0
    factory.random = _FixedDraws(0.25, 0.85)
    factory.drain()
    closed_at = {}
    for step in range(1, 36):  # a request every 0.1 s: neither connection idles for the linger
        clock.advance(0.1)
        for protocol in (first, second):
            if protocol.transport.disconnecting:
                closed_at.setdefault(protocol, round(clock.seconds(), 2))
            else:
                protocol.dataReceived(encode_request([b"get", b"f"]))
    # The draws go to the connections in no set order. The lingers end at
    # 2.25 and 2.85: each connection closes in the idle moment after its
    # last request (at 2.2 and 2.8).
    assert sorted(closed_at.values()) == [2.3, 2.9]
    assert all(protocol.closing_for_drain for protocol in (first, second))

"""bzr:// connections over the limit are told TooManyConnections and closed, their input unread; SSH sessions do not count."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent

from smartserve.metrics import ServerMetrics
from smartserve.server.caller import Caller
from smartserve.server.dispatcher import Dispatcher
from smartserve.server.jail import Writable
from smartserve.server.protocol import (
    CLOSE_LINGER,
    MAX_TURNED_AWAY,
    TURNED_AWAY_MAX_BYTES,
    ClosedAtOnce,
    SmartServerFactory,
    TurnedAway,
)
from smartserve.testing import MemoryBackend, encode_request, response_args
from support import logged_events


def _factory(limit: int) -> SmartServerFactory:
    return SmartServerFactory(Dispatcher(MemoryBackend({})), clock=Clock(), max_bzr_connections=limit)


class _HalfClosingTransport(StringTransport):
    """A StringTransport that notes a half-close, as a TCP transport does it."""

    write_closed = False

    def loseWriteConnection(self):
        self.write_closed = True


def _connect_bzr(factory: SmartServerFactory, port: int, transport=None, host: str = "127.0.0.1"):
    """A bzr:// connection from ``host``:``port``, on ``transport`` or a new one with that peer."""
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = transport or _HalfClosingTransport(peerAddress=IPv4Address("TCP", host, port))
    protocol.makeConnection(transport)
    return protocol, transport


def test_bzr_connection_over_the_limit_is_told_too_many_connections_and_a_slot_frees_on_close():
    """Over the limit: the TooManyConnections error, a half-close, the close after the linger; a slot frees on close."""
    factory = _factory(2)
    first, _ = _connect_bzr(factory, 40001)
    _connect_bzr(factory, 40002)
    refused, refused_transport = _connect_bzr(factory, 40003)
    assert isinstance(refused, TurnedAway)
    assert response_args(refused_transport.value()) == [
        (b"TooManyConnections", b"the server has 2 bzr:// connections open, its limit; try again later")
    ]
    assert refused_transport.write_closed and not refused_transport.disconnecting
    refused.dataReceived(encode_request([b"append", b"/journal", b""], b"never run"))
    factory.clock.advance(CLOSE_LINGER)
    assert refused_transport.disconnecting
    refused.connectionLost(None)
    assert factory.turned_away == set()
    first.connectionLost(None)
    accepted, transport = _connect_bzr(factory, 40004)
    accepted.dataReceived(encode_request([b"hello"]))
    assert response_args(transport.value()) == [(b"ok", b"2")]


def test_turned_away_connection_that_keeps_sending_is_closed_past_the_byte_bound():
    factory = _factory(1)
    _connect_bzr(factory, 40001)
    refused, transport = _connect_bzr(factory, 40002)
    refused.dataReceived(b"x" * TURNED_AWAY_MAX_BYTES)
    assert not transport.disconnecting
    refused.dataReceived(b"x")
    assert transport.disconnecting


def test_past_max_turned_away_lingering_further_connections_are_closed_at_once():
    factory = _factory(1)
    _connect_bzr(factory, 40001)
    lingering = [_connect_bzr(factory, 41000 + index)[0] for index in range(MAX_TURNED_AWAY)]
    assert all(isinstance(protocol, TurnedAway) for protocol in lingering)
    closed, transport = _connect_bzr(factory, 42000)
    assert isinstance(closed, ClosedAtOnce) and transport.disconnecting and transport.value() == b""
    lingering[0].connectionLost(None)
    assert isinstance(_connect_bzr(factory, 42001)[0], TurnedAway)


def test_ssh_sessions_do_not_count_against_the_bzr_limit():
    factory = _factory(1)
    session = factory.build_protocol(Caller("alice", "127.0.0.1:50000", Writable.everywhere()))
    session.makeConnection(StringTransport())
    protocol, transport = _connect_bzr(factory, 40005)
    assert not isinstance(protocol, ClosedAtOnce)
    assert not transport.disconnecting


def test_no_limit_when_zero():
    factory = _factory(0)
    protocols = [_connect_bzr(factory, 41000 + index)[0] for index in range(50)]
    assert not any(isinstance(protocol, ClosedAtOnce) for protocol in protocols)
    assert factory.open_connections == 50


def test_refusals_are_logged_when_they_start_and_stop_and_counted():
    """A flood over the limit is one warning and one line with the count once a connection is accepted again, not a line each."""
    factory = _factory(1)
    metrics = ServerMetrics()
    metrics.watch_bzr_refusals(factory)
    with logged_events(lambda event: "bzr:// connections" in event.get("log_format", "")) as events:
        first, _ = _connect_bzr(factory, 40001)
        for index in range(5):
            _connect_bzr(factory, 41000 + index)[0].connectionLost(None)
        first.connectionLost(None)
        _connect_bzr(factory, 40002)
        _connect_bzr(factory, 40003)[0].connectionLost(None)
    lines = [formatEvent(event) for event in events]
    assert len(lines) == 3, lines
    assert lines[0].startswith("refusing bzr:// connections: 1 open") and "the first from 127.0.0.1:41000" in lines[0]
    assert lines[1] == "accepting bzr:// connections again; 5 refused meanwhile"
    assert lines[2].startswith("refusing bzr:// connections: 1 open")
    assert factory.refused_bzr_connections == 6
    assert metrics.registry.get_sample_value("smartserve_bzr_refused_connections_total") == 6


def _per_address_factory(limit: int) -> SmartServerFactory:
    return SmartServerFactory(Dispatcher(MemoryBackend({})), clock=Clock(), max_bzr_connections_per_address=limit)


def test_connections_from_one_address_past_its_limit_are_turned_away_and_others_served():
    """Two connections from one address are served, its third is told TooManyConnections before anything it sent
    runs, another address is served meanwhile, and the address gets a slot again once one of its two closes."""
    factory = _per_address_factory(2)
    with logged_events(lambda event: "bzr:// connections from" in event.get("log_format", "")) as events:
        first, _ = _connect_bzr(factory, 40001, host="10.0.0.1")
        _connect_bzr(factory, 40002, host="10.0.0.1")
        refused, refused_transport = _connect_bzr(factory, 40003, host="10.0.0.1")
        refused.dataReceived(encode_request([b"append", b"/journal", b""], b"never run"))
        assert response_args(refused_transport.value()) == [
            (b"TooManyConnections", b"the server has 2 bzr:// connections open from your address, its limit; "
             b"try again later")
        ]
        assert refused_transport.write_closed
        factory.clock.advance(CLOSE_LINGER)
        assert refused_transport.disconnecting
        refused.connectionLost(None)
        other, other_transport = _connect_bzr(factory, 40004, host="10.0.0.2")
        other.dataReceived(encode_request([b"hello"]))
        assert response_args(other_transport.value()) == [(b"ok", b"2")]
        first.connectionLost(None)
        again, again_transport = _connect_bzr(factory, 40005, host="10.0.0.1")
        again.dataReceived(encode_request([b"hello"]))
        assert response_args(again_transport.value()) == [(b"ok", b"2")]
    assert factory.refused_bzr_connections == 1
    assert factory.open_connections == 3
    lines = [formatEvent(event) for event in events]
    assert lines == [
        "refusing bzr:// connections from 10.0.0.1: 2 open from there, the limit (--bzr-max-connections-per-address)",
        "accepting bzr:// connections from 10.0.0.1 again",
    ]


def test_ssh_sessions_and_no_limit_are_not_counted_per_address():
    factory = _per_address_factory(1)
    session = factory.build_protocol(Caller("alice", "10.0.0.1:50000", Writable.everywhere()))
    session.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 50000)))
    protocol, transport = _connect_bzr(factory, 40001, host="10.0.0.1")
    assert not transport.disconnecting and protocol.counted_host == "10.0.0.1"
    unlimited = _per_address_factory(0)
    assert all(not _connect_bzr(unlimited, 41000 + index, host="10.0.0.1")[1].value() for index in range(5))
    assert unlimited.open_connections == 5

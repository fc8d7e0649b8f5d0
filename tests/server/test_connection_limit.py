"""bzr:// connections over the limit are closed as soon as they are made; SSH sessions do not count."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from smartserve.server.caller import Caller
from smartserve.server.dispatcher import Dispatcher
from smartserve.server.jail import Writable
from smartserve.server.protocol import ClosedAtOnce, SmartServerFactory
from smartserve.testing import MemoryBackend, encode_request, response_args


def _factory(limit: int) -> SmartServerFactory:
    return SmartServerFactory(Dispatcher(MemoryBackend({})), clock=Clock(), max_bzr_connections=limit)


def _connect_bzr(factory: SmartServerFactory, port: int):
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_bzr_connection_over_the_limit_is_closed_at_once_and_a_slot_frees_on_close():
    factory = _factory(2)
    first, _ = _connect_bzr(factory, 40001)
    _connect_bzr(factory, 40002)
    refused, refused_transport = _connect_bzr(factory, 40003)
    assert isinstance(refused, ClosedAtOnce)
    assert refused_transport.disconnecting and refused_transport.value() == b""
    first.connectionLost(None)
    accepted, transport = _connect_bzr(factory, 40004)
    accepted.dataReceived(encode_request([b"hello"]))
    assert response_args(transport.value()) == [(b"ok", b"2")]


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

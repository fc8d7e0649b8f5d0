"""Sending at once on a real TCP connection: in the same turn when the socket takes it, in order when it does not."""

from __future__ import annotations

import contextlib
import socket

import pytest_twisted
from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.testing import StringTransport

from smartserve._sending import SendingAtOnce, direct_socket, sending_at_once, write_now


class _Silent(protocol.Protocol):
    def __init__(self):
        self.lost = defer.Deferred()

    def connectionLost(self, reason=None):
        self.lost.callback(None)


@contextlib.asynccontextmanager
async def _tcp_pair():
    """A Twisted TCP transport (its protocol says nothing) and the plain socket at its other end; closed after."""
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        accepted = threads.deferToThread(listener.accept)
        connected = protocol.ClientCreator(reactor, _Silent).connectTCP("127.0.0.1", listener.getsockname()[1])
        client = await connected
        peer, _ = await accepted
    finally:
        listener.close()
    try:
        yield client.transport, peer
    finally:
        client.transport.loseConnection()
        await client.lost
        peer.close()


def _read_all(peer: socket.socket, size: int) -> bytes:
    parts, got = [], 0
    peer.settimeout(30)
    while got < size:
        part = peer.recv(1024 * 1024)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


@pytest_twisted.ensureDeferred
async def test_write_now_sends_in_the_same_turn():
    """What the socket takes is on the wire before write_now returns: no reactor turn in between."""
    async with _tcp_pair() as (transport, peer):
        write_now(transport, direct_socket(transport), b"hello")
        peer.setblocking(False)
        assert peer.recv(100) == b"hello"


@pytest_twisted.ensureDeferred
async def test_write_now_queues_behind_what_the_transport_still_holds():
    """Once the socket took only part of a write, the rest and every later write go through the transport, in order."""
    async with _tcp_pair() as (transport, peer):
        sock = direct_socket(transport)
        big = bytes(range(256)) * (64 * 1024)  # 16 MiB: more than any socket buffer here takes at once
        write_now(transport, sock, big)
        assert transport.dataBuffer or transport._tempDataLen, "the socket took 16 MiB at once; the test proves nothing"
        # Room on the socket again: a tail sent on it now would overtake the transport's buffer.
        head = _read_all(peer, 1024 * 1024)
        write_now(transport, sock, b"tail")
        received = head + await threads.deferToThread(_read_all, peer, len(big) + 4 - len(head))
    assert len(received) == len(big) + 4
    assert received[-4:] == b"tail"
    assert received[:-4] == big


def test_no_direct_socket_for_transports_that_are_not_plain_tcp():
    """Anything but Twisted's TCP connection (a wrapper, a test transport) is written through as usual."""
    transport = StringTransport()
    assert direct_socket(transport) is None
    write_now(transport, None, b"data")
    assert transport.value() == b"data"


@pytest_twisted.ensureDeferred
async def test_sending_at_once_writes_at_once_and_is_the_transport_otherwise():
    """The wrapper a protocol we do not own (Conch's) writes through: direct writes, everything else delegated."""
    async with _tcp_pair() as (transport, peer):
        wrapped = sending_at_once(transport)
        assert isinstance(wrapped, SendingAtOnce)
        wrapped.writeSequence([b"one ", b"two"])
        peer.setblocking(False)
        assert peer.recv(100) == b"one two"
        assert wrapped.getPeer() == transport.getPeer()
        wrapped.loseConnection()
        assert transport.disconnecting


def test_sending_at_once_leaves_other_transports_alone():
    transport = StringTransport()
    assert sending_at_once(transport) is transport


@pytest_twisted.ensureDeferred
async def test_client_ssh_connection_sends_packets_at_once():
    """The smartserve client's SSH transport writes through SendingAtOnce from its first packet on."""
    from twisted.internet.defer import Deferred

    from smartserve.client._ssh import _ClientTransport

    async with _tcp_pair() as (transport, peer):
        ready = Deferred()
        ready.addErrback(lambda failure: None)  # the connection is cut before any login
        ssh_transport = _ClientTransport(endpoint=None, ready=ready)
        ssh_transport.makeConnection(transport)
        assert isinstance(ssh_transport.transport, SendingAtOnce)
        peer.setblocking(False)
        assert peer.recv(100).startswith(b"SSH-2.0-")
        transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_pass_through_wrappers_are_sent_through_and_changing_ones_are_not():
    """A protocol wrapper that passes writes on unchanged (the PROXY-header reader) keeps direct sends; one that changes them (TLS) does not."""
    from twisted.internet.protocol import Factory, Protocol
    from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

    class Changing(ProtocolWrapper):
        def write(self, data):
            super().write(data.upper())

    async with _tcp_pair() as (transport, peer):
        factory = WrappingFactory(Factory.forProtocol(Protocol))
        passing = ProtocolWrapper(factory, Protocol())
        passing.makeConnection(transport)
        sock = direct_socket(passing)
        assert sock is transport.getHandle()
        write_now(passing, sock, b"through the wrapper")
        peer.setblocking(False)
        assert peer.recv(100) == b"through the wrapper"
        changing = Changing(factory, Protocol())
        changing.makeConnection(transport)
        assert direct_socket(changing) is None

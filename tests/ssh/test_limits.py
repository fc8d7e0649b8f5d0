"""Limits: login grace time, connections logging in at once, idle connections."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from smartserve.metrics import ServerMetrics
from smartserve.ssh import MemoryKeyStore, PublicKeyChecker, make_ssh_factory

from support import wait_until

from .conftest import SSHServerUnderTest, conch_connection, needs_openssh


def _factory(tmp_path, clock, **limits):
    return make_ssh_factory(
        smart_factory=None,
        data_dir=str(tmp_path),
        host_key_paths=[],
        keys_dir=str(tmp_path / "keys"),
        access_file=None,
        checker=PublicKeyChecker(MemoryKeyStore()),
        clock=clock,
        **limits,
    )


def _scraped(factory):
    """A function reading one sample of ``factory``'s SSH metrics, as /metrics would show it."""
    metrics = ServerMetrics()
    metrics.watch_ssh(factory)
    return lambda name, **labels: metrics.registry.get_sample_value(name, labels)


def _connect(factory, port: int, host: str = "127.0.0.1"):
    address = IPv4Address("TCP", host, port)
    transport = factory.buildProtocol(address)
    wire = StringTransport(peerAddress=address)
    transport.makeConnection(wire)
    return transport, wire


def test_login_grace_time_disconnects_slow_client(tmp_path):
    """A client that has not logged in when the grace time ends is disconnected."""
    clock = Clock()
    factory = _factory(tmp_path, clock, login_grace_time=30)
    transport, wire = _connect(factory, 40000)
    clock.advance(29)
    assert not wire.disconnecting
    clock.advance(1)
    assert wire.disconnecting
    assert b"login grace time exceeded" in wire.value()
    transport.connectionLost(None)
    assert factory.open_connections == 0
    sample = _scraped(factory)
    assert sample("smartserve_ssh_logins_total", outcome="timed_out") == 1
    assert sample("smartserve_ssh_logins_total", outcome="refused") == 0


def test_max_unauthenticated_refuses_extra_connections(tmp_path):
    """Over the limit of connections logging in, a new one is closed at once; a slot frees on close."""
    clock = Clock()
    factory = _factory(tmp_path, clock, max_unauthenticated=2)
    first, _ = _connect(factory, 40001)
    _connect(factory, 40002)
    _, refused = _connect(factory, 40003)
    assert refused.disconnecting and refused.value() == b""
    first.connectionLost(None)
    _, accepted = _connect(factory, 40004)
    assert not accepted.disconnecting
    assert accepted.value().startswith(b"SSH-2.0-")
    sample = _scraped(factory)
    assert sample("smartserve_ssh_refused_connections_total", reason="too_many_unauthenticated") == 1
    assert sample("smartserve_ssh_refused_connections_total", reason="draining") == 0


def test_max_unauthenticated_per_address_keeps_slots_for_other_addresses(tmp_path):
    """One address may have only so many connections logging in; others still get in, and so does it once one
    of its connections logs in or goes."""
    clock = Clock()
    factory = _factory(tmp_path, clock, max_unauthenticated=10, max_unauthenticated_per_address=2)
    first, _ = _connect(factory, 40001, "192.0.2.1")
    second, _ = _connect(factory, 40002, "192.0.2.1")
    _, refused = _connect(factory, 40003, "192.0.2.1")
    assert refused.disconnecting and refused.value() == b""
    _, other = _connect(factory, 40004, "192.0.2.2")
    assert not other.disconnecting and other.value().startswith(b"SSH-2.0-")
    first.connectionLost(None)
    _, again = _connect(factory, 40005, "192.0.2.1")
    assert not again.disconnecting
    factory.connection_authenticated(second)
    _, after_login = _connect(factory, 40006, "192.0.2.1")
    assert not after_login.disconnecting
    _, over = _connect(factory, 40007, "192.0.2.1")
    assert over.disconnecting
    sample = _scraped(factory)
    assert sample("smartserve_ssh_refused_connections_total", reason="too_many_unauthenticated_from_address") == 2
    assert sample("smartserve_ssh_refused_connections_total", reason="too_many_unauthenticated") == 0


def test_no_limit_per_address_by_default(tmp_path):
    """By default, as in sshd, one address may use every slot: users behind one NAT or proxy are not refused."""
    factory = _factory(tmp_path, Clock(), max_unauthenticated=20)
    wires = [_connect(factory, 41000 + index, "192.0.2.1")[1] for index in range(20)]
    assert not any(wire.disconnecting for wire in wires)


def test_drain_lets_login_finish_but_refuses_new_connections(tmp_path):
    """A drain leaves a connection that is logging in to its grace time, and refuses new ones."""
    clock = Clock()
    factory = _factory(tmp_path, clock, login_grace_time=30)
    transport, wire = _connect(factory, 40005)
    drained = factory.drain()
    assert not wire.disconnecting and not drained.called
    _, refused = _connect(factory, 40006)
    assert refused.disconnecting
    clock.advance(30)
    assert wire.disconnecting
    transport.connectionLost(None)
    assert drained.called
    assert _scraped(factory)("smartserve_ssh_refused_connections_total", reason="draining") == 1


@needs_openssh
@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_idle_connection_without_session_closed(tmp_path):
    """A logged-in connection with no session open is closed after the idle timeout."""
    server = SSHServerUnderTest(tmp_path, idle_timeout=0.3)
    try:
        client = server.client_for("alice", tmp_path)
        out, err, code = await client.ssh("alice", options=["-N"])
        assert code == 255
        assert b"idle timeout" in err
    finally:
        await server.stopped()


class _RecordingSocket:
    def __init__(self):
        self.options = []

    def setsockopt(self, level, option, value):
        self.options.append((level, option, value))


class _SocketTransport(StringTransport):
    def __init__(self):
        super().__init__()
        self.socket = _RecordingSocket()

    def getHandle(self):
        return self.socket


@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux only")
def test_reads_without_a_reply_ask_for_a_quick_ack(tmp_path, monkeypatch):
    """A read the server sends nothing back for is acknowledged at once (OpenSSH's client keeps Nagle on); a read answered at once needs no extra call."""
    from twisted.conch.ssh.transport import SSHTransportBase

    factory = _factory(tmp_path, Clock())
    transport = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
    wire = _SocketTransport()
    transport.makeConnection(wire)
    quick_ack = (socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    transport.dataReceived(b"SSH-2.0-OpenSSH_9.2\r\n")  # the server has nothing to say back
    assert wire.socket.options.count(quick_ack) == 1
    monkeypatch.setattr(SSHTransportBase, "dataReceived", lambda self, data: self.sendIgnore(b"reply"))
    transport.dataReceived(b"answered at once")
    assert wire.socket.options.count(quick_ack) == 1
    transport.connectionLost(None)


async def _bare_session_channel(server, tmp_path):
    """Log in as alice with the project's client code and open a session channel that never asks to run anything.

    Returns (its SSH transport, closed) once the channel is open: ``closed`` fires when it is closed.
    """
    from twisted.conch.ssh.channel import SSHChannel
    from twisted.internet import defer

    transport, connection = await conch_connection(server, server.client_for("alice", tmp_path))
    opened, closed = defer.Deferred(), defer.Deferred()

    class Bare(SSHChannel):
        name = b"session"

        def channelOpen(self, specificData):
            opened.callback(None)

        def closed(self):
            closed.callback(None)

    connection.openChannel(Bare(conn=connection))
    await opened
    return transport, closed


@needs_openssh
@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_session_channel_that_runs_nothing_is_closed_after_the_idle_timeout(tmp_path):
    """A session channel with no exec request does not hold the user's session slot for ever."""
    server = SSHServerUnderTest(tmp_path, idle_timeout=0.5)
    try:
        transport, closed = await _bare_session_channel(server, tmp_path)
        await closed.addTimeout(10, reactor)
        transport.transport.loseConnection()
    finally:
        await server.stopped()


@needs_openssh
@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_drain_closes_a_session_channel_that_runs_nothing(tmp_path):
    """A drain does not wait for a channel that has no session running: it is closed, then the connection."""
    server = SSHServerUnderTest(tmp_path, idle_timeout=0)
    try:
        transport, closed = await _bare_session_channel(server, tmp_path)
        drained = server.factory.drain()
        await closed.addTimeout(10, reactor)
        await drained.addTimeout(10, reactor)
    finally:
        await server.stopped()


@needs_openssh
@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_idle_timeout_ends_a_session_whose_client_stopped_reading(tmp_path, monkeypatch):
    """A session stuck writing to a client that reads nothing is ended at the idle timeout, not kept for ever."""
    from twisted.internet import protocol

    from smartserve.protocol import Connection, EndOfMessage, Request, Role
    from smartserve.ssh import _session

    from .conftest import SSH

    monkeypatch.setattr(_session, "CLOSE_ANSWER_SECONDS", 0.5)
    server = SSHServerUnderTest(tmp_path, idle_timeout=1.0)
    server.smart_factory.idle_timeout = 1.0  # as twistd smartserve sets both from --idle-timeout
    (server.root / "big").write_bytes(b"x" * (6 << 20))  # more than the client's window and pipe hold
    client = server.client_for("alice", tmp_path)
    codec = Connection(Role.CLIENT)
    request = codec.send(Request((b"get", b"/big"))) + codec.send(EndOfMessage())

    class NotReading(protocol.ProcessProtocol):
        def connectionMade(self):
            self.transport.write(request)
            self.transport.pauseProducing()  # read nothing of what the session sends

    argv = client.argv("alice", "bzr", "serve", "--inet", "--directory=/", "--allow-writes")
    process = reactor.spawnProcess(NotReading(), SSH, [SSH, *argv], env=client.env)
    try:
        await wait_until(lambda: len(server.smart_factory.connections) == 1, 10, "the session to start")
        await wait_until(lambda: len(server.smart_factory.connections) == 0, 10, "the idle timeout to end the session")
        await wait_until(lambda: server.factory.open_connections == 0, 10, "the SSH connection to be dropped")
        assert server.factory.sessions_of("alice") == 0
    finally:
        if process.pid is not None:
            process.signalProcess("KILL")
        await server.stopped()


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_max_unauthenticated_per_address_over_real_sockets(tmp_path):
    """A second silent connection from one address is closed without a word; another address is greeted."""
    from twisted.internet.defer import Deferred
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol

    class Silent(Protocol):
        def __init__(self):
            self.greeting = Deferred()
            self.closed = Deferred()
            self.received = b""

        def dataReceived(self, data):
            self.received += data
            if not self.greeting.called:
                self.greeting.callback(self.received)

        def connectionLost(self, reason=None):
            if not self.greeting.called:
                self.greeting.callback(self.received)
            self.closed.callback(None)

    server = SSHServerUnderTest(tmp_path, max_unauthenticated_per_address=1)
    opened = []
    try:
        for source in ("127.0.0.1", "127.0.0.1", "127.0.0.2"):
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port_number, bindAddress=(source, 0))
            opened.append(await connectProtocol(endpoint, Silent()))
        greetings = [await client.greeting.addTimeout(10, reactor) for client in opened]
        assert greetings[0].startswith(b"SSH-2.0-") and greetings[2].startswith(b"SSH-2.0-")
        assert greetings[1] == b""
        await opened[1].closed.addTimeout(10, reactor)
    finally:
        for client in opened:
            client.transport.loseConnection()
        await server.stopped()

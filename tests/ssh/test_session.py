"""Session channels: flow control both ways, and the exit status after the last byte."""

from __future__ import annotations

import struct
from types import SimpleNamespace

from twisted.conch.ssh import common, connection
from twisted.conch.ssh.session import SSHSessionProcessProtocol
from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smartserve.protocol import Connection, Request, Role
from smartserve.server.caller import Caller
from smartserve.server.dispatcher import Dispatcher
from smartserve.server.jail import Writable
from smartserve.server.protocol import SmartServerFactory
from smartserve.ssh._connection import SmartConnection
from smartserve.ssh import _session
from smartserve.ssh._session import ChannelTransport, SessionChannel, _Inbound
from smartserve.testing import MemoryBackend, encode_request, response_args


class _RecordingConnection:
    """Stands in for an SSH connection service and records what the channel sends.

    ``transport`` stands in for its SSH transport: the factory's idle
    timeout and clock, the avatar, and ``dropped`` once it was aborted.
    """

    def __init__(self, idle_timeout: float = 300.0):
        self.log: list = []
        self.clock = Clock()
        socket = SimpleNamespace(dropped=False)
        socket.abortConnection = lambda: setattr(socket, "dropped", True)
        self.transport = SimpleNamespace(
            factory=SimpleNamespace(idle_timeout=idle_timeout, clock=self.clock),
            avatar=SimpleNamespace(username="alice"),
            transport=socket,
        )

    def sendData(self, channel, data):
        self.log.append(("data", data))

    def sendExtendedData(self, channel, kind, data):
        self.log.append(("stderr", data))

    def sendRequest(self, channel, kind, data, wantReply=0):
        self.log.append((kind.decode(), data))

    def sendEOF(self, channel):
        self.log.append(("eof", b""))

    def sendClose(self, channel):
        self.log.append(("close", b""))
        channel.localClosed = True


@implementer(IPushProducer)
class _Producer:
    """A push producer that remembers whether it was told to pause."""

    def __init__(self):
        self.paused = False

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False

    def stopProducing(self):
        pass


def _channel(remote_window: int, conn) -> SessionChannel:
    return SessionChannel(remoteWindow=remote_window, remoteMaxPacket=1024, conn=conn)


def test_channel_transport_provides_interfaces():
    """The transport a smart protocol sees is a transport, a consumer and a producer."""
    transport = ChannelTransport(_channel(10, _RecordingConnection()), lambda: None, lambda: None)
    assert verifyObject(ITransport, transport)
    assert verifyObject(IConsumer, transport)
    assert verifyObject(IPushProducer, transport)


def test_channel_transport_pauses_producer_on_full_window():
    """The producer pauses when the client's window is full and resumes when it grows."""
    conn = _RecordingConnection()
    channel = _channel(10, conn)
    transport = ChannelTransport(channel, lambda: None, lambda: None)
    producer = _Producer()
    transport.registerProducer(producer, True)
    transport.write(b"x" * 15)
    assert producer.paused
    assert conn.log == [("data", b"x" * 10)]
    channel.addWindowBytes(100)
    assert not producer.paused
    assert conn.log == [("data", b"x" * 10), ("data", b"x" * 5)]


def test_channel_transport_registering_on_full_window_pauses_at_once():
    """A producer registered while the window is already full starts paused."""
    channel = _channel(1, _RecordingConnection())
    transport = ChannelTransport(channel, lambda: None, lambda: None)
    transport.write(b"xy")
    producer = _Producer()
    transport.registerProducer(producer, True)
    assert producer.paused


class _PacketRecorder:
    """Stands in for the SSH transport under a connection service."""

    def __init__(self):
        self.packets: list = []

    def sendPacket(self, kind, payload):
        self.packets.append((kind, payload))


def _channel_on_connection(remote_id: int) -> tuple:
    """A session channel on a ``SmartConnection`` whose packets are recorded."""
    conn = SmartConnection()
    conn.transport = _PacketRecorder()
    channel = SessionChannel(conn=conn)
    conn.channelsToRemoteChannel[channel] = remote_id
    return conn, channel, ChannelTransport(channel, lambda: None, lambda: None)


def test_paused_reader_withholds_window():
    """While the protocol pauses reading, the client gets no more window; on resume it does."""
    conn, channel, transport = _channel_on_connection(7)
    transport.pauseProducing()
    used = channel.localWindowSize * 3 // 4
    channel.localWindowLeft -= used
    conn.adjustWindow(channel, used)
    assert conn.transport.packets == []
    transport.resumeProducing()
    assert conn.transport.packets == [
        (connection.MSG_CHANNEL_WINDOW_ADJUST, struct.pack(">2L", 7, used))
    ]
    assert channel.localWindowLeft == channel.localWindowSize


def test_exit_status_follows_buffered_output():
    """The exit status and close are sent only after every buffered byte has left."""
    conn = _RecordingConnection()
    channel = _channel(10, conn)
    channel.client = SSHSessionProcessProtocol(channel)
    channel.write(b"y" * 15)
    channel.end_with_status(75)
    assert [entry[0] for entry in conn.log] == ["data"]
    channel.addWindowBytes(100)
    assert conn.log == [
        ("data", b"y" * 10),
        ("data", b"y" * 5),
        ("exit-status", struct.pack(">L", 75)),
        ("close", b""),
    ]


def test_ending_session_whose_client_takes_nothing_is_aborted_after_the_idle_timeout():
    """Output an ending session holds is waited for while the client takes some of it, each time for the idle
    timeout; when it takes nothing that long the channel is closed without it, and a client that does not
    answer that close loses its SSH connection."""
    conn = _RecordingConnection(idle_timeout=30)
    channel = _channel(10, conn)
    channel.client = SSHSessionProcessProtocol(channel)
    channel.write(b"y" * 40)
    channel.end_with_status(0)
    conn.clock.advance(29)
    channel.addWindowBytes(10)  # the client read some: it has 30 s again
    conn.clock.advance(29)
    assert [entry[0] for entry in conn.log] == ["data", "data"]
    conn.clock.advance(1)
    assert conn.log[-1] == ("close", b"")
    assert [entry[0] for entry in conn.log].count("exit-status") == 0
    conn.clock.advance(_session.CLOSE_ANSWER_SECONDS)
    assert conn.transport.transport.dropped


def test_close_from_client_drops_unsendable_output():
    """When the client closes the channel, output it will never take is dropped, not waited for."""
    conn = _RecordingConnection()
    channel = _channel(10, conn)
    channel.write(b"z" * 15)
    channel.closeReceived()
    assert conn.log[-1] == ("close", b"")


class _RecordingProtocol:
    """A protocol that records what it is given, in order."""

    def __init__(self):
        self.events: list = []
        self.transport = None

    def makeConnection(self, transport):
        self.transport = transport

    def dataReceived(self, data):
        self.events.append(("data", data))

    def eofReceived(self):
        self.events.append(("eof", b""))


def test_paused_reader_gets_held_data_then_eof_on_resume():
    """Input that arrives while the protocol is paused is delivered, in order and before EOF, on resume."""
    _, _, transport = _channel_on_connection(1)
    protocol = _RecordingProtocol()
    transport.connect(protocol)
    transport.data_from_client(b"a")
    transport.pauseProducing()
    transport.data_from_client(b"b")
    transport.data_from_client(b"c")
    transport.eof_from_client()
    assert protocol.events == [("data", b"a")]
    transport.resumeProducing()
    assert protocol.events == [("data", b"a"), ("data", b"b"), ("data", b"c"), ("eof", b"")]


def test_channel_large_write_goes_out_window_by_window_in_order():
    """A write far larger than the window is sent a window at a time, in order; the producer resumes only once all of it left, and a close waits for it."""
    conn = _RecordingConnection()
    channel = _channel(3000, conn)
    transport = ChannelTransport(channel, lambda: None, lambda: None)
    producer = _Producer()
    transport.registerProducer(producer, True)
    body = bytes(range(256)) * 40  # 10,240 bytes
    transport.write(body)
    transport.write(b"tail")
    assert producer.paused
    channel.loseConnection()
    sent = lambda: b"".join(data for kind, data in conn.log if kind == "data")  # noqa: E731
    assert sent() == body[:3000]
    for _ in range(3):
        channel.addWindowBytes(2000)
        assert producer.paused
        assert ("close", b"") not in conn.log
    assert len(sent()) == 3000 + 3 * 2000
    channel.addWindowBytes(10_000)
    assert sent() == body + b"tail"
    assert all(len(data) <= 1024 for kind, data in conn.log if kind == "data")
    assert conn.log[-1] == ("close", b"")


class _WritingClient:
    """The client end of a session channel that writes whenever its window allows and reads nothing."""

    def __init__(self, conn: SmartConnection, channel: SessionChannel):
        self.conn = conn
        self.channel = channel
        self.window = channel.localWindowSize
        self.sent = 0
        self._adjusts_seen = 0

    def send(self, data: bytes) -> None:
        """Send ``data`` as channel data packets, as the window allows; what does not fit is not sent."""
        for start in range(0, len(data), self.channel.localMaxPacket):
            self._take_window_adjustments()
            piece = data[start : start + min(self.channel.localMaxPacket, self.window)]
            if not piece:
                return
            self.conn.ssh_CHANNEL_DATA(struct.pack(">L", self.channel.id) + common.NS(piece))
            self.window -= len(piece)
            self.sent += len(piece)

    def _take_window_adjustments(self) -> None:
        packets = self.conn.transport.packets
        for kind, payload in packets[self._adjusts_seen :]:
            if kind == connection.MSG_CHANNEL_WINDOW_ADJUST:
                self.window += struct.unpack(">2L", payload)[1]
        self._adjusts_seen = len(packets)


def test_session_client_writing_without_reading_gets_no_window_while_its_request_is_answered():
    """Over SSH too, a client whose request has arrived gets no more window until the answer is written:
    it can send at most the window it had, and the window opens again once the server reads on."""
    backend = MemoryBackend({b"f": b"data"})
    backend.hold(b"get")
    factory = SmartServerFactory(Dispatcher(backend), clock=Clock())
    conn = SmartConnection()
    conn.transport = _PacketRecorder()
    channel = SessionChannel(conn=conn, remoteWindow=1 << 20, remoteMaxPacket=32768)
    channel.id = 0
    conn.channels[0] = channel
    conn.channelsToRemoteChannel[channel] = 5
    transport = ChannelTransport(channel, lambda: None, lambda: None)
    protocol = factory.build_protocol(Caller("alice", "test", Writable.nowhere()))
    transport.connect(protocol)
    channel.client = SSHSessionProcessProtocol(channel)
    channel.client.makeConnection(_Inbound(transport))

    client = _WritingClient(conn, channel)
    client.send(encode_request([b"get", b"f"]))
    # Then a pipelined put whose one body part is far larger than any window.
    put = Connection(Role.CLIENT).send(Request((b"put", b"p", b"")))
    body_part_start = put + b"b" + struct.pack(">L", 64 << 20)
    client.send(body_part_start + b"j" * (16 << 20))
    assert client.sent <= channel.localWindowSize, f"the client sent {client.sent} bytes while its request ran"
    assert client.window == 0

    backend.release()
    answered = b"".join(
        common.getNS(payload[4:])[0] for kind, payload in conn.transport.packets if kind == connection.MSG_CHANNEL_DATA
    )
    assert response_args(answered) == [(b"ok",)]
    client.send(b"j" * 65536)
    assert client.sent > channel.localWindowSize, "the window did not open again after the answer"

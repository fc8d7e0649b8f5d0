"""Hostile or broken clients on a logged-in SSH connection: what they send or fail to read costs the server little."""

from __future__ import annotations

import struct

import pytest
import pytest_twisted
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.common import NS
from twisted.conch.ssh.transport import DISCONNECT_PROTOCOL_ERROR
from twisted.internet import defer, reactor

from smartserve.testing import encode_request, response_args
from tests.server.test_pipelining import response_bodies
from support import wait_until

from .conftest import SSHServerUnderTest, conch_connection, needs_openssh

SERVE = b"bzr serve --inet --directory=/"


class _SmartChannel(SSHChannel):
    """A session channel that keeps what the server sends on it."""

    name = b"session"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.opened = defer.Deferred()
        self.received = bytearray()

    def channelOpen(self, specificData):
        self.opened.callback(None)

    def dataReceived(self, data):
        self.received += data


async def _smart_session(server, tmp_path, **channel_options):
    """Log in as alice and start a smart session; returns (client SSH transport, channel, server protocol)."""
    transport, connection = await conch_connection(server, server.client_for("alice", tmp_path))
    channel = _SmartChannel(conn=connection, **channel_options)
    connection.openChannel(channel)
    await channel.opened.addTimeout(10, reactor)
    await connection.sendRequest(channel, b"exec", NS(SERVE), wantReply=True).addTimeout(10, reactor)
    await wait_until(lambda: len(server.smart_factory.connections) == 1, 10, "the smart session to start")
    return transport, channel, next(iter(server.smart_factory.connections))


def _unsent(protocol) -> int:
    """Bytes of output the server's session channel holds for a window the client has not granted."""
    return sum(map(len, protocol.transport.channel._unsent))


@needs_openssh
@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_pipelined_requests_of_a_client_that_reads_nothing_do_not_pile_up_answers(tmp_path):
    """A client that pipelines many requests and reads no answer gets the next one answered only once it
    has taken the last: the server holds about one answer, not one per request; reading on, it gets all."""
    server = SSHServerUnderTest(tmp_path)
    content = b"x" * 60000  # answered inline, on the reactor thread
    (server.root / "f").write_bytes(content)
    requests = 300
    try:
        transport, channel, protocol = await _smart_session(server, tmp_path)
        transport.transport.pauseProducing()  # read nothing the server sends
        channel.write(encode_request([b"get", b"/f"]) * requests)
        await wait_until(
            lambda: protocol.requests_served == requests or protocol._reading_paused,
            10,
            "the session to answer all or stop reading",
        )
        assert protocol.requests_served < 5
        assert _unsent(protocol) < 3 * len(content)
        transport.transport.resumeProducing()
        await wait_until(
            lambda: len(response_args(bytes(channel.received))) == requests, 20, "every answer to arrive"
        )
    finally:
        await server.stopped()


@needs_openssh
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "how",
    ["grants-no-window", "stops-reading"],
)
@pytest_twisted.ensureDeferred
async def test_session_the_server_ends_is_closed_even_if_the_client_never_takes_its_end(tmp_path, monkeypatch, how):
    """A session the server ends (here for a malformed frame) is gone in bounded time whatever the client does:
    one that grants no window for the error reply is aborted after the idle timeout, one that never answers
    the channel close loses its SSH connection; either way the user's session slot comes back."""
    from smartserve.ssh import _session

    monkeypatch.setattr(_session, "CLOSE_ANSWER_SECONDS", 0.5)
    server = SSHServerUnderTest(tmp_path, idle_timeout=1.0)
    server.smart_factory.idle_timeout = 1.0
    try:
        # One byte, never added to (Conch reads a window of 0 as its default).
        window = {"localWindow": 1} if how == "grants-no-window" else {}
        transport, channel, protocol = await _smart_session(server, tmp_path, **window)
        if how == "stops-reading":
            transport.transport.pauseProducing()
        channel.write(b"bzr message 3 (bzr 1.6)\n" + b"\x00\x00\x00\x03xyz")  # not valid bencode
        await wait_until(lambda: protocol.transport.disconnecting, 10, "the server to end the session")
        await wait_until(lambda: server.factory.sessions_of("alice") == 0, 10, "the session to be closed")
    finally:
        await server.stopped()


def _socket_holds(server) -> int:
    """Bytes the server's one SSH connection holds unsent in its TCP transport."""
    [ssh_transport] = list(server.factory.connections)
    tcp = ssh_transport.transport
    return len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen


@needs_openssh
@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_client_granting_a_huge_window_and_reading_nothing_gets_socket_back_pressure(tmp_path):
    """A client may grant a 4 GiB window and then read nothing: the session stops when the SSH connection's
    socket is full, as over bzr://, instead of the server buffering the whole answer; reading on, the client
    gets it whole."""
    server = SSHServerUnderTest(tmp_path)
    content = b"x" * (32 << 20)  # more than the kernel's socket buffers take
    (server.root / "big").write_bytes(content)
    try:
        transport, channel, protocol = await _smart_session(server, tmp_path, localWindow=2**32 - 1)
        transport.transport.pauseProducing()  # read nothing the server sends
        channel.write(encode_request([b"get", b"/big"]))
        await wait_until(
            lambda: protocol.requests_served == 1 or protocol._producer_paused,
            10,
            "the session to answer or to be paused",
        )
        assert protocol.requests_served == 0
        assert _socket_holds(server) < 1 << 20
        transport.transport.resumeProducing()
        await wait_until(lambda: protocol.requests_served == 1, 20, "the answer to be sent")
        # A v3 message ends with "e"; the body is all "x".
        await wait_until(lambda: channel.received.endswith(b"e"), 20, "the answer to arrive")
        assert response_bodies(bytes(channel.received)) == [content]
    finally:
        await server.stopped()


@needs_openssh
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "message, payload",
    [
        (94, b"\x00\x00\x00\x63" + NS(b"data")),  # CHANNEL_DATA for channel 99, which is not open
        (93, b"\x00\x00"),  # CHANNEL_WINDOW_ADJUST too short to name a channel
        (91, b"\x00\x00\x00\x00" * 4),  # OPEN_CONFIRMATION of a channel the server never opened
    ],
    ids=["no such channel", "short", "never opened"],
)
@pytest_twisted.ensureDeferred
async def test_channel_message_for_no_open_channel_is_a_clean_disconnect(tmp_path, message, payload):
    """A message naming a channel that is not open ends that SSH connection with a protocol error and one log
    line, not an unhandled error with a traceback; the server serves the next login."""
    from support import logged_events

    server = SSHServerUnderTest(tmp_path)
    try:
        with logged_events(lambda event: event.get("log_failure") or event.get("isError") or event.get("channel_message")) as events:
            transport, connection = await conch_connection(server, server.client_for("alice", tmp_path))
            lost = defer.Deferred()
            transport.connectionLost = lambda reason=None: lost.callback(None)
            transport.sendPacket(message, payload)
            await lost.addTimeout(10, reactor)
        assert [event for event in events if event.get("log_failure") or event.get("isError")] == []
        assert [event["channel_message"] for event in events] == [message]
        (tmp_path / "second").mkdir()
        again, _ = await conch_connection(server, server.client_for("alice", tmp_path / "second"))
        again.transport.loseConnection()
    finally:
        await server.stopped()


@needs_openssh
@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_client_sending_past_the_channel_window_is_disconnected_once(tmp_path):
    """A client that fills a paused session's window and goes on sending, a byte per message, is disconnected
    for a protocol error with one log line, not an error line and a channel close per message; its session
    slot comes back."""
    from twisted.conch.ssh import connection as ssh_connection

    from support import logged_events
    from smartserve.ssh._session import LOCAL_MAX_PACKET, LOCAL_WINDOW_BYTES

    server = SSHServerUnderTest(tmp_path)
    try:
        with logged_events(
            lambda event: event.get("log_failure") or event.get("isError") or event.get("window_exceeded")
            or "too much data" in event.get("log_format", "")
        ) as events:
            transport, channel, protocol = await _smart_session(server, tmp_path)
            protocol.transport.pauseProducing()  # the server grants no more window until it reads on
            lost = defer.Deferred()
            transport.connectionLost = lambda reason=None: lost.callback(None)
            disconnects = []
            transport.receiveError = lambda code, description: disconnects.append(code)
            remote = struct.pack(">L", channel.conn.channelsToRemoteChannel[channel])
            piece = b"y" * LOCAL_MAX_PACKET
            for _ in range(LOCAL_WINDOW_BYTES // LOCAL_MAX_PACKET):
                transport.sendPacket(ssh_connection.MSG_CHANNEL_DATA, remote + NS(piece))
            for _ in range(1000):
                transport.sendPacket(ssh_connection.MSG_CHANNEL_DATA, remote + NS(b"z"))
            await lost.addTimeout(10, reactor)
        assert disconnects == [DISCONNECT_PROTOCOL_ERROR]
        assert [event for event in events if not event.get("window_exceeded")] == []
        assert len(events) == 1
        await wait_until(lambda: server.factory.sessions_of("alice") == 0, 10, "the session to be closed")
    finally:
        await server.stopped()

"""The admin HTTP endpoint closes stuck or hostile connections in seconds and bounds how many are open."""

from __future__ import annotations

import socket
import time

import pytest_twisted
from twisted.internet import defer, endpoints, reactor
from twisted.internet.task import Clock

from smartserve.control.admin import ADMIN_TIMEOUT, admin_site
from smartserve.server.drain import DrainController
from support import SmartserveProcess, recording_client, wait_until


class _Endpoint:
    """A real admin site on 127.0.0.1 whose timeouts run on a fake clock; ``channels`` are its server-side connections."""

    def __init__(self, **options):
        self.clock = Clock()
        self.site = admin_site(DrainController(self.clock), clock=self.clock, **options)
        self.channels = []
        self.received = []
        endpoint = self

        class Recording(self.site.protocol):
            def connectionMade(self):
                endpoint.channels.append(self)
                super().connectionMade()

            def dataReceived(self, data):
                endpoint.received.append(data)
                super().dataReceived(data)

        self.site.protocol = Recording
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")

    async def connect(self):
        client = recording_client()
        where = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        await endpoints.connectProtocol(where, client)
        return client

    async def send(self, client, data: bytes) -> None:
        """Write ``data`` and wait until the server has it, so that the fake clock runs after it arrived."""
        before = b"".join(self.received)
        client.transport.write(data)
        await wait_until(lambda: b"".join(self.received) == before + data, 10, "the server to receive the bytes")

    def close(self) -> defer.Deferred:
        for channel in self.channels:
            channel.transport.abortConnection()
        return self.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_connection_that_sends_half_a_request_is_closed_after_the_timeout():
    """A client that sends part of a request and then nothing is closed ADMIN_TIMEOUT seconds after it connected."""
    admin = _Endpoint()
    try:
        client = await admin.connect()
        await admin.send(client, b"GET /health HTTP/1.1\r\nHost: x\r\n")
        admin.clock.advance(ADMIN_TIMEOUT - 0.1)
        assert not admin.channels[0].transport.disconnecting
        admin.clock.advance(0.1)
        await wait_until(lambda: client.closed, 10, "the half request's connection to close")
        assert client.received == b""
    finally:
        await admin.close()


@pytest_twisted.ensureDeferred
async def test_connection_that_trickles_its_request_is_closed_after_the_timeout():
    """Bytes arriving one at a time do not restart the timeout: the whole request must come within it."""
    admin = _Endpoint()
    try:
        client = await admin.connect()
        for byte in b"GET /health HTTP/1.1\r\nHo":
            await admin.send(client, bytes([byte]))
            admin.clock.advance(ADMIN_TIMEOUT / 4)
            if admin.channels[0].transport.disconnecting:
                break
        assert admin.channels[0].transport.disconnecting
        await wait_until(lambda: client.closed, 10, "the trickling connection to close")
    finally:
        await admin.close()


@pytest_twisted.ensureDeferred
async def test_idle_kept_alive_connection_is_closed_after_the_timeout_from_its_last_answer():
    """A kept-alive connection is answered, then closed once it has sent no new request for ADMIN_TIMEOUT."""
    admin = _Endpoint()
    try:
        client = await admin.connect()
        admin.clock.advance(ADMIN_TIMEOUT - 1)
        await admin.send(client, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_until(lambda: client.received.endswith(b"serving\n"), 10, "the answer")
        admin.clock.advance(ADMIN_TIMEOUT - 0.1)
        assert not admin.channels[0].transport.disconnecting
        admin.clock.advance(0.1)
        await wait_until(lambda: client.closed, 10, "the idle connection to close")
    finally:
        await admin.close()


@pytest_twisted.ensureDeferred
async def test_client_that_never_reads_its_answers_is_cut():
    """A client that pipelines requests and never reads the answers is cut within twice the timeout."""
    admin = _Endpoint()
    try:
        client = await admin.connect()
        await wait_until(lambda: admin.channels, 10, "the server to accept the connection")
        # Small buffers, so that the answers back up on the server rather than in the kernel.
        client.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        admin.channels[0].transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client.transport.pauseProducing()
        client.transport.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 100_000)
        await wait_until(lambda: admin.channels[0].transport.producerPaused, 10, "the answers to back up")
        admin.clock.advance(ADMIN_TIMEOUT)
        admin.clock.advance(ADMIN_TIMEOUT)
        await wait_until(lambda: admin.site.open_connections == 0, 10, "the server to cut the connection")
    finally:
        await admin.close()


@pytest_twisted.ensureDeferred
async def test_connections_over_the_limit_are_closed_at_once_and_a_slot_frees_on_close():
    """Beyond max_connections a new connection is closed unanswered; once one closes, the next is served."""
    admin = _Endpoint(max_connections=2)
    try:
        first, second = await admin.connect(), await admin.connect()
        await wait_until(lambda: admin.site.open_connections == 2, 10, "two open connections")
        refused = await admin.connect()
        await wait_until(lambda: refused.closed, 10, "the third connection to be closed")
        assert refused.received == b""
        first.transport.loseConnection()
        await wait_until(lambda: admin.site.open_connections == 1, 10, "a slot to free")
        third = await admin.connect()
        third.transport.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_until(lambda: third.received.endswith(b"serving\n"), 10, "the answer")
        assert not second.closed
    finally:
        await admin.close()


def test_real_server_closes_a_silent_admin_connection_within_seconds(tmp_path):
    """twistd smartserve --admin closes a connection that sends half a request after its timeout, not a minute or hours later."""
    server = SmartserveProcess(
        tmp_path / "data", ["--bzr", "tcp:0:interface=127.0.0.1", "--ssh", "none", "--admin", "tcp:0:interface=127.0.0.1"]
    ).start()
    try:
        with socket.create_connection(("127.0.0.1", server.admin_port), timeout=ADMIN_TIMEOUT + 10) as silent:
            started = time.monotonic()
            silent.sendall(b"GET /health HTTP/1.1\r\n")
            assert silent.recv(1) == b""
            assert time.monotonic() - started < ADMIN_TIMEOUT + 10
    finally:
        server.stop()

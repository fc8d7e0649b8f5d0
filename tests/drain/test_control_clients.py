"""Odd or hostile control socket clients get an error or are closed within a bound, and the server goes on."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest_twisted
from twisted.internet import endpoints, reactor
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent

from smartserve.control.commands import WaitDrained
from smartserve.control.server import CLOSE_TIMEOUT, IDLE_TIMEOUT, Control, ControlFactory
from smartserve.listeners import ListenerGroup
from smartserve.server.drain import DrainController
from support import VENV_BIN, SmartserveProcess, logged_events, recording_client, wait_until

_STATUS = b"\x00\x04_ask\x00\x011\x00\x08_command\x00\x06Status\x00\x00"


class _ControlSocket:
    """A real control socket in ``folder`` whose timeouts run on a fake clock."""

    def __init__(self, folder):
        self.clock = Clock()
        self.factory = ControlFactory(Control(DrainController(self.clock), ListenerGroup(), []), clock=self.clock)
        self.path = str(folder / "control.sock")
        self.port = reactor.listenUNIX(self.path, self.factory)

    async def connect(self, protocol=None):
        client = protocol or recording_client()
        await endpoints.connectProtocol(endpoints.UNIXClientEndpoint(reactor, self.path), client)
        await wait_until(lambda: len(self.factory.connections) >= 1, 10, "the server to accept the connection")
        return client

    def close(self):
        for protocol in list(self.factory.connections):
            protocol.transport.abortConnection()
        return self.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_control_connection_that_says_nothing_is_closed_after_the_idle_timeout(tmp_path):
    """A client that connects and sends nothing is closed IDLE_TIMEOUT seconds later."""
    control = _ControlSocket(tmp_path)
    try:
        client = await control.connect()
        [server_side] = control.factory.connections
        control.clock.advance(IDLE_TIMEOUT - 0.1)
        assert not server_side.transport.disconnecting
        control.clock.advance(0.1)
        await wait_until(lambda: client.closed, 10, "the silent connection to close")
    finally:
        await control.close()


@pytest_twisted.ensureDeferred
async def test_control_connection_waiting_for_the_drain_is_not_closed(tmp_path):
    """A client waiting on WaitDrained is never idle, however long the drain takes."""
    from smartserve.control.client import ControlClient

    control = _ControlSocket(tmp_path)
    try:
        client = await control.connect(ControlClient(reactor, control.path))
        waiting = client.callRemote(WaitDrained)
        [server_side] = control.factory.connections
        await wait_until(lambda: server_side._commands, 10, "the server to receive WaitDrained")
        control.clock.advance(IDLE_TIMEOUT * 10)
        assert not server_side.transport.disconnecting
        control.factory.control.drain()
        assert (await waiting)["state"] == "drained"
    finally:
        await control.close()


@pytest_twisted.ensureDeferred
async def test_control_client_that_never_reads_its_answers_is_not_read_from_and_is_cut(tmp_path):
    """Pipelined requests whose answers are never read stop being read, then the connection is closed and cut."""
    control = _ControlSocket(tmp_path)
    try:
        client = await control.connect()
        [server_side] = control.factory.connections
        client.transport.pauseProducing()
        client.transport.write(_STATUS * 200_000)
        await wait_until(lambda: server_side.transport.producerPaused, 10, "the answers to back up")
        control.clock.advance(IDLE_TIMEOUT)
        control.clock.advance(CLOSE_TIMEOUT)
        await wait_until(lambda: not control.factory.connections, 10, "the server to cut the connection")
    finally:
        await control.close()


@pytest_twisted.ensureDeferred
async def test_unknown_command_asking_no_answer_is_one_log_line_and_the_connection_goes_on(tmp_path):
    """An unknown command sent without ``_ask`` has no one to tell: one warning, no traceback, later commands answered."""
    control = _ControlSocket(tmp_path)
    try:
        with logged_events(lambda event: event.get("log_namespace", "").startswith("smartserve.control")) as events:
            client = await control.connect()
            client.transport.write(b"\x00\x08_command\x00\x03Foo\x00\x00" + _STATUS)
            await wait_until(lambda: b"_answer" in client.received, 10, "the Status answer")
        assert not client.closed
        assert [event for event in events if "log_failure" in event] == []
        refusals = [formatEvent(event) for event in events if event["log_level"] is LogLevel.warn]
        assert len(refusals) == 1 and "Foo" in refusals[0], refusals
    finally:
        await control.close()


def test_hostile_control_clients_against_a_real_server(tmp_path):
    """Malformed messages, silent clients, many at once and a client that never reads: each gets an error or is
    closed within the idle timeout and the close timeout, and `smartserve status` answers throughout."""
    server = SmartserveProcess(tmp_path / "data", ["--bzr", "tcp:0:interface=127.0.0.1", "--ssh", "none"]).start()
    path = str(server.data / "control.sock")
    bound = IDLE_TIMEOUT + CLOSE_TIMEOUT + 5

    def connect():
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)  # blocking: waits while the accept queue is full
        sock.settimeout(bound)
        return sock

    def status_answers():
        status = subprocess.run(
            [str(VENV_BIN / "smartserve"), "status", "--control", path], capture_output=True, text=True, timeout=30
        )
        return status.returncode == 0 and "serving" in status.stdout

    def closed(sock):
        """Read until the server closes ``sock``; raises socket.timeout past the bound."""
        while sock.recv(65536):
            pass
        return True

    try:
        started = time.monotonic()
        garbage, long_key, unknown = connect(), connect(), connect()
        garbage.sendall(b"\xff" * 10)
        long_key.sendall(b"\x01\x00" + b"a" * 256)
        unknown.sendall(b"\x00\x04_ask\x00\x011\x00\x08_command\x00\x03Foo\x00\x00")
        silent = [connect() for _ in range(50)]
        never_reads = connect()
        never_reads.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        never_reads.setblocking(False)
        flood, sent = _STATUS * 200_000, 0
        while sent < len(flood):
            try:
                sent += never_reads.send(flood[sent:sent + 65536])
            except BlockingIOError:
                break  # the server stopped reading
        assert status_answers()
        assert closed(garbage) and closed(long_key)
        assert b"UNHANDLED" in unknown.recv(65536) and closed(unknown)
        assert all(closed(sock) for sock in silent)
        never_reads.setblocking(True)
        never_reads.settimeout(bound)
        try:
            closed(never_reads)
        except ConnectionResetError:
            pass  # cut, not closed: it never took its answers
        assert time.monotonic() - started < bound + 10
        assert sent < len(flood)
        assert status_answers()
    finally:
        server.stop()

"""Drain triggered by signals and its effect on real connections: SIGHUP, SIGTERM, idle and late requests."""

from __future__ import annotations

import signal
import socket
import time

import pytest

from support import wait_for
from smartserve.testing import RawClient

from .conftest import ServerProcess, said_draining, server_status, start_smartserve_command

pytestmark = pytest.mark.timeout(90)

SIZE = 8 * 1024 * 1024


@pytest.fixture
def server(tmp_path):
    """A server on bzr:// with writes allowed, a small text file and a big file under its root."""
    data = tmp_path / "data"
    root = data / "branches"
    root.mkdir(parents=True)
    (root / "notes.txt").write_bytes(b"before\n")
    (root / "big.bin").write_bytes(bytes(range(256)) * (SIZE // 256))
    process = ServerProcess(
        data, ["--bzr", "tcp:0:interface=127.0.0.1", "--bzr-allow-writes", "--ssh", "none"]
    ).start()
    yield process
    process.stop()


def test_sighup_idle_connection_closes_within_a_second(server):
    """On SIGHUP an idle connection is closed within 1 s and the server exits 0."""
    client = RawClient.connect("127.0.0.1", server.port)
    assert client.call(b"hello").args == (b"ok", b"2")
    sent = time.monotonic()
    server.process.send_signal(signal.SIGHUP)
    assert said_draining(client.wait_closed())
    assert time.monotonic() - sent < 1.0
    client.close()
    assert server.wait_exit(30) == 0
    assert "SIGHUP: draining, then exiting" in server.log()


def test_drain_request_after_close_never_applied(server):
    """An append written to a connection after the drain started is never applied: the file is unchanged."""
    client = RawClient.connect("127.0.0.1", server.port)
    assert client.call(b"get", b"notes.txt").body == b"before\n"
    server.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "Draining: " in server.log(), 10, "the drain to start")
    try:
        client.send_request([b"append", b"notes.txt", b""], b"after\n")
        assert said_draining(client.wait_closed())
    except ConnectionError:
        pass  # the server had already closed: the write itself may fail
    finally:
        client.close()
    assert server.wait_exit(30) == 0
    assert (server.data / "branches" / "notes.txt").read_bytes() == b"before\n"
    assert "append" not in [record["verb"] for record in server.access_records()]


def _busy_client_while_sigterm_drains(server) -> RawClient:
    """A client whose big response is being written (it reads nothing yet) when SIGTERM has started a drain."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    client = RawClient(sock)
    client.send_request([b"get", b"big.bin"])
    wait_for(lambda: server_status(server)["busy"] == 1, 10, "the response to start")
    server.process.send_signal(signal.SIGTERM)
    wait_for(lambda: "Draining: 1 connections open, 1 busy" in server.log(), 10, "the drain to start")
    return client


def test_sigterm_waits_for_busy_connection(server):
    """SIGTERM with a response still being written lets it finish intact, then the server exits."""
    client = _busy_client_while_sigterm_drains(server)
    assert server.process.poll() is None
    reply = client.read_reply()
    assert reply.args == (b"ok",)
    assert reply.body == bytes(range(256)) * (SIZE // 256)
    assert said_draining(client.wait_closed())
    client.close()
    # twistd leaves by re-raising the signal that stopped it, as a shell expects.
    assert server.wait_exit(30) == -signal.SIGTERM
    assert "0 aborted" in server.log()


def test_second_drain_triggers_during_sigterm_drain_let_response_finish(server):
    """SIGHUP, a second SIGTERM, SIGINT and `smartserve drain` during a SIGTERM drain change nothing: the response in progress finishes intact, then the server exits."""
    client = _busy_client_while_sigterm_drains(server)
    for number, (signum, name) in enumerate(
        [(signal.SIGHUP, "SIGHUP"), (signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")], start=1
    ):
        server.process.send_signal(signum)
        wait_for(lambda: server.log().count(": already draining") == number, 10, f"the server to hear {name}")
    drain = start_smartserve_command("drain", "--control", server.control)
    try:
        wait_for(lambda: "Drain requested on the control socket" in server.log(), 10, "the drain command")
        assert server.process.poll() is None
        reply = client.read_reply()
        assert reply.args == (b"ok",)
        assert reply.body == bytes(range(256)) * (SIZE // 256)
        assert said_draining(client.wait_closed())
        out, err = drain.communicate(timeout=30)
    finally:
        client.close()
        if drain.poll() is None:
            drain.kill()
            drain.wait()
    assert drain.returncode == 0, err
    assert out.splitlines()[-1] == "drained"
    assert server.wait_exit(30) == -signal.SIGTERM
    log = server.log()
    assert "Drained in" in log and "(all closed); 0 aborted" in log
    assert "Unhandled" not in log and "ReactorNotRunning" not in log

"""A listening socket held by a supervisor (systemd socket activation) outlives the server processes."""

from __future__ import annotations

import signal
import socket

import pytest

from smartserve.testing import RawClient, encode_request, response_args
from support import SmartserveProcess, wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def held_socket():
    """A listening socket on 127.0.0.1, as systemd's .socket unit would hold it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield sock
    sock.close()


def _server(tmp_path, sock, name: str = "data") -> SmartserveProcess:
    return SmartserveProcess(
        tmp_path / name, ["--ssh=none", "--bzr=systemd:domain=INET:index=0"], inherited=sock
    )


def _assert_answers_hello(port: int) -> None:
    client = RawClient.connect("127.0.0.1", port)
    try:
        assert client.call(b"hello").args == (b"ok", b"2")
    finally:
        client.close()


def test_socket_activation_no_connection_refused_between_server_processes(tmp_path, held_socket):
    """While no server runs on the held socket (killed with SIGKILL), a client connects anyway, and the next server answers it."""
    port = held_socket.getsockname()[1]
    first = _server(tmp_path, held_socket).start()
    try:
        _assert_answers_hello(port)
    finally:
        first.process.kill()
        first.process.wait()
    waiting = socket.create_connection(("127.0.0.1", port), timeout=30)
    waiting.sendall(encode_request([b"hello"]))
    second = _server(tmp_path, held_socket).start()
    try:
        reply = b""
        while not response_args(reply):
            chunk = waiting.recv(65536)
            assert chunk, "the connection made while no server ran was closed unanswered"
            reply += chunk
        assert response_args(reply) == [(b"ok", b"2")]
    finally:
        waiting.close()
        second.stop()


def test_socket_activation_drained_server_leaves_the_socket_listening(tmp_path, held_socket):
    """A server that drains and exits closes only its own copy of the held socket: the next server serves on it."""
    port = held_socket.getsockname()[1]
    first = _server(tmp_path, held_socket).start()
    first.stop()
    waiting = socket.create_connection(("127.0.0.1", port), timeout=30)
    waiting.close()
    second = _server(tmp_path, held_socket).start()
    try:
        _assert_answers_hello(port)
    finally:
        second.stop()


def _assert_serves_every_new_connection(server: SmartserveProcess, port: int) -> None:
    """Five new connections to ``port`` each get a hello answered, all five by ``server``."""
    served_before = len(server.access_records())
    for _ in range(5):
        _assert_answers_hello(port)
    wait_for(lambda: len(server.access_records()) == served_before + 5, 10, "the one server left to log five hellos")
    assert {record["verb"] for record in server.access_records()[served_before:]} == {"hello"}


def test_socket_activation_two_servers_on_one_socket_survive_a_crash(tmp_path, held_socket):
    """Two servers share the held socket (two units with the same Sockets=); with one killed, the other answers every new connection."""
    port = held_socket.getsockname()[1]
    crashing = _server(tmp_path, held_socket, "first").start()
    surviving = _server(tmp_path, held_socket, "second").start()
    try:
        crashing.process.kill()
        crashing.process.wait()
        _assert_serves_every_new_connection(surviving, port)
    finally:
        surviving.stop()


def test_socket_activation_one_of_two_servers_drains_and_the_other_serves_on(tmp_path, held_socket):
    """A rolling deploy of two units on one socket: the one that drains and exits leaves every new connection to the other."""
    port = held_socket.getsockname()[1]
    draining = _server(tmp_path, held_socket, "first").start()
    serving = _server(tmp_path, held_socket, "second").start()
    try:
        draining.stop()  # SIGTERM: drain, then exit by that signal, as systemd expects of a clean stop
        assert draining.process.returncode == -signal.SIGTERM
        _assert_serves_every_new_connection(serving, port)
    finally:
        serving.stop()


def test_socket_activation_missing_socket_is_a_clear_error(tmp_path):
    """Started with a systemd: endpoint but no socket from systemd, the server exits at once naming the endpoint and what is missing."""
    server = _server(tmp_path, None)
    server.start_expecting_exit()
    assert server.process.returncode != 0
    log = server.log()
    assert "bzr endpoint 'systemd:domain=INET:index=0': no such socket inherited from systemd" in log

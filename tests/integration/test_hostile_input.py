"""Bad input on a raw socket gets an error or a close, quickly, and harms no one else."""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import time

import pytest

from smartserve.protocol import (
    MESSAGE_MARKER,
    NEED_DATA,
    BodyChunk,
    Connection,
    EndOfMessage,
    Request,
    Response,
    Role,
)
from smartserve.testing import RawClient, response_args
from support import BRZ, brz_env, wait_for

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024


def _connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.settimeout(10)
    return sock


def _read_until_closed(sock: socket.socket, limit: float = 10.0) -> bytes:
    """Everything the server sends until it closes; fails if it does not close within ``limit``."""
    received = b""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not data:
            return received
        received += data
    raise AssertionError(f"the server did not close the connection within {limit} s")


def _call(server, *args):
    """One request on a fresh connection; returns its reply."""
    client = RawClient.connect("127.0.0.1", server.port)
    try:
        return client.call(*args)
    finally:
        client.close()


def _hello_works(server) -> bool:
    return _call(server, b"hello").args == (b"ok", b"2")


@pytest.fixture
def server(start_smartserve):
    """A read-only bzr:// server whose connections time out after 1 s idle."""
    return start_smartserve("--bzr", "tcp:0:interface=127.0.0.1", "--idle-timeout", "1", "--ssh", "none")


def _v3_error(reply: bytes):
    client = Connection(Role.CLIENT)
    client.send(Request((b"anything",)))
    client.receive_data(reply)
    event = client.next_event()
    assert isinstance(event, Response), reply
    return event


@pytest.mark.parametrize(
    "payload, fragment",
    [
        (MESSAGE_MARKER + b"\xff\xff\xff\xff", b"exceeds the limit"),
        (MESSAGE_MARKER + struct.pack(">L", 3) + b"xyz", b"not valid bencode"),
        (MESSAGE_MARKER + struct.pack(">L", 2) + b"de" + b"X", b"expected arguments"),
        (MESSAGE_MARKER + struct.pack(">L", 2) + b"de" + b"s" + struct.pack(">L", 3) + b"i1e", b"not a list"),
    ],
    ids=["huge-length-prefix", "invalid-bencode", "bad-part-kind", "args-not-a-list"],
)
def test_malformed_frame_gets_error_then_close(server, payload, fragment):
    """A malformed v3 frame gets a v3 error response naming the problem, then the connection closes."""
    with _connect(server) as sock:
        sock.sendall(payload)
        reply = _read_until_closed(sock)
    event = _v3_error(reply)
    assert event.success is False
    assert fragment in event.args[1]
    assert _hello_works(server)


@pytest.mark.parametrize(
    "payload, expected_start",
    [
        (b"hello\n", b"error\x01"),
        (b"bzr request 2\nhello\n", b"bzr response 2\nfailed\nerror\x01"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"error\x01"),
        (b"\x00\x01\x02garbage", b"error\x01"),
    ],
    ids=["v1", "v2", "http", "binary-garbage"],
)
def test_old_protocols_and_garbage_get_old_format_error(server, payload, expected_start):
    """v1, v2 and non-protocol input get an error in the old line format and a close, never a hang."""
    with _connect(server) as sock:
        sock.sendall(payload)
        reply = _read_until_closed(sock)
    assert reply.startswith(expected_start), reply
    assert b"version 3" in reply


def test_truncated_message_then_close_leaves_server_serving(server):
    """A client that sends half a request and vanishes does not disturb the server."""
    client = Connection(Role.CLIENT)
    data = client.send(Request((b"get", b"/x"))) + client.send(EndOfMessage())
    with _connect(server) as sock:
        sock.sendall(data[: len(data) // 2])
    assert _hello_works(server)


def test_never_ending_body_is_cut_by_idle_timeout_while_others_are_served(server):
    """A request body that stops arriving is closed by the idle timeout; other clients are served meanwhile."""
    client = Connection(Role.CLIENT)
    with _connect(server) as sock:
        sock.sendall(client.send(Request((b"put", b"/stuck", b""))) + client.send(BodyChunk(b"x" * 1000)))
        started = time.monotonic()
        assert _hello_works(server)
        _read_until_closed(sock, limit=10)
        elapsed = time.monotonic() - started
    assert 0.5 < elapsed < 8
    assert not (server.data / "branches" / "stuck").exists()
    assert "idle for 1.0 s" in server.log()


def test_unknown_verb_keeps_connection_usable(server):
    """An unknown verb gets UnknownMethod, and the same connection then serves a hello."""
    client = RawClient.connect("127.0.0.1", server.port)
    try:
        unknown = client.call(b"No.such_verb")
        hello = client.call(b"hello")
    finally:
        client.close()
    assert (unknown.args, unknown.success) == ((b"UnknownMethod", b"No.such_verb"), False)
    assert hello.args == (b"ok", b"2")


def _brz_serve_reply(tmp_path, args) -> tuple:
    """What `brz serve --inet` answers to request ``args``: (arguments, success)."""
    root = tmp_path / "brz-serve-root"
    root.mkdir(exist_ok=True)
    process = subprocess.Popen(
        [BRZ, "serve", "--inet", f"--directory={root}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=brz_env(tmp_path / "brz-serve-home"),
    )
    try:
        reply = RawClient.over_pipes(process.stdin, process.stdout).call(*args)
    finally:
        process.stdin.close()
        process.wait(timeout=30)
        process.stdout.close()
    return reply.args, reply.success


@pytest.mark.parametrize(
    "args",
    [(b"get", 5), (b"get", [b"a"]), (b"get", {b"k": b"v"}), (b"has", 7)],
    ids=["int", "list", "dict", "int-to-has"],
)
def test_argument_that_is_not_bytes_gets_the_error_brz_serve_sends(server, tmp_path, args):
    """A request argument of the wrong type gets the error reply `brz serve` sends, and the connection serves on."""
    expected = _brz_serve_reply(tmp_path, args)
    client = RawClient.connect("127.0.0.1", server.port)
    try:
        reply = client.call(*args)
        hello = client.call(b"hello")
    finally:
        client.close()
    assert (reply.args, reply.success) == expected
    assert expected[1] is False
    assert hello.args == (b"ok", b"2")


def test_huge_length_prefix_is_not_buffered(server):
    """A body part announced at 4 GiB is refused before the server buffers it."""
    client = Connection(Role.CLIENT)
    before = server.rss_kib()
    with _connect(server) as sock:
        sock.sendall(client.send(Request((b"put", b"/big", b""))) + b"b\xff\xff\xff\xf0" + b"x" * 65536)
        _read_until_closed(sock)
    assert server.rss_kib() - before < 20 * 1024
    assert not (server.data / "branches" / "big").exists()


@pytest.mark.parametrize(
    "path",
    ["/../../../../etc/passwd", "../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/escape/passwd"],
    ids=["dotdot-absolute", "dotdot-relative", "percent-escaped", "symlink-out"],
)
def test_paths_escaping_the_root_never_read_outside(server, path):
    """Paths that climb out of the served root, or symlinks pointing out, get an error, never the file."""
    (server.data / "branches" / "escape").symlink_to("/etc")
    reply = _call(server, b"get", path.encode())
    assert b"root:" not in reply.body
    assert reply.success is False, reply.args


def test_connections_over_the_bzr_limit_are_closed_and_logged(start_smartserve):
    """A flood of anonymous connections is cut at --bzr-max-connections; those already open are served."""
    server = start_smartserve(
        "--bzr", "tcp:0:interface=127.0.0.1", "--ssh", "none", "--bzr-max-connections", "2", name="limited"
    )
    first = RawClient.connect("127.0.0.1", server.port)
    second = RawClient.connect("127.0.0.1", server.port)
    assert first.call(b"hello").args == (b"ok", b"2") == second.call(b"hello").args
    with _connect(server) as refused:
        assert response_args(_read_until_closed(refused))[0][0] == b"TooManyConnections"
    assert "refusing bzr:// connection" in server.log()
    assert first.call(b"hello").args == (b"ok", b"2")
    first.close()
    # The server frees the slot once it has seen the close; until then a new connection is refused.
    assert wait_for(lambda: _hello_on_a_new_connection(server), 10, "a free slot after a connection closed")
    second.close()


def _hello_on_a_new_connection(server) -> bool:
    try:
        return _hello_works(server)
    except (ConnectionError, OSError):
        return False


def test_lock_token_for_an_unlocked_branch_gets_token_mismatch(start_smartserve, brz):
    """A lock token for an unlocked branch makes Breezy answer TokenMismatch with a None for the branch's token:
    the client gets TokenMismatch with an empty token there, the connection serves on, and nothing is logged."""
    server = start_smartserve("--bzr", "tcp:0:interface=127.0.0.1", "--bzr-allow-writes", "--ssh", "none", name="rw")
    brz.run("init", "-q", server.data / "branches" / "b")
    client = RawClient.connect("127.0.0.1", server.port)
    try:
        reply = client.call(b"Branch.set_last_revision_info", b"b/", b"tok", b"", b"0", b"null:")
        hello = client.call(b"hello")
    finally:
        client.close()
    assert (reply.args, reply.success) == ((b"TokenMismatch", b"tok", b""), False)
    assert hello.args == (b"ok", b"2")
    assert "could not be encoded" not in server.log()


def _write_until_stalled(sock: socket.socket, chunk: bytes, cap: int, stall: float) -> int:
    """Write ``chunk`` after ``chunk`` until the peer takes nothing for ``stall`` seconds or ``cap`` bytes went; returns the bytes written."""
    sent = 0
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        while sent < cap:
            _, writable, _ = select.select([], [sock], [], stall)
            if not writable:
                break
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                pass
    finally:
        sock.settimeout(timeout)
    return sent


def test_client_that_writes_without_reading_is_not_read_until_its_answer_is_taken(start_smartserve):
    """A client that asks for a 20 MB file, reads none of it and keeps writing is not read from while the
    answer waits: the server does not grow by what the client writes, and the answer then arrives whole."""
    server = start_smartserve("--bzr", "tcp:0:interface=127.0.0.1", "--ssh", "none", name="unread")
    content = os.urandom(20 * MiB)
    (server.data / "branches" / "big.bin").write_bytes(content)
    assert _call(server, b"get", b"big.bin").body == content  # the server has served such a file before
    before = server.rss_kib()

    client = Connection(Role.CLIENT)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(client.send(Request((b"get", b"big.bin"))) + client.send(EndOfMessage()))
        # Then the start of a pipelined put whose one body part never ends.
        sock.sendall(Connection(Role.CLIENT).send(Request((b"put", b"/p", b""))) + b"b" + struct.pack(">L", 200 * MiB))
        sent = _write_until_stalled(sock, b"j" * 65536, cap=128 * MiB, stall=2.0)
        grown_mib = (server.rss_kib() - before) / 1024
        assert sent < 32 * MiB, f"the server read {sent / MiB:.0f} MiB while its answer waited"
        assert grown_mib < 32, f"the server grew by {grown_mib:.0f} MiB"

        body = []
        while not isinstance(event := client.next_event(), EndOfMessage):
            if event is NEED_DATA:
                client.receive_data(sock.recv(1024 * 1024))
            elif isinstance(event, BodyChunk):
                body.append(event.data)
    assert b"".join(body) == content
    assert _hello_works(server)


def test_requests_followed_by_a_half_close_are_answered_then_the_connection_closes(server):
    """A client that sends its requests and shuts down its sending side gets every answer, in order, as from
    brz serve; then the server closes. The requests run in the worker pool, so none is answered inline."""
    client = Connection(Role.CLIENT)
    data = client.send(Request((b"BzrDir.open_2.1", b"missing/"))) + client.send(EndOfMessage())
    with _connect(server) as sock:
        sock.sendall(data + data)
        sock.shutdown(socket.SHUT_WR)
        received = _read_until_closed(sock)
    assert response_args(received) == [(b"no",), (b"no",)]

"""A client that stops reading a large response stream costs the server neither a worker nor the stream's size."""

from __future__ import annotations

import os
import socket

import pytest

from smartserve.testing import RawClient

pytestmark = pytest.mark.timeout(180)

FORMAT_2A = b"Bazaar repository format 2a (needs bzr 1.16 or later)\n"
STREAM_MIB = 48


@pytest.fixture
def big_branch_server(brz, start_smartserve):
    """A server with one worker thread, serving a branch whose history is STREAM_MIB of incompressible data."""
    server = start_smartserve("--bzr", "tcp:0:interface=127.0.0.1", "--ssh", "none", "--threads", "1")
    branch = server.data / "branches" / "big"
    brz.run("init", "-q", branch)
    for index in range(STREAM_MIB):
        (branch / f"part{index}").write_bytes(os.urandom(1024 * 1024))
    brz.run("add", "-q", cwd=branch)
    brz.run("commit", "-q", "-m", "data", cwd=branch)
    server.revision = brz.run("revision-info", "-d", branch).stdout.split()[1].encode()
    return server


def test_stalled_reader_of_a_large_stream_holds_no_worker_and_not_the_stream(big_branch_server):
    server = big_branch_server
    other = RawClient.connect("127.0.0.1", server.port)
    assert other.call(b"BzrDir.open_2.1", b"big/").success  # Breezy loaded before the baseline
    before = server.rss_kib()

    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    stalled.settimeout(30)
    stalled.connect(("127.0.0.1", server.port))
    read_early = []  # what the test reads itself, given back to the reader before the socket's next bytes

    def read(size: int) -> bytes:
        return read_early.pop() if read_early else stalled.recv(size)

    reader = RawClient(None, write=stalled.sendall, read=read)
    reader.send_request((b"Repository.get_stream_1.19", b"big/", FORMAT_2A), b"ancestry-of\n" + server.revision)
    started = b""
    while len(started) < 1024 * 1024:  # the stream has begun; from now on nobody reads it for a while
        started += stalled.recv(65536)

    # The only worker must be free for another request while the stream waits for its reader.
    assert other.call(b"Branch.last_revision_info", b"big/").args[:2] == (b"ok", b"1")
    grown_mib = (server.rss_kib() - before) / 1024
    assert grown_mib < STREAM_MIB / 2, f"the server grew by {grown_mib:.0f} MiB for a stalled {STREAM_MIB} MiB stream"

    # Read again, the stream goes on to its end, intact.
    read_early.append(started)
    reply = reader.read_reply()
    assert reply.success, reply.args
    assert len(reply.body) > STREAM_MIB * 1024 * 1024
    other.close()
    stalled.close()

"""A ``get`` or ``readv`` of much of a large file is read as it is sent: the server never holds the file, a stock
Breezy client reads it intact, and a reader that goes away leaves no file open."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys

import pytest

from smartserve.testing import RawClient
from tests.support import wait_for

pytestmark = pytest.mark.timeout(180)

MIB = 1024 * 1024
SPARSE_MIB = 160
# What the server may grow by while it sends a file of SPARSE_MIB.
GROWTH_BOUND_MIB = 48


def sparse_file_with_markers(path, size_mib: int) -> dict:
    """A sparse file of ``size_mib`` with a marker every 16 MiB; returns {offset: marker}."""
    markers = {}
    with open(path, "wb") as out:
        out.truncate(size_mib * MIB)
        for offset in range(0, size_mib * MIB, 16 * MIB):
            marker = f"marker at {offset}".encode()
            out.seek(offset)
            out.write(marker)
            markers[offset] = marker
    return markers


HALF = SPARSE_MIB * MIB // 2


@pytest.mark.parametrize(
    "args, body",
    [((b"get", b"/huge"), None), ((b"readv", b"/huge"), b"0,%d\n%d,%d\n" % (HALF, HALF, HALF))],
    ids=["get", "readv"],
)
def test_large_read_streams_without_holding_the_file(smartserve, args, body):
    server = smartserve
    markers = sparse_file_with_markers(server.data / "branches" / "huge", SPARSE_MIB)
    client = RawClient.connect("127.0.0.1", server.port, timeout=60)
    assert client.call(b"hello").success  # Breezy loaded before the baseline
    baseline_kib = server.rss_kib()

    found = {}
    grown = []

    def take(part: bytes) -> None:
        offset = take.offset
        for marker_offset, marker in markers.items():
            if offset <= marker_offset < offset + len(part):
                found[marker_offset] = part[marker_offset - offset : marker_offset - offset + len(marker)]
        take.offset += len(part)
        if not grown and take.offset >= 8 * MIB:
            grown.append((server.rss_kib() - baseline_kib) / 1024)

    take.offset = 0
    client.send_request(args, body)
    reply = client.read_reply(on_body_part=take)
    assert reply.success, reply.args
    assert take.offset == SPARSE_MIB * MIB
    assert found == markers
    assert grown and grown[0] < GROWTH_BOUND_MIB, f"the server grew by {grown[0]:.0f} MiB sending a {SPARSE_MIB} MiB file"
    # The connection goes on serving, and the access log counts every byte sent.
    assert client.call(b"get", b"/huge-missing").args[0] == b"NoSuchFile"
    client.close()
    verb = args[0].decode()
    sent = wait_for(
        lambda: re.findall(rf" {verb} read ok .* out=(\d+) ", server.access_lines()), 10, "the access log line"
    )
    assert SPARSE_MIB * MIB < int(sent[0]) < SPARSE_MIB * MIB + MIB


def test_stock_breezy_client_reads_a_large_file_intact(smartserve):
    content = os.urandom(5 * MIB + 12345)
    (smartserve.data / "branches" / "random").write_bytes(content)
    script = (
        "import sys, breezy\n"
        "with breezy.initialize():\n"
        "    from breezy.transport import get_transport\n"
        "    sys.stdout.buffer.write(get_transport(sys.argv[1]).get_bytes('random'))\n"
    )
    read = subprocess.run(
        [sys.executable, "-c", script, f"bzr://127.0.0.1:{smartserve.port}/"],
        capture_output=True,
        timeout=120,
        env={**os.environ, "BRZ_HOME": str(smartserve.data.parent / "brz-home")},
    )
    assert read.returncode == 0, read.stderr.decode()
    assert hashlib.sha256(read.stdout).hexdigest() == hashlib.sha256(content).hexdigest()


def open_files(pid: int, path) -> int:
    """How many of process ``pid``'s file descriptors are open on ``path``."""
    fd_dir = f"/proc/{pid}/fd"
    count = 0
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(os.path.join(fd_dir, fd)) == str(path):
                count += 1
        except FileNotFoundError:
            pass
    return count


def test_reader_gone_mid_file_leaves_no_file_open(smartserve):
    path = smartserve.data / "branches" / "huge"
    sparse_file_with_markers(path, 64)
    pid = smartserve.process.pid
    sock = socket.create_connection(("127.0.0.1", smartserve.port), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    client = RawClient(sock)
    client.send_request((b"get", b"/huge"))
    received = 0
    while received < 2 * MIB:  # the file is being sent; the server has it open
        received += len(sock.recv(65536))
    assert open_files(pid, path) == 1
    sock.close()
    wait_for(lambda: open_files(pid, path) == 0, 30, "the server to close the file of a vanished reader")


@pytest.mark.parametrize("path", [b"/escape", b"/../outside", b"/%2E%2E/outside"])
def test_large_file_outside_the_root_is_not_served(smartserve, path):
    """The jail holds for a large file as for a small one: the reader gets Breezy's error, not the content."""
    outside = smartserve.data / "outside"
    outside.write_bytes(b"secret" * MIB)
    (smartserve.data / "branches" / "escape").symlink_to(outside)
    client = RawClient.connect("127.0.0.1", smartserve.port, timeout=30)
    reply = client.call(b"get", path)
    assert not reply.success
    assert b"secret" not in b"".join(reply.args) + reply.body
    assert client.call(b"hello").success
    client.close()

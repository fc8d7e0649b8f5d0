"""``Repository.tarball`` sends a tarball of the repository from a temporary file, as the connection takes it."""

from __future__ import annotations

import io
import os
import tarfile
import tempfile

import pytest
from breezy import controldir
from breezy.bzr.smart import request
from breezy.transport import get_transport

from smartserve.server.backends import _large_reads
from smartserve.server.backends._commands import COMMANDS
from smartserve.testing import RawClient

pytestmark = pytest.mark.timeout(180)

MIB = 1024 * 1024
DATA_MIB = 16


def tarball(transport, compression: bytes):
    """The response to ``Repository.tarball`` of ``branch/``, a streamed body joined."""
    handler = request.SmartServerRequestHandler(transport, commands=COMMANDS, root_client_path="/")
    handler.args_received((b"Repository.tarball", b"branch/", compression))
    response = handler.response
    if response.body_stream is not None:
        response.body = b"".join(response.body_stream)
    return response


@pytest.fixture
def served(brz, tmp_path, monkeypatch):
    """(transport of a root holding a one-revision branch, the revision id, the temporary directory used)."""
    branch = tmp_path / "root" / "branch"
    brz.run("init", "-q", "--create-prefix", branch)
    (branch / "file").write_bytes(b"content\n" * 1000)
    brz.run("add", "-q", cwd=branch)
    brz.run("commit", "-q", "-m", "one", cwd=branch)
    revision = brz.run("revision-info", "-d", branch).stdout.split()[1].encode()
    monkeypatch.setenv("BRZ_HOME", str(brz.home))
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    return get_transport(str(tmp_path / "root")), revision, temporary


@pytest.mark.parametrize("compression", ["", "gz", "bz2"])
def test_tarball_holds_the_repository(served, tmp_path, compression):
    """The tarball unpacks to a repository with the branch's revision, and no temporary file is left behind.

    (Breezy's own server answers every tarball request with a TypeError.)
    """
    transport, revision, temporary = served
    response = tarball(transport, compression.encode())
    assert response.is_successful(), response.args
    unpacked = tmp_path / "unpacked"
    with tarfile.open(fileobj=io.BytesIO(response.body), mode="r:" + compression) as tar:
        tar.extractall(unpacked, filter="tar")
    repository = controldir.ControlDir.open(str(unpacked)).open_repository()
    with repository.lock_read():
        tree = repository.revision_tree(revision)
        assert tree.get_file_text("file") == b"content\n" * 1000
    assert os.listdir(temporary) == []


@pytest.mark.parametrize("compression, named", [(b"xz", b"'xz'"), (7, b"7")])
def test_unknown_compression_is_refused_before_any_copy(served, compression, named):
    transport, _, _ = served
    copies = []
    real_mkdtemp = tempfile.mkdtemp
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "mkdtemp", lambda *a, **k: copies.append(a) or real_mkdtemp(*a, **k))
        response = tarball(transport, compression)
    assert not response.is_successful()
    assert response.args[:2] == (b"error", b"ValueError") and named in response.args[2]
    assert copies == []


def test_tarball_is_read_from_its_file_in_bounded_pieces(served, monkeypatch):
    monkeypatch.setattr(_large_reads, "FILE_READ_BYTES", 4096)
    transport, _, _ = served
    handler = request.SmartServerRequestHandler(transport, commands=COMMANDS, root_client_path="/")
    handler.args_received((b"Repository.tarball", b"branch/", b""))
    response = handler.response
    assert response.body is None
    pieces = list(response.body_stream)
    assert len(pieces) > 2 and max(map(len, pieces)) == 4096


def test_large_tarball_arrives_intact_in_many_parts(brz, smartserve, tmp_path):
    branch = smartserve.data / "branches" / "big"
    brz.run("init", "-q", branch)
    for index in range(DATA_MIB):
        (branch / f"part{index}").write_bytes(os.urandom(MIB))
    brz.run("add", "-q", cwd=branch)
    brz.run("commit", "-q", "-m", "data", cwd=branch)
    client = RawClient.connect("127.0.0.1", smartserve.port, timeout=120)
    parts = []
    received = tmp_path / "received.tar"
    with open(received, "wb") as out:

        def take(part: bytes) -> None:
            parts.append(len(part))
            out.write(part)

        client.send_request((b"Repository.tarball", b"big/", b""))
        reply = client.read_reply(on_body_part=take)
    assert reply.success, reply.args
    assert len(parts) >= DATA_MIB and max(parts) <= _large_reads.FILE_READ_BYTES
    with tarfile.open(received) as tar:
        packed = sum(member.size for member in tar.getmembers() if member.name.startswith(".bzr/repository/packs/"))
    assert packed > DATA_MIB * MIB
    assert client.call(b"hello").success
    client.close()

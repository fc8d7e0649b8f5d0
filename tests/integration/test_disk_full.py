"""A push into a served tree whose disk is full fails with the disk's error, commits nothing,
is logged for the operator, and the server serves on."""

from __future__ import annotations

import os
import subprocess

import pytest

from smartserve.testing import RawClient
from support import wait_for

pytestmark = pytest.mark.timeout(240)

DISK_BYTES = 2 * 1024 * 1024


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs mounted for the test (it needs root's right to mount)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root with CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_push_onto_a_full_disk_fails_cleanly_and_the_server_serves_on(brz, start_smartserve, small_disk, tmp_path):
    """The push fails with "No space left on device", the branch keeps its revisions, `brz check` is clean,
    upload/ is empty, the twistd log names the request and the error, and the branch still reads."""
    server = start_smartserve(
        "--bzr", "tcp:0:interface=127.0.0.1", "--bzr-allow-writes", "--ssh", "none", "--root", str(small_disk)
    )
    url = f"{server.url}/b"
    local = brz.make_branch(tmp_path / "local", revisions=2)
    brz.run("push", url, cwd=local)
    (local / "big.bin").write_bytes(os.urandom(2 * DISK_BYTES))
    brz.run("add", "-q", "big.bin", cwd=local)
    brz.run("commit", "-q", "-m", "more than the disk holds", cwd=local)

    pushed = brz.run("push", url, cwd=local, check=False)
    assert pushed.returncode != 0
    assert "No space left on device" in pushed.stderr

    served = small_disk / "b"
    upload = served / ".bzr" / "repository" / "upload"
    wait_for(lambda: not any(upload.iterdir()), 30, "the failed write group's pack to be removed")
    assert int(brz.run("revno", url).stdout.strip()) == 2
    check = brz.run("check", served)
    assert "inconsistent" not in check.stdout + check.stderr
    assert "failed on the server: OSError: [Errno 28] No space left on device" in server.log()
    brz.run("branch", url, tmp_path / "copy")
    assert int(brz.run("revno", tmp_path / "copy").stdout.strip()) == 2
    client = RawClient.connect("127.0.0.1", server.port)
    try:
        assert client.call(b"hello").args == (b"ok", b"2")
    finally:
        client.close()

"""The real ``brz`` over bzr+ssh:// (through the real OpenSSH client) against the SSH front end."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults
from twisted.logger import globalLogPublisher

from .conftest import OpenSSHClient, SSHServerUnderTest, needs_openssh

pytestmark = [needs_openssh, pytest.mark.timeout(180)]


async def _ok(run) -> str:
    """Await a brz run and return its stdout + stderr; fail with stderr if it failed."""
    out, err, code = await run
    assert code == 0, err.decode()
    return (out + err).decode()


# Commits through Breezy's API in one process: a brz run per commit is slow.
_MAKE_BRANCH = """
import os, sys
import breezy
from breezy import controldir
from breezy.plugin import load_plugins

path, revisions = sys.argv[1], int(sys.argv[2])
with breezy.initialize():
    load_plugins()
    tree = controldir.ControlDir.create_standalone_workingtree(
        path, format=controldir.format_registry.make_controldir("2a")
    )
    for number in range(revisions):
        with open(os.path.join(path, "file.txt"), "w") as text:
            text.write(f"revision {number}\\n")
        if number == 0:
            tree.add(["file.txt"])
        tree.commit(f"revision {number}")
"""


def _make_branch(client: OpenSSHClient, path: Path, revisions: int) -> Path:
    """Make a local branch of ``revisions`` commits (no server involved, so blocking is fine)."""
    path.mkdir(parents=True)
    subprocess.run(
        [sys.executable, "-c", _MAKE_BRANCH, str(path), str(revisions)],
        env=client.env,
        check=True,
        capture_output=True,
    )
    return path


def _snapshot(root: Path) -> dict:
    """Every file and folder under ``root`` with its size and modification time."""
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in root.rglob("*")
    }


def _revno(out: str) -> int:
    return int(out.strip().splitlines()[-1])


@pytest.fixture
def alice(ssh_client):
    """Alice's brz and ssh, with her home folder ``/~alice/`` present on the server."""
    (ssh_client.server.root / "~alice").mkdir()
    return ssh_client


@pytest.fixture
def access_log():
    """The access log events (verb, user) emitted while the test runs."""
    events = []

    def observe(event):
        if event.get("log_namespace") == "smartserve.access":
            events.append((event["verb"], event["user"]))

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


@pytest_twisted.ensureDeferred
async def test_brz_push_and_branch_roundtrip(alice, tmp_path, access_log):
    """A 20-revision branch pushed into a shared repository in ~alice comes back identical, by smart verbs."""
    local = _make_branch(alice, tmp_path / "local", 20)
    await _ok(alice.brz("init-shared-repo", alice.url("alice", "~alice/repo")))
    await _ok(alice.brz("init", alice.url("alice", "~alice/repo/trunk")))
    await _ok(alice.brz("push", alice.url("alice", "~alice/repo/trunk"), cwd=local))
    await _ok(alice.brz("branch", alice.url("alice", "~alice/repo/trunk"), tmp_path / "copy"))
    verbs = [verb for verb, user in access_log if user == "alice"]
    assert "Repository.insert_stream_1.19" in verbs and "Repository.get_stream_1.19" in verbs
    assert sum(verb in ("get", "readv") for verb in verbs) <= 2, verbs
    assert _revno(await _ok(alice.brz("revno", alice.url("alice", "~alice/repo/trunk")))) == 20
    assert _revno(await _ok(alice.brz("revno", tmp_path / "copy"))) == 20
    local_log = await _ok(alice.brz("log", "--line", cwd=local))
    assert await _ok(alice.brz("log", "--line", cwd=tmp_path / "copy")) == local_log


@pytest_twisted.ensureDeferred
async def test_brz_push_creates_prefix_in_home(ssh_client, tmp_path):
    """A user can create their own home folder with ``push --create-prefix``."""
    local = _make_branch(ssh_client, tmp_path / "local", 1)
    await _ok(
        ssh_client.brz("push", "--create-prefix", ssh_client.url("alice", "~alice/p/trunk"), cwd=local)
    )
    assert (ssh_client.server.root / "~alice" / "p" / "trunk" / ".bzr").is_dir()


@pytest_twisted.ensureDeferred
async def test_brz_push_outside_home_refused(alice, tmp_path):
    """Pushing outside /~alice/ fails with brz's read-only error and writes nothing."""
    local = _make_branch(alice, tmp_path / "local", 2)
    (alice.server.root / "~bob").mkdir()
    before = _snapshot(alice.server.root)
    for target in ("elsewhere", "~bob/trunk", "~alicex/trunk"):
        out, err, code = await alice.brz("push", "--create-prefix", alice.url("alice", target), cwd=local)
        assert code != 0
        assert b"readonly transport" in err or b"read-only" in err.lower(), err
    assert _snapshot(alice.server.root) == before


@pytest_twisted.ensureDeferred
async def test_brz_checkout_commit_tags_pull_cat_info(alice, tmp_path):
    """Bound commits, tags, pull, cat -r and info all work over bzr+ssh://."""
    local = _make_branch(alice, tmp_path / "local", 3)
    url = alice.url("alice", "~alice/b")
    await _ok(alice.brz("push", url, cwd=local))
    await _ok(alice.brz("tag", "-d", url, "-r", "2", "release-2"))
    assert "release-2" in await _ok(alice.brz("tags", "-d", url))
    checkout = tmp_path / "co"
    await _ok(alice.brz("checkout", url, checkout))
    (checkout / "file.txt").write_text("changed in a checkout\n")
    await _ok(alice.brz("commit", "-m", "bound commit", cwd=checkout))
    assert _revno(await _ok(alice.brz("revno", url))) == 4
    assert "Now on revision 4" in await _ok(alice.brz("pull", url, cwd=local))
    assert await _ok(alice.brz("cat", "-r", "1", f"{url}/file.txt")) == "revision 0\n"
    assert "2a" in await _ok(alice.brz("info", "-v", url))


@pytest_twisted.ensureDeferred
async def test_brz_large_file_roundtrip(alice, tmp_path):
    """A 20 MB file pushed and branched back over SSH has the same bytes."""
    local = tmp_path / "local"
    local.mkdir()
    await _ok(alice.brz("init", "-q", local))
    payload = os.urandom(20 * 1024 * 1024)
    (local / "big.bin").write_bytes(payload)
    await _ok(alice.brz("add", "-q", "big.bin", cwd=local))
    await _ok(alice.brz("commit", "-q", "-m", "big", cwd=local))
    await _ok(alice.brz("push", alice.url("alice", "~alice/big"), cwd=local))
    await _ok(alice.brz("branch", alice.url("alice", "~alice/big"), tmp_path / "copy"))
    copied = (tmp_path / "copy" / "big.bin").read_bytes()
    assert hashlib.sha256(copied).digest() == hashlib.sha256(payload).digest()


@pytest_twisted.ensureDeferred
async def test_brz_diverged_concurrent_pushes_one_wins(alice, tmp_path):
    """Two diverged pushes at once over SSH: one succeeds, the other fails, the branch checks clean."""
    base = _make_branch(alice, tmp_path / "base", 2)
    url = alice.url("alice", "~alice/b")
    await _ok(alice.brz("push", url, cwd=base))
    sides = [tmp_path / "left", tmp_path / "right"]
    for side in sides:
        await _ok(alice.brz("branch", url, side))
        (side / f"{side.name}.txt").write_text(side.name)
        await _ok(alice.brz("add", "-q", cwd=side))
        await _ok(alice.brz("commit", "-q", "-m", side.name, cwd=side))
    results = await gatherResults([alice.brz("push", url, cwd=side) for side in sides])
    codes = sorted(code for _, _, code in results)
    assert codes[0] == 0 and codes[1] != 0, results
    assert _revno(await _ok(alice.brz("revno", url))) == 3
    assert "error" not in (await _ok(alice.brz("check", url))).lower()


@pytest_twisted.ensureDeferred
async def test_brz_read_only_user_can_branch_but_not_write(tmp_path):
    """A read-only user branches, but push and a checkout commit are refused with nothing written."""
    server = SSHServerUnderTest(tmp_path / "s", access_text="guest read-only\n")
    try:
        alice = server.client_for("alice", tmp_path / "alice")
        guest = server.client_for("guest", tmp_path / "guest")
        (server.root / "~alice").mkdir()
        (server.root / "~guest").mkdir()
        local = _make_branch(alice, tmp_path / "local", 2)
        await _ok(alice.brz("push", alice.url("alice", "~alice/b"), cwd=local))

        await _ok(guest.brz("branch", guest.url("guest", "~alice/b"), tmp_path / "copy"))
        before = _snapshot(server.root)
        out, err, code = await guest.brz("push", guest.url("guest", "~guest/b"), cwd=tmp_path / "copy")
        assert code != 0 and b"read" in err.lower(), err
        checkout = tmp_path / "co"
        await _ok(guest.brz("checkout", guest.url("guest", "~alice/b"), checkout))
        (checkout / "file.txt").write_text("guest change\n")
        out, err, code = await guest.brz("commit", "-m", "not allowed", cwd=checkout)
        assert code != 0 and b"read" in err.lower(), err
        assert _snapshot(server.root) == before
        assert _revno(await _ok(alice.brz("revno", alice.url("alice", "~alice/b")))) == 2
    finally:
        await server.stopped()


@pytest_twisted.ensureDeferred
async def test_brz_access_file_grants_extra_prefix(tmp_path):
    """A ``write`` line lets a user push under a shared prefix as well as their home."""
    server = SSHServerUnderTest(tmp_path / "s", access_text="alice write /team/\n")
    try:
        alice = server.client_for("alice", tmp_path / "alice")
        (server.root / "team").mkdir()
        local = _make_branch(alice, tmp_path / "local", 1)
        await _ok(alice.brz("push", alice.url("alice", "team/trunk"), cwd=local))
        assert (server.root / "team" / "trunk" / ".bzr").is_dir()
    finally:
        await server.stopped()

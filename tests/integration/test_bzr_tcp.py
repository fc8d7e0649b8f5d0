"""The real `brz` client against smartserve over bzr:// (TCP)."""

from __future__ import annotations

import hashlib
import os

import pytest

pytestmark = pytest.mark.timeout(240)

VFS_READS = {"get", "readv"}


def _revno(brz, location) -> int:
    return int(brz.run("revno", location).stdout.strip())


def test_push_and_branch_roundtrip_keeps_history(brz, smartserve, tmp_path):
    """A 20-revision branch pushed into a shared repository comes back with the same log and revno."""
    local = brz.make_branch(tmp_path / "local", revisions=20)
    brz.run("init-shared-repo", f"{smartserve.url}/repo")
    brz.run("init", f"{smartserve.url}/repo/trunk")
    brz.run("push", f"{smartserve.url}/repo/trunk", cwd=local)
    copy = tmp_path / "copy"
    brz.run("branch", f"{smartserve.url}/repo/trunk", copy)
    assert _revno(brz, copy) == 20 == _revno(brz, f"{smartserve.url}/repo/trunk")
    assert brz.run("log", "--line", cwd=copy).stdout == brz.run("log", "--line", cwd=local).stdout
    assert (smartserve.data / "branches" / "repo" / ".bzr" / "repository").is_dir()


def test_push_and_branch_use_smart_verbs(brz, smartserve, tmp_path):
    """Pushing and branching a 2a branch streams revisions instead of reading files one by one."""
    local = brz.make_branch(tmp_path / "local", revisions=5)
    brz.run("push", f"{smartserve.url}/b", cwd=local)
    brz.run("branch", f"{smartserve.url}/b", tmp_path / "copy")
    verbs = [entry[2] for entry in smartserve.access_log()]
    assert "Repository.insert_stream_1.19" in verbs
    assert "Repository.get_stream_1.19" in verbs
    assert sum(verb in VFS_READS for verb in verbs) <= 2, verbs


def test_checkout_commit_updates_served_branch(brz, smartserve, tmp_path):
    """A commit in a bound checkout takes the remote write lock and lands on the server."""
    local = brz.make_branch(tmp_path / "local", revisions=2)
    brz.run("push", f"{smartserve.url}/b", cwd=local)
    checkout = tmp_path / "co"
    brz.run("checkout", f"{smartserve.url}/b", checkout)
    (checkout / "new.txt").write_text("new\n")
    brz.run("add", "-q", "new.txt", cwd=checkout)
    brz.run("commit", "-m", "bound commit", cwd=checkout)
    assert _revno(brz, f"{smartserve.url}/b") == 3
    verbs = [entry[2] for entry in smartserve.access_log()]
    assert "Branch.lock_write" in verbs and "Branch.unlock" in verbs


def test_tags_pull_cat_and_info(brz, smartserve, tmp_path):
    """Tags set remotely are listed; pull fetches new revisions; cat -r and info read the served branch."""
    local = brz.make_branch(tmp_path / "local", revisions=3)
    url = f"{smartserve.url}/b"
    brz.run("push", url, cwd=local)
    brz.run("tag", "-d", url, "-r", "2", "release-2")
    assert "release-2" in brz.run("tags", "-d", url).stdout

    other = tmp_path / "other"
    brz.run("checkout", url, other)
    (other / "file0.txt").write_text("changed on the server\n")
    brz.run("commit", "-m", "server side change", cwd=other)
    pulled = brz.run("pull", url, cwd=local)
    assert "Now on revision 4" in pulled.stderr + pulled.stdout
    assert (local / "file0.txt").read_text() == "changed on the server\n"

    assert brz.run("cat", "-r", "1", f"{url}/file0.txt").stdout == "revision 0 of file 0\n"
    info = brz.run("info", url).stdout
    assert "branch" in info.lower() and "2a" in brz.run("info", "-v", url).stdout


def test_large_file_roundtrip_is_intact(brz, smartserve, tmp_path):
    """A 20 MB file pushed and branched back has the same bytes."""
    local = tmp_path / "local"
    brz.run("init", "-q", local)
    payload = os.urandom(20 * 1024 * 1024)
    (local / "big.bin").write_bytes(payload)
    brz.run("add", "-q", "big.bin", cwd=local)  # named, so add.maximum_file_size does not skip it
    brz.run("commit", "-q", "-m", "big", cwd=local)
    brz.run("push", f"{smartserve.url}/big", cwd=local)
    brz.run("branch", f"{smartserve.url}/big", tmp_path / "copy")
    copied = (tmp_path / "copy" / "big.bin").read_bytes()
    assert hashlib.sha256(copied).digest() == hashlib.sha256(payload).digest()


def test_diverged_concurrent_pushes_one_wins(brz, smartserve, tmp_path):
    """Two diverged pushes at once: one succeeds, the other fails as brz usually does, and the branch checks clean."""
    base = brz.make_branch(tmp_path / "base", revisions=2)
    url = f"{smartserve.url}/b"
    brz.run("push", url, cwd=base)
    left, right = tmp_path / "left", tmp_path / "right"
    brz.run("branch", url, left)
    brz.run("branch", url, right)
    for side in (left, right):
        (side / f"{side.name}.txt").write_text(side.name)
        brz.run("add", "-q", cwd=side)
        brz.run("commit", "-q", "-m", side.name, cwd=side)
    pushes = [brz.popen("push", url, cwd=side) for side in (left, right)]
    results = [(push.wait(timeout=120), push.stderr.read()) for push in pushes]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    failure = next(err for code, err in results if code != 0)
    assert "diverged" in failure or "LockContention" in failure or "Could not acquire lock" in failure, failure
    assert _revno(brz, url) == 3
    check = brz.run("check", url)
    assert "error" not in (check.stdout + check.stderr).lower()


REFUSING_PLUGIN = '''
from breezy import branch, errors


def refuse(params):
    raise errors.TipChangeRejected("pushes are closed here")


branch.Branch.hooks.install_named_hook("pre_change_branch_tip", refuse, "refuse pushes")
'''


@pytest.mark.parametrize("options, refused", [((), True), (("--no-plugins",), False)], ids=["plugins", "no-plugins"])
def test_breezy_plugins_run_on_the_server_as_with_brz_serve(brz, start_smartserve, tmp_path, monkeypatch, options, refused):
    """A plugin's branch hook (here a push policy) runs in the server, as under `brz serve`; --no-plugins leaves it out.

    Found wrong: plugins were never loaded, so hooks a hosting site relies on
    (mail on a push, a policy refusing some pushes) silently did not run.
    The plugin is given to the server only: the client runs no such hook.
    """
    plugin = tmp_path / "plugins" / "refusepushes"
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text(REFUSING_PLUGIN)
    monkeypatch.setenv("BRZ_PLUGINS_AT", f"refusepushes@{plugin}")
    server = start_smartserve("--bzr", "tcp:0:interface=127.0.0.1", "--bzr-allow-writes", "--ssh", "none", *options)
    monkeypatch.delenv("BRZ_PLUGINS_AT")
    local = brz.make_branch(tmp_path / "local", revisions=2)
    pushed = brz.run("push", f"{server.url}/b", cwd=local, check=False)
    if refused:
        assert pushed.returncode != 0 and "pushes are closed here" in pushed.stderr, pushed.stderr
        assert "Breezy plugins loaded: " in server.log() and "refusepushes" in server.log()
    else:
        assert pushed.returncode == 0, pushed.stderr
        assert _revno(brz, f"{server.url}/b") == 2

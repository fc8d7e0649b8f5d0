"""``Repository.pack`` packs over the smart protocol (Breezy's own server request packs nothing, and says ok)."""

from __future__ import annotations

import pytest
from breezy import repository

from smartserve.testing import RawClient
from support import wait_for

pytestmark = pytest.mark.timeout(180)


def _packs(branch) -> list:
    return sorted(path.name for path in (branch / ".bzr" / "repository" / "packs").iterdir())


@pytest.fixture
def served_branch(smartserve, brz):
    """A served standalone branch of five commits, which leave five packs."""
    branch = brz.make_branch(smartserve.data / "branches" / "project", revisions=5, files=1)
    assert len(_packs(branch)) == 5
    return branch


def test_stock_pack_over_bzr_packs_the_repository(smartserve, brz, served_branch):
    """``brz pack bzr://...`` leaves one pack, the history whole and ``brz check`` clean."""
    brz.run("pack", f"{smartserve.url}/project")
    assert len(_packs(served_branch)) == 1
    assert brz.run("revno", f"{smartserve.url}/project").stdout.strip() == "5"
    brz.run("check", served_branch)
    wait_for(
        lambda: ("Repository.pack", "ok") in [(line["verb"], line["outcome"]) for line in smartserve.access_records()],
        10,
        "the access line of Repository.pack",
    )


def test_pack_with_a_hint_packs_only_the_packs_it_names(smartserve, brz, served_branch):
    """A client's hint (pack names) is followed: the two packs it names become one, the other three stay."""
    before = _packs(served_branch)
    named = [name[: -len(".pack")] for name in before[:2]]
    remote = repository.Repository.open(f"{smartserve.url}/project")
    with remote.lock_write():
        remote.pack(hint=named)
    after = _packs(served_branch)
    assert len(after) == 4
    assert set(before[2:]) <= set(after)
    assert not set(before[:2]) & set(after)
    brz.run("check", served_branch)


def test_pack_body_that_is_not_ascii_is_answered_with_an_error(smartserve, served_branch):
    """Pack names are ASCII: a body that is not gets an error reply, nothing is packed, the connection goes on."""
    client = RawClient.connect("127.0.0.1", smartserve.port)
    try:
        reply = client.call(b"Repository.pack", b"project/", b"", b"False", body=b"\xff\n")
        assert (reply.success, reply.args) == (False, (b"error", b"ValueError", b"pack names must be ASCII"))
        assert client.call(b"hello").args[0] == b"ok"
    finally:
        client.close()
    assert len(_packs(served_branch)) == 5


def test_read_only_caller_cannot_pack(start_smartserve, brz):
    """Packing writes: over read-only bzr:// ``brz pack`` fails as for any write, and every pack stays."""
    server = start_smartserve("--bzr", "tcp:0:interface=127.0.0.1", "--ssh", "none")
    branch = brz.make_branch(server.data / "branches" / "project", revisions=2, files=1)
    refused = brz.run("pack", f"{server.url}/project", check=False)
    assert refused.returncode != 0
    assert "read-only" in refused.stderr.lower() or "readonly" in refused.stderr.lower(), refused.stderr
    assert len(_packs(branch)) == 2

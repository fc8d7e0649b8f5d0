"""A `brz push` whose connection is cut in the middle of its revision stream loses nothing and commits nothing."""

from __future__ import annotations

import os
import threading

import pytest

from smartserve.testing import RawClient
from support import TcpRelay, wait_for

pytestmark = pytest.mark.timeout(240)


class CuttingRelay(TcpRelay):
    """A relay that closes the connection once ``cut_after`` bytes came from the client."""

    def __init__(self, target_port: int, cut_after: int):
        self.cut_after = cut_after
        self.cut = threading.Event()
        self._from_client = 0
        super().__init__(target_port)

    def passes(self, data: bytes, to_server: bool, connection: int) -> bool:
        if to_server:
            self._from_client += len(data)
            if self._from_client >= self.cut_after:
                self.cut.set()
        return not self.cut.is_set()


def _revno(brz, location) -> int:
    return int(brz.run("revno", location).stdout.strip())


def test_push_cut_mid_stream_commits_nothing_and_the_next_push_lands(brz, smartserve, tmp_path):
    """The cut stream's write group is aborted: the branch keeps its revision, `brz check` is clean, the server serves on.

    After `brz break-lock` (the cut push held the branch's lock, as it
    would against `brz serve`), the same push lands in full.
    """
    local = brz.make_branch(tmp_path / "local", revisions=2)
    brz.run("push", f"{smartserve.url}/b", cwd=local)
    (local / "big.bin").write_bytes(os.urandom(6 * 1024 * 1024))
    brz.run("add", "-q", "big.bin", cwd=local)
    brz.run("commit", "-q", "-m", "a big file", cwd=local)

    relay = CuttingRelay(smartserve.port, cut_after=2 * 1024 * 1024)
    try:
        cut = brz.run("push", f"bzr://127.0.0.1:{relay.port}/b", cwd=local, check=False)
    finally:
        relay.close()
    assert relay.cut.is_set()
    assert cut.returncode != 0, cut.stderr

    served = smartserve.data / "branches" / "b"
    upload = served / ".bzr" / "repository" / "upload"
    # The server aborts the write group in a worker once it sees the connection lost.
    wait_for(lambda: not any(upload.iterdir()), 30, "the aborted write group's pack to be removed")
    assert _revno(brz, served) == 2
    check = brz.run("check", served)
    assert "inconsistent" not in check.stdout + check.stderr
    def insert_stream_outcomes():
        return [r["outcome"] for r in smartserve.access_records() if r["verb"].startswith("Repository.insert_stream")]

    outcomes = wait_for(insert_stream_outcomes, 30, "the cut insert_stream in the access log")
    assert outcomes[-1] != "ok", outcomes

    client = RawClient.connect("127.0.0.1", smartserve.port)
    try:
        assert client.call(b"hello").args == (b"ok", b"2")
    finally:
        client.close()

    brz.run("break-lock", "--force", served)
    brz.run("push", f"{smartserve.url}/b", cwd=local)
    assert _revno(brz, f"{smartserve.url}/b") == 3
    copy = tmp_path / "copy"
    brz.run("branch", f"{smartserve.url}/b", copy)
    assert (copy / "big.bin").read_bytes() == (local / "big.bin").read_bytes()
    assert "Traceback" not in smartserve.log()

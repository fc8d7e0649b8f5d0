"""Request bodies past --max-request-memory, all connections together: a body that arrives then is refused
ServerBusy unrun; Breezy's own client shows the reason, smartserve's client sends the request again once the
server has memory for it, and it runs once."""

from __future__ import annotations

import os
import re
import urllib.request

import pytest
import pytest_twisted

from smartserve.client import RetryPolicy, SmartClient
from smartserve.testing import RawClient
from support import wait_for, wait_until

pytestmark = pytest.mark.timeout(120)

MIB = 1024 * 1024
_OPTIONS = (
    "--bzr", "tcp:0:interface=127.0.0.1", "--bzr-allow-writes", "--ssh", "none",
    "--admin", "tcp:0:interface=127.0.0.1",
    "--max-request-body", str(4 * MIB), "--max-request-memory", str(4 * MIB),
)


def _body_bytes_held(server) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.admin_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return float(re.search(r"^smartserve_request_body_bytes (\S+)$", text, re.M).group(1))


def _outcomes(server, verb: str) -> list:
    return [record["outcome"] for record in server.access_records() if record["verb"] == verb]


def _hog(server) -> RawClient:
    """A connection holding 3 MiB of a put's body, the request not ended."""
    hog = RawClient.connect("127.0.0.1", server.port, timeout=60)
    hog.begin_request([b"put", b"/hog", b""])
    hog.send_body_part(os.urandom(3 * MIB))
    wait_for(lambda: _body_bytes_held(server) >= 3 * MIB, 30, "the server to hold the hog's body")
    return hog


def test_breezy_client_is_refused_with_the_reason_and_nothing_is_written(start_smartserve):
    from breezy import errors
    from breezy.transport import get_transport

    server = start_smartserve(*_OPTIONS)
    hog = _hog(server)
    try:
        transport = get_transport(server.url + "/")
        with pytest.raises(errors.BzrError) as raised:
            transport.put_bytes("other", b"y" * (2 * MIB))
        assert "ServerBusy" in str(raised.value) and "send it again later" in str(raised.value)
        assert not (server.data / "branches" / "other").exists()
        # The access line is written right after the answer: wait for it.
        wait_for(lambda: _outcomes(server, "put") == ["ServerBusy"], 10, "the refusal's access line")
        assert "refused: request bodies held by the server are at its limit of 4194304 bytes" in server.log()
        assert _body_bytes_held(server) < 3.5 * MIB, "the refused body was given back"
        hog.end_request()
        assert hog.read_reply().args == (b"ok",)
        transport.put_bytes("other", b"y" * (2 * MIB))  # the server has room again
    finally:
        hog.close()
    assert (server.data / "branches" / "other").read_bytes() == b"y" * (2 * MIB)
    assert wait_for(lambda: _body_bytes_held(server) == 0, 10, "every body given back")


@pytest_twisted.ensureDeferred
async def test_smartserve_client_sends_again_once_the_server_has_room_and_the_append_runs_once(start_smartserve):
    server = start_smartserve(*_OPTIONS)
    hog = _hog(server)
    policy = RetryPolicy(backoff_initial=0.05, backoff_max=0.2, max_resends=100, budget_tokens=1000.0)
    client = SmartClient.from_url(server.url + "/", policy=policy)
    try:
        appended = client.call(b"append", b"/journal", b"", body=b"z" * (2 * MIB))
        await wait_until(lambda: "ServerBusy" in _outcomes(server, "append"), 30, "the append to be refused")
        assert not appended.called
        hog.end_request()
        assert hog.read_reply().args == (b"ok",)
        reply = await appended
    finally:
        hog.close()
        await client.close()
    assert reply.args == (b"appended", b"0")
    assert client.stats.resends >= 1
    assert (server.data / "branches" / "journal").read_bytes() == b"z" * (2 * MIB)
    wait_for(lambda: _outcomes(server, "append")[-1:] == ["ok"], 10, "the append's access line")
    assert set(_outcomes(server, "append")[:-1]) == {"ServerBusy"}


def test_stock_push_refused_mid_stream_leaves_the_repository_usable_and_works_once_there_is_room(
    start_smartserve, brz, tmp_path
):
    """A push whose large record arrives while the server's memory for bodies is taken fails with the reason,
    commits nothing, and the same push works once the memory is given back."""
    server = start_smartserve(*_OPTIONS)
    brz.run("init-shared-repo", "-q", server.data / "branches" / "repo")
    local = brz.make_branch(tmp_path / "local", 2)
    (local / "blob.bin").write_bytes(os.urandom(2 * MIB))  # stays 2 MiB in its record: it does not compress
    brz.run("add", "-q", cwd=local)
    brz.run("commit", "-q", "-m", "a blob", cwd=local)
    hog = _hog(server)
    try:
        refused = brz.run("push", "-q", "-d", local, f"{server.url}/repo/trunk", check=False)
        assert refused.returncode != 0
        assert "ServerBusy" in refused.stderr and "send it again later" in refused.stderr
        hog.end_request()
        assert hog.read_reply().args == (b"ok",)
    finally:
        hog.close()
    brz.run("push", "-q", "--use-existing-dir", "-d", local, f"{server.url}/repo/trunk")
    assert brz.run("revno", f"{server.url}/repo/trunk").stdout.strip() == "3"
    check = brz.run("check", server.data / "branches" / "repo" / "trunk", check=False)
    assert check.returncode == 0, check.stderr
    assert ("Repository.insert_stream_1.19", "ServerBusy") in [
        (record["verb"], record["outcome"]) for record in server.access_records()
    ], "the refused push's access line was written before the push after it began"


def test_one_address_is_held_to_its_share_of_request_memory(start_smartserve):
    """With --max-request-memory-per-caller, one bzr:// client address cannot take the server's whole limit:
    its second upload is refused for one caller while the server as a whole has room."""
    from breezy import errors
    from breezy.transport import get_transport

    server = start_smartserve(
        "--bzr", "tcp:0:interface=127.0.0.1", "--bzr-allow-writes", "--ssh", "none",
        "--admin", "tcp:0:interface=127.0.0.1",
        "--max-request-body", str(4 * MIB), "--max-request-memory", str(64 * MIB),
        "--max-request-memory-per-caller", str(4 * MIB),
    )  # fmt: skip
    hog = _hog(server)
    try:
        with pytest.raises(errors.BzrError) as raised:
            get_transport(server.url + "/").put_bytes("other", b"y" * (2 * MIB))
        assert "of request bodies for one caller" in str(raised.value)
        wait_for(lambda: _outcomes(server, "put") == ["ServerBusy"], 10, "the refusal's access line")
        assert (
            "put from - at 127.0.0.1:" in server.log()
            and "refused: request bodies held for this caller are at the limit of 4194304 bytes per caller" in server.log()
        )
        assert not (server.data / "branches" / "other").exists()
    finally:
        hog.close()

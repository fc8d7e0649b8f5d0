"""The client against smartserve itself, over bzr:// and bzr+ssh://."""

from __future__ import annotations

import pytest
import pytest_twisted

from smartserve.client import NoSuchFile, RetryPolicy, SmartClient, SSHOptions

from .conftest import copy_branch, streamed_revisions


@pytest.fixture(params=["bzr", "bzr+ssh"])
def client(request, smartserve_server):
    if request.param == "bzr":
        client = SmartClient.from_url(smartserve_server.bzr_url)
    else:
        client = SmartClient.from_url(
            smartserve_server.ssh_url,
            policy=RetryPolicy(deadline=30.0),
            ssh=SSHOptions(
                identity_files=[str(smartserve_server.client_key)],
                known_hosts=str(smartserve_server.known_hosts),
                use_agent=False,
            ),
        )
    yield client
    pytest_twisted.blockon(client.close())


@pytest_twisted.ensureDeferred
async def test_smartserve_vfs_verbs(client, smartserve_server, request):
    """hello, put, append, get, readv, stat, has and list_dir work against smartserve."""
    name = request.node.callspec.id.replace("+", "-")
    folder = smartserve_server.root / name
    folder.mkdir()
    remote = f"/{name}"
    assert (await client.call(b"hello")).args[0] == b"ok"
    await client.call(b"put", f"{remote}/file".encode(), b"", body=b"0123456789")
    assert (await client.call(b"append", f"{remote}/file".encode(), b"", body=b"ab")).args == (b"appended", b"10")
    assert (await client.call(b"get", f"{remote}/file".encode())).body == b"0123456789ab"
    assert (await client.call(b"readv", f"{remote}/file".encode(), body=b"1,2\n10,2")).body == b"12ab"
    assert (await client.call(b"stat", f"{remote}/file".encode())).args[:2] == (b"stat", b"12")
    assert (await client.call(b"has", f"{remote}/file".encode())).args == (b"yes",)
    assert (await client.call(b"list_dir", remote.encode())).args == (b"names", b"file")
    with pytest.raises(NoSuchFile):
        await client.call(b"get", f"{remote}/missing".encode())
    assert (folder / "file").read_bytes() == b"0123456789ab"


@pytest_twisted.ensureDeferred
async def test_smartserve_get_stream_of_a_real_branch(client, smartserve_server, sample_branch, request):
    """Repository.get_stream_1.19 from smartserve streams every revision of a real branch."""
    name = "branch-" + request.node.callspec.id.replace("+", "-")
    copy_branch(sample_branch, smartserve_server.root / name)
    assert len(await streamed_revisions(client, f"/{name}/".encode())) == 3


@pytest_twisted.ensureDeferred
async def test_smartserve_ssh_connections_replaced_for_their_age_lose_no_append(smartserve_server):
    """With max_connection_age, appends go on over new SSH connections, each applied once, none resent or failed."""
    from twisted.internet import reactor

    client = SmartClient.from_url(
        smartserve_server.ssh_url,
        policy=RetryPolicy(deadline=30.0, max_connection_age=0.2),
        ssh=SSHOptions(
            identity_files=[str(smartserve_server.client_key)],
            known_hosts=str(smartserve_server.known_hosts),
            use_agent=False,
        ),
    )
    journal = smartserve_server.root / "aged-journal"
    remote = f"/{journal.name}".encode()
    try:
        await client.call(b"put", remote, b"", body=b"")
        lines = 0
        started = reactor.seconds()
        while client.stats.retired_connections < 3 and reactor.seconds() - started < 20:
            await client.call(b"append", remote, b"", body=b"%d\n" % lines)
            lines += 1
    finally:
        await client.close()
    assert client.stats.retired_connections >= 3
    assert client.stats.resends == 0 and client.stats.outcome_unknown == 0
    assert journal.read_bytes() == b"".join(b"%d\n" % line for line in range(lines))

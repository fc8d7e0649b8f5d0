"""The client against a real `brz serve` over TCP."""

from __future__ import annotations

import pytest
import pytest_twisted

from twisted.logger import formatEvent

from smartserve.client import (
    FileExists,
    NoSuchFile,
    ReadError,
    RemoteError,
    ResponseTooLarge,
    SmartClient,
    UnknownMethod,
)
from smartserve.protocol import Limits

from support import logged_events

from .conftest import copy_branch, streamed_revisions


@pytest.fixture
def client(brz_serve):
    client = SmartClient.from_url(brz_serve.url)
    yield client
    pytest_twisted.blockon(client.close())


@pytest_twisted.ensureDeferred
async def test_call_hello_answers_protocol_version(client):
    """`hello` answers ok and protocol version 2, as `brz serve` says it."""
    reply = await client.call(b"hello")
    assert reply.args == (b"ok", b"2")


@pytest_twisted.ensureDeferred
async def test_connections_add_nothing_to_the_log_of_the_program(brz_serve):
    """Connecting, calling and closing log no factory start and stop lines in a service embedding the client."""
    with logged_events(lambda event: True) as events:
        client = SmartClient.from_url(brz_serve.url)
        try:
            assert (await client.call(b"hello")).args == (b"ok", b"2")
        finally:
            await client.close()
    assert [formatEvent(event) for event in events] == []


@pytest_twisted.ensureDeferred
async def test_call_put_then_get_returns_the_bytes(client, workdir):
    """Bytes written with `put` come back from `get` and are on disk."""
    path, remote = workdir
    data = bytes(range(256)) * 100
    assert (await client.call(b"put", f"{remote}/file".encode(), b"", body=data)).args == (b"ok",)
    reply = await client.call(b"get", f"{remote}/file".encode())
    assert reply == (( b"ok",), data)
    assert (path / "file").read_bytes() == data


@pytest_twisted.ensureDeferred
async def test_call_requests_after_one_larger_than_the_socket_takes_arrive_in_order(client, workdir):
    """A request the socket cannot take at once, and small ones after it on the same connection, reach the server whole and in order."""
    path, remote = workdir
    big = bytes(range(256)) * (32 * 1024)  # 8 MiB, more than a loopback socket buffer
    assert (await client.call(b"put", f"{remote}/big".encode(), b"", body=big)).args == (b"ok",)
    for index in range(3):
        await client.call(b"put", f"{remote}/small{index}".encode(), b"", body=b"small %d" % index)
        assert (await client.call(b"get", f"{remote}/small{index}".encode())).body == b"small %d" % index
    assert (path / "big").read_bytes() == big
    assert client.stats.resends == client.stats.probe_reconnects == 0


@pytest_twisted.ensureDeferred
async def test_get_of_a_file_over_the_clients_limit_is_too_large_or_taken_with_on_chunk(brz_serve, workdir):
    """`brz serve` answers a `get` with the whole file as one body part: past the client's limit that is
    ResponseTooLarge, not resent, and ``on_chunk`` takes the file whole in pieces."""
    path, remote = workdir
    data = bytes(range(256)) * 1200  # 300 KiB in one part
    (path / "large").write_bytes(data)
    client = SmartClient.from_url(brz_serve.url, limits=Limits(max_body_part_size=64 * 1024))
    try:
        with pytest.raises(ResponseTooLarge):
            await client.call(b"get", f"{remote}/large".encode())
        chunks = []
        reply = await client.call(b"get", f"{remote}/large".encode(), on_chunk=chunks.append)
        assert reply.args == (b"ok",) and b"".join(chunks) == data
        assert client.stats.resends == 0
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_call_put_with_body_stream_sends_every_part(client, workdir):
    """A request body given as a stream of parts arrives whole."""
    path, remote = workdir
    parts = [b"first ", b"second ", b"third"]
    await client.call(b"put", f"{remote}/streamed".encode(), b"", body_stream=lambda: iter(parts))
    assert (path / "streamed").read_bytes() == b"".join(parts)


@pytest_twisted.ensureDeferred
async def test_call_append_adds_bytes_and_reports_offset(client, workdir):
    """`append` adds at the end and answers the offset it wrote at."""
    path, remote = workdir
    (path / "log").write_bytes(b"12345")
    reply = await client.call(b"append", f"{remote}/log".encode(), b"", body=b"678")
    assert reply.args == (b"appended", b"5")
    assert (path / "log").read_bytes() == b"12345678"


@pytest_twisted.ensureDeferred
async def test_call_readv_returns_requested_ranges(client, workdir):
    """`readv` returns the concatenated ranges asked for in its body."""
    path, remote = workdir
    (path / "data").write_bytes(b"0123456789abcdef")
    reply = await client.call(b"readv", f"{remote}/data".encode(), body=b"0,3\n10,4")
    assert reply == ((b"readv",), b"012abcd")


@pytest_twisted.ensureDeferred
async def test_call_stat_has_list_dir_describe_files(client, workdir):
    """`stat`, `has` and `list_dir` report what is on disk."""
    path, remote = workdir
    (path / "a").write_bytes(b"xyz")
    (path / "b").write_bytes(b"")
    stat = await client.call(b"stat", f"{remote}/a".encode())
    assert stat.args[:2] == (b"stat", b"3")
    assert (await client.call(b"has", f"{remote}/a".encode())).args == (b"yes",)
    assert (await client.call(b"has", f"{remote}/zzz".encode())).args == (b"no",)
    listing = await client.call(b"list_dir", remote.encode())
    assert listing.args[0] == b"names" and sorted(listing.args[1:]) == [b"a", b"b"]


@pytest_twisted.ensureDeferred
async def test_call_remote_errors_raise_classes_with_error_tuple(client, workdir):
    """Error responses raise the matching RemoteError subclass carrying the tuple."""
    path, remote = workdir
    with pytest.raises(NoSuchFile) as missing:
        await client.call(b"get", f"{remote}/missing".encode())
    assert missing.value.error_args[0] == b"NoSuchFile"
    assert missing.value.verb == b"get"
    await client.call(b"mkdir", f"{remote}/dir".encode(), b"")
    with pytest.raises(FileExists):
        await client.call(b"mkdir", f"{remote}/dir".encode(), b"")
    with pytest.raises(ReadError):
        await client.call(b"get", f"{remote}/dir".encode())
    with pytest.raises(UnknownMethod) as unknown:
        await client.call(b"No.such_verb")
    assert isinstance(unknown.value, RemoteError)
    assert unknown.value.error_args == (b"UnknownMethod", b"No.such_verb")
    assert (await client.call(b"hello")).args[0] == b"ok"


@pytest.fixture
def branch(sample_branch, workdir):
    """A real 2a branch with three revisions under the served root."""
    path, remote = workdir
    return copy_branch(sample_branch, path / "branch"), remote + "/branch/"


@pytest_twisted.ensureDeferred
async def test_call_get_stream_streams_a_decodable_branch(client, branch, brz_serve):
    """Repository.get_stream_1.19 of a real branch streams every revision brz reports."""
    tree, remote = branch
    revisions = await streamed_revisions(client, remote.encode())
    assert len(revisions) == int(brz_serve.brz("revno", tree).strip()) == 3
    last = await client.call(b"Branch.last_revision_info", remote.encode())
    assert last.args[:2] == (b"ok", b"3")


@pytest_twisted.ensureDeferred
async def test_pool_spreads_concurrent_calls_over_n_connections(relay, workdir):
    """Nine concurrent calls on a pool of three use exactly three connections to the server."""
    from twisted.internet.defer import gatherResults

    path, remote = workdir
    (path / "f").write_bytes(b"pooled")
    client = SmartClient.from_url(relay.url, pool_size=3)
    try:
        replies = await gatherResults([client.call(b"get", f"{remote}/f".encode()) for _ in range(9)])
    finally:
        await client.close()
    assert [reply.body for reply in replies] == [b"pooled"] * 9
    assert relay.connections == 3

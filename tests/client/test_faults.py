"""The resend rule, end to end: the client, a fault-injecting relay, a real `brz serve`.

Each test breaks a connection at one failure point and checks that the
client did what DESIGN.md's table says, and what ended up on disk.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from smartserve.client import (
    NoSuchFile,
    OutcomeUnknown,
    ResponseNeverReceived,
    RetryPolicy,
    SmartClient,
)

from support import wait_until

FAST = RetryPolicy(backoff_initial=0.01, backoff_max=0.05, deadline=10.0)


@pytest.fixture
def journal(workdir):
    """An empty file under the served root: (its path on disk, its path on the server)."""
    path, remote = workdir
    (path / "log").write_bytes(b"")
    return path / "log", f"{remote}/log".encode()


@pytest.fixture
def make_client(relay):
    clients = []

    def make(policy=FAST, **kwargs):
        client = SmartClient.from_url(relay.url, policy=policy, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        pytest_twisted.blockon(client.close())


@pytest_twisted.ensureDeferred
async def test_probe_reconnects_when_server_closed_between_requests(make_client, relay, journal):
    """A connection closed while idle is replaced before writing: no failure, no resend, one append."""
    log, remote_log = journal
    client = make_client()
    await client.call(b"hello")
    await relay.close_all()
    reply = await client.call(b"append", remote_log, b"", body=b"once\n")
    assert reply.args == (b"appended", b"0")
    assert log.read_bytes() == b"once\n"
    assert client.stats.probe_reconnects == 1
    assert client.stats.resends == 0
    assert relay.connections == 2


async def _parts(stall):
    """An async body stream of two parts; with ``stall``, the second never comes."""
    yield b"x" * 100
    if stall:
        await Deferred()
    yield b"y" * 100


def _stalling_first_time():
    """A replayable body stream whose first attempt stalls after its first part."""
    attempts = []

    def open_stream():
        attempts.append(None)
        return _parts(stall=len(attempts) == 1)

    return open_stream


@pytest_twisted.ensureDeferred
async def test_append_cut_during_write_is_resent_and_applied_once(make_client, relay, workdir):
    """A request cut while its body is still being written is resent, even `append`, and lands once."""
    path, remote = workdir
    (path / "log").write_bytes(b"start\n")
    client = make_client()
    await client.call(b"hello")
    relay.cut_client_to_server = 60
    reply = await client.call(b"append", f"{remote}/log".encode(), b"", body_stream=_stalling_first_time())
    assert reply.args == (b"appended", b"6")
    assert (path / "log").read_bytes() == b"start\n" + b"x" * 100 + b"y" * 100
    assert relay.cuts == 1
    assert client.stats.resends == 1


@pytest_twisted.ensureDeferred
async def test_append_with_whole_body_handed_to_transport_is_not_resent(make_client, relay, journal):
    """A bytes body is written to the transport at once, so a cut after that counts as after write."""
    log, remote_log = journal
    client = make_client()
    await client.call(b"hello")
    relay.cut_client_to_server = 60
    with pytest.raises(OutcomeUnknown):
        await client.call(b"append", remote_log, b"", body=b"x" * 200)
    assert log.read_bytes() == b""


@pytest_twisted.ensureDeferred
async def test_one_shot_stream_cut_during_write_is_not_resent(make_client, relay, journal):
    """A one-shot body stream already read from cannot be resent; the server applied nothing."""
    from smartserve.client import RequestTransmissionFailed

    log, remote_log = journal
    client = make_client()
    await client.call(b"hello")
    relay.cut_client_to_server = 60
    with pytest.raises(RequestTransmissionFailed) as raised:
        await client.call(b"append", remote_log, b"", body_stream=_parts(stall=True))
    assert raised.value.why_not_resent == "its one-shot body stream was already read"
    assert log.read_bytes() == b""


@pytest_twisted.ensureDeferred
async def test_append_lost_after_write_is_outcome_unknown_and_not_resent(make_client, relay, journal):
    """`append` lost after it was sent raises OutcomeUnknown naming the verb, and is applied once."""
    log, remote_log = journal
    client = make_client()
    await client.call(b"hello")
    relay.cut_server_to_client = 0
    with pytest.raises(OutcomeUnknown) as raised:
        await client.call(b"append", remote_log, b"", body=b"one\n")
    assert raised.value.verb == b"append"
    assert "append" in str(raised.value)
    assert isinstance(raised.value.cause, ResponseNeverReceived)
    assert client.stats.resends == 0
    assert (await client.call(b"get", remote_log)).body == b"one\n"


@pytest_twisted.ensureDeferred
async def test_append_lost_during_response_is_outcome_unknown(make_client, relay, journal):
    """`append` whose response is cut halfway is not resent: OutcomeUnknown, one append on disk."""
    log, remote_log = journal
    client = make_client()
    await client.call(b"hello")
    relay.cut_server_to_client = 20
    with pytest.raises(OutcomeUnknown) as raised:
        await client.call(b"append", remote_log, b"", body=b"one\n")
    assert raised.value.cause.point.value == "during response"
    assert log.read_bytes() == b"one\n"


@pytest_twisted.ensureDeferred
async def test_mkdir_lost_after_write_is_outcome_unknown(make_client, relay, workdir):
    """A semivfs verb (`mkdir`) lost after it was sent is not resent."""
    path, remote = workdir
    client = make_client()
    await client.call(b"hello")
    relay.cut_server_to_client = 0
    with pytest.raises(OutcomeUnknown) as raised:
        await client.call(b"mkdir", f"{remote}/dir".encode(), b"")
    assert raised.value.verb == b"mkdir"
    assert (path / "dir").is_dir()
    assert client.stats.resends == 0


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("cut", [0, 30])
async def test_get_lost_after_write_or_during_response_is_resent(make_client, relay, workdir, cut):
    """A read verb lost after writing or mid-response is resent and succeeds."""
    path, remote = workdir
    (path / "data").write_bytes(b"d" * 1000)
    client = make_client()
    await client.call(b"hello")
    relay.cut_server_to_client = cut
    reply = await client.call(b"get", f"{remote}/data".encode())
    assert reply == ((b"ok",), b"d" * 1000)
    assert client.stats.resends == 1
    assert relay.cuts == 1


@pytest_twisted.ensureDeferred
async def test_put_lost_after_write_is_resent(make_client, relay, workdir):
    """An idem verb (`put`) lost after it was sent is resent; the file holds the bytes once."""
    path, remote = workdir
    client = make_client()
    await client.call(b"hello")
    relay.cut_server_to_client = 0
    reply = await client.call(b"put", f"{remote}/file".encode(), b"", body=b"content")
    assert reply.args == (b"ok",)
    assert (path / "file").read_bytes() == b"content"
    assert client.stats.resends == 1


@pytest_twisted.ensureDeferred
async def test_resend_switched_off_raises_phase_error_for_read(make_client, relay, workdir):
    """With resending off, a lost read fails with the phase error, not OutcomeUnknown."""
    path, remote = workdir
    (path / "data").write_bytes(b"abc")
    client = make_client(RetryPolicy(resend=False, backoff_initial=0.01, deadline=10.0))
    await client.call(b"hello")
    relay.cut_server_to_client = 0
    with pytest.raises(ResponseNeverReceived) as raised:
        await client.call(b"get", f"{remote}/data".encode())
    assert raised.value.why_not_resent == "resending is switched off"
    assert client.stats.resends == 0


@pytest_twisted.ensureDeferred
async def test_silent_connection_times_out_and_read_is_resent(make_client, relay, workdir):
    """A connection that stops forwarding is abandoned after the request timeout; a read is resent."""
    path, remote = workdir
    (path / "data").write_bytes(b"abc")
    client = make_client(RetryPolicy(request_timeout=1.0, backoff_initial=0.01, deadline=10.0))
    await client.call(b"hello")
    relay.silence()
    reply = await client.call(b"get", f"{remote}/data".encode())
    assert reply.body == b"abc"
    assert client.stats.resends == 1
    assert relay.swallowed > 0


@pytest_twisted.ensureDeferred
async def test_silent_connection_append_is_outcome_unknown(make_client, relay, journal):
    """An `append` that gets no answer before the timeout is OutcomeUnknown, never resent."""
    log, remote_log = journal
    client = make_client(RetryPolicy(request_timeout=1.0, backoff_initial=0.01, deadline=10.0))
    await client.call(b"hello")
    relay.silence()
    with pytest.raises(OutcomeUnknown) as raised:
        await client.call(b"append", remote_log, b"", body=b"one\n")
    assert "no response within" in raised.value.cause.reason
    assert log.read_bytes() == b""


@pytest_twisted.ensureDeferred
async def test_keepalive_drops_a_silently_dead_connection(make_client, relay, workdir):
    """An idle connection that stopped forwarding is dropped by the keepalive, so the next call needs no resend."""
    path, remote = workdir
    client = make_client(RetryPolicy(keepalive_interval=0.5, backoff_initial=0.01, deadline=10.0))
    await client.call(b"hello")
    relay.silence()
    await wait_until(lambda: client.stats.keepalive_drops == 1, 5.0, "the keepalive to drop the connection")
    with pytest.raises(NoSuchFile):
        await client.call(b"get", f"{remote}/missing".encode())
    assert client.stats.resends == 0
    assert relay.connections == 2

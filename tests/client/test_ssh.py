"""The client over bzr+ssh:// against a real OpenSSH `sshd` running `brz serve --inet`."""

from __future__ import annotations

import pytest
import pytest_twisted

from smartserve.client import HostKeyError, LoginRefused, NoSuchFile, RetryPolicy, SmartClient, SSHOptions

from support import make_key_pair

from .conftest import FaultRelay, copy_branch, streamed_revisions

FAST = RetryPolicy(backoff_initial=0.01, deadline=30.0)


def ssh_client(openssh, **options) -> SmartClient:
    options.setdefault("identity_files", [str(openssh.client_key)])
    options.setdefault("known_hosts", str(openssh.known_hosts))
    options.setdefault("use_agent", False)
    return SmartClient.from_url(openssh.url(), policy=FAST, ssh=SSHOptions(**options))


@pytest_twisted.ensureDeferred
async def test_ssh_vfs_verbs_against_brz_serve_behind_sshd(openssh, tmp_path):
    """hello, put, append, get, readv, stat, has and list_dir work over bzr+ssh://."""
    client = ssh_client(openssh)
    try:
        base = str(tmp_path)
        assert (await client.call(b"hello")).args == (b"ok", b"2")
        await client.call(b"put", f"{base}/file".encode(), b"", body=b"0123456789")
        assert (await client.call(b"append", f"{base}/file".encode(), b"", body=b"ab")).args == (b"appended", b"10")
        assert (await client.call(b"get", f"{base}/file".encode())).body == b"0123456789ab"
        assert (await client.call(b"readv", f"{base}/file".encode(), body=b"1,2\n10,2")).body == b"12ab"
        assert (await client.call(b"stat", f"{base}/file".encode())).args[:2] == (b"stat", b"12")
        assert (await client.call(b"has", f"{base}/file".encode())).args == (b"yes",)
        assert (await client.call(b"list_dir", base.encode())).args == (b"names", b"file")
        with pytest.raises(NoSuchFile):
            await client.call(b"get", f"{base}/missing".encode())
        assert (tmp_path / "file").read_bytes() == b"0123456789ab"
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_ssh_get_stream_of_a_real_branch(openssh, sample_branch, tmp_path):
    """Repository.get_stream_1.19 over bzr+ssh:// streams every revision of a real branch."""
    tree = copy_branch(sample_branch, tmp_path / "branch")
    client = ssh_client(openssh)
    try:
        assert len(await streamed_revisions(client, f"{tree}/".encode())) == 3
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_ssh_refused_key_fails_at_once_naming_the_login(openssh, tmp_path):
    """A key the server does not accept fails the call with LoginRefused on the first attempt: trying again cannot help."""
    stranger = tmp_path / "stranger"
    make_key_pair(stranger)
    options = SSHOptions(identity_files=[str(stranger)], known_hosts=str(openssh.known_hosts), use_agent=False)
    policy = RetryPolicy(backoff_initial=0.01, max_connect_attempts=5, deadline=30.0)
    client = SmartClient.from_url(openssh.url(), policy=policy, ssh=options)
    try:
        with pytest.raises(LoginRefused) as raised:
            await client.call(b"hello")
    finally:
        await client.close()
    assert f"could not log in to 127.0.0.1:{openssh.port} as 'root': the server refused the keys offered" in str(
        raised.value
    )
    assert client.stats.connect_failures == 0


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("cut_after", [100, 2000])
async def test_ssh_connection_lost_during_the_handshake_is_tried_again(openssh, tmp_path, cut_after):
    """An SSH connection cut during key exchange or login (a server restarting) is a failed attempt, made again."""
    relay = FaultRelay(openssh.port).listen()
    relay.cut_server_to_client = cut_after
    port = relay.port.getHost().port
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(openssh.known_hosts.read_text().replace(f"]:{openssh.port} ", f"]:{port} "))
    options = SSHOptions(identity_files=[str(openssh.client_key)], known_hosts=str(known_hosts), use_agent=False)
    policy = RetryPolicy(backoff_initial=0.01, max_connect_attempts=3, deadline=30.0)
    client = SmartClient.from_url(f"bzr+ssh://root@127.0.0.1:{port}/", policy=policy, ssh=options)
    try:
        reply = await client.call(b"hello")
    finally:
        await client.close()
        relay.stop()
    assert reply.args[0] == b"ok"
    assert relay.cuts == 1
    assert client.stats.connect_failures == 1


@pytest_twisted.ensureDeferred
async def test_ssh_unknown_host_is_refused_unless_trusted_on_first_use(openssh, tmp_path):
    """A host missing from known_hosts is a HostKeyError; trust on first use accepts and records it."""
    known = tmp_path / "known_hosts"
    known.write_text("")
    client = ssh_client(openssh, known_hosts=str(known))
    try:
        with pytest.raises(HostKeyError) as raised:
            await client.call(b"hello")
        assert "not in" in str(raised.value)
    finally:
        await client.close()
    trusting = ssh_client(openssh, known_hosts=str(known), trust_on_first_use=True)
    try:
        assert (await trusting.call(b"hello")).args[0] == b"ok"
    finally:
        await trusting.close()
    assert known.read_text().strip()
    again = ssh_client(openssh, known_hosts=str(known))
    try:
        assert (await again.call(b"hello")).args[0] == b"ok"
    finally:
        await again.close()


@pytest_twisted.ensureDeferred
async def test_ssh_changed_host_key_is_refused_even_with_trust_on_first_use(openssh, tmp_path):
    """A known_hosts entry with another key fails with HostKeyError whatever the options."""
    other = (openssh.base / "other_key.pub").read_text().split()
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{openssh.port} {other[0]} {other[1]}\n")
    client = ssh_client(openssh, known_hosts=str(known), trust_on_first_use=True)
    try:
        with pytest.raises(HostKeyError) as raised:
            await client.call(b"hello")
        assert "does not match" in str(raised.value)
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("trust_on_first_use", [False, True])
async def test_ssh_known_hosts_that_cannot_be_read_is_a_host_key_error(openssh, tmp_path, trust_on_first_use):
    """A known_hosts that exists but cannot be read fails the call at once, and is never taken for an empty file that trust on first use could fill."""
    unreadable = tmp_path / "known_hosts"
    unreadable.mkdir()  # tests run as root, who can read any file: a folder is what open() refuses
    client = ssh_client(openssh, known_hosts=str(unreadable), trust_on_first_use=trust_on_first_use)
    try:
        with pytest.raises(HostKeyError) as raised:
            await client.call(b"hello")
    finally:
        await client.close()
    assert f"cannot read {unreadable}" in str(raised.value)
    assert client.stats.connect_failures == 0


@pytest_twisted.ensureDeferred
async def test_ssh_host_key_trusted_on_first_use_but_not_recorded_is_not_trusted(openssh):
    """When trust on first use cannot write the key down, the call fails naming the file, and the next connection does not trust the key either."""
    unwritable = "/proc/smartserve-test-known-hosts"  # a missing file nobody can create
    client = ssh_client(openssh, known_hosts=unwritable, trust_on_first_use=True)
    try:
        for _ in range(2):
            with pytest.raises(HostKeyError) as raised:
                await client.call(b"hello")
            assert f"cannot record the host key of 127.0.0.1:{openssh.port} in {unwritable}" in str(raised.value)
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_ssh_exit_status_75_resends_append_once(openssh, tmp_path):
    """A server command that exits 75 without answering makes the client resend, even `append`, once."""
    marker = tmp_path / "drained-once"
    log = tmp_path / "log"
    log.write_bytes(b"")
    command = (
        f"if [ -e {marker} ]; then exec bzr serve --inet --directory=/ --allow-writes; fi; "
        f"touch {marker}; head -c 30 >/dev/null; exit 75"
    )
    client = ssh_client(openssh, remote_command=command)
    try:
        reply = await client.call(b"append", f"{log}".encode(), b"", body=b"once\n")
        assert reply.args == (b"appended", b"0")
        assert log.read_bytes() == b"once\n"
        assert client.stats.resends == 1
        assert client.stats.outcome_unknown == 0
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_ssh_connection_dropped_mid_response_is_noticed_and_read_resent(openssh, tmp_path):
    """When the TCP connection under an SSH session drops in the middle of a response, the call does not hang: the get is resent on a new connection."""
    from twisted.internet import reactor

    from .conftest import FaultRelay

    relay = FaultRelay(openssh.port).listen()
    relay_port = relay.port.getHost().port
    host_key = (openssh.base / "host_key.pub").read_text().split()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{relay_port} {host_key[0]} {host_key[1]}\n")
    (tmp_path / "file").write_bytes(b"x" * 200_000)
    client = SmartClient.from_url(
        f"bzr+ssh://root@127.0.0.1:{relay_port}/",
        policy=RetryPolicy(backoff_initial=0.01, deadline=600.0),
        ssh=SSHOptions(identity_files=[str(openssh.client_key)], known_hosts=str(known_hosts), use_agent=False),
    )
    try:
        assert (await client.call(b"hello")).args == (b"ok", b"2")
        relay.cut_server_to_client = 50_000
        call = client.call(b"get", f"{tmp_path}/file".encode())
        reply = await call.addTimeout(30, reactor)
        assert reply.body == b"x" * 200_000
        assert relay.cuts == 1
        assert client.stats.resends == 1
    finally:
        await client.close()
        await relay.stop()


@pytest_twisted.ensureDeferred
async def test_ssh_connection_logs_nothing_unless_the_trace_is_on(openssh):
    """A connection's SSH steps stay out of the global log; show_ssh_trace(True) lets them through, as ssh -v."""
    from smartserve.client import show_ssh_trace
    from support import logged_events

    async def one_call():
        client = ssh_client(openssh)
        try:
            await client.call(b"hello")
        finally:
            await client.close()

    with logged_events(lambda event: True) as quiet:
        await one_call()
    show_ssh_trace(True)
    try:
        with logged_events(lambda event: True) as traced:
            await one_call()
    finally:
        show_ssh_trace(False)
    assert [event.get("log_namespace") for event in quiet] == []
    namespaces = {event.get("log_namespace") for event in traced}
    assert {"smartserve.client._ssh._ClientTransport", "smartserve.client._ssh._UserAuth"} <= namespaces
    assert any("NEW KEYS" in str(event.get("log_format")) for event in traced)


@pytest.fixture
def ssh_agent(tmp_path, monkeypatch):
    """A real ssh-agent on a socket of its own, as SSH_AUTH_SOCK; yields a function that adds a key file to it."""
    import subprocess

    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        from support import wait_for

        wait_for(sock.exists, 10, "ssh-agent's socket")
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))

        def add(key_file) -> None:
            subprocess.run(["ssh-add", "-q", str(key_file)], check=True, env={"SSH_AUTH_SOCK": str(sock)})

        yield add
    finally:
        agent.terminate()
        agent.wait()


@pytest_twisted.ensureDeferred
async def test_ssh_agent_key_is_offered_after_the_identity_files(openssh, ssh_agent, tmp_path):
    """A refused identity file does not end the login: the agent's key is offered next, and logs in."""
    stranger = tmp_path / "stranger"
    make_key_pair(stranger)
    ssh_agent(openssh.client_key)
    client = ssh_client(openssh, identity_files=[str(stranger)], use_agent=True)
    try:
        assert (await client.call(b"hello")).args == (b"ok", b"2")
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_ssh_agent_without_a_key_the_server_takes_is_a_refused_login(openssh, ssh_agent, tmp_path):
    """With only the agent's keys, none of which the server takes, the call fails with LoginRefused."""
    stranger = tmp_path / "stranger"
    make_key_pair(stranger)
    ssh_agent(stranger)
    client = ssh_client(openssh, identity_files=[], use_agent=True)
    try:
        with pytest.raises(LoginRefused):
            await client.call(b"hello")
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_ssh_trust_on_first_use_records_the_host_under_its_port_as_openssh_does(openssh, tmp_path):
    """A port-22 entry for the same address is another server; the key trusted is written as [host]:port, which ssh accepts."""
    import subprocess

    other = (openssh.base / "other_key.pub").read_text().split()
    known = tmp_path / "known_hosts"
    known.write_text(f"127.0.0.1 {other[0]} {other[1]}\n")
    client = ssh_client(openssh, known_hosts=str(known), trust_on_first_use=True)
    try:
        assert (await client.call(b"hello")).args[0] == b"ok"
    finally:
        await client.close()
    found = subprocess.run(["ssh-keygen", "-F", f"[127.0.0.1]:{openssh.port}", "-f", str(known)], capture_output=True)
    assert found.returncode == 0, known.read_text()
    assert known.read_text().startswith(f"127.0.0.1 {other[0]} {other[1]}\n")
    login = subprocess.run(
        ["ssh", "-F", "/dev/null", "-i", str(openssh.client_key), "-o", "IdentitiesOnly=yes",
         "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
         "-p", str(openssh.port), "root@127.0.0.1", "true"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert login.returncode == 0, login.stderr


@pytest_twisted.ensureDeferred
async def test_ssh_disconnect_for_too_many_refused_keys_is_a_refused_login(openssh, tmp_path):
    """sshd's MaxAuthTries (6) ends the login with a protocol-error disconnect: LoginRefused at once, not a retry."""
    strangers = [tmp_path / f"stranger{n}" for n in range(8)]
    for key in strangers:
        make_key_pair(key)
    client = ssh_client(openssh, identity_files=[str(key) for key in strangers])
    try:
        with pytest.raises(LoginRefused) as raised:
            await client.call(b"hello")
    finally:
        await client.close()
    assert "Too many authentication failures" in str(raised.value)
    assert client.stats.connect_failures == 0


@pytest_twisted.ensureDeferred
async def test_ssh_channel_output_ended_makes_the_probe_reconnect(openssh, tmp_path):
    """A command that ended its output while the channel stays open (a wrapper that outlives `bzr serve`) gets no request."""
    from support import wait_until

    journal = tmp_path / "journal"
    journal.write_bytes(b"")
    lingering = "sh -c 'bzr serve --inet --directory=/ --allow-writes --client-timeout=1; exec >&- 2>&-; sleep 3'"
    client = ssh_client(openssh, remote_command=lingering)
    try:
        await client.call(b"hello")
        first = client._pool._entries[0].protocol
        await wait_until(lambda: first.closed_reason() is not None, 15, "the command's output to end")
        assert not first.is_closed
        reply = await client.call(b"append", str(journal).encode(), b"", body=b"once\n")
    finally:
        await client.close()
    assert reply.args == (b"appended", b"0")
    assert journal.read_bytes() == b"once\n"
    assert (client.stats.probe_reconnects, client.stats.resends) == (1, 0)


def _authorized_rsa_key(openssh, tmp_path):
    key = tmp_path / "id_rsa"
    make_key_pair(key, "rsa")
    authorized = openssh.base / "authorized_keys"
    authorized.write_text(authorized.read_text() + key.with_suffix(".pub").read_text())
    return key


@pytest_twisted.ensureDeferred
async def test_ssh_rsa_key_logs_in_with_sha2_signatures(openssh, tmp_path):
    """OpenSSH refuses ssh-rsa (SHA-1) signatures; an RSA key file logs in with rsa-sha2 as OpenSSH's client does."""
    key = _authorized_rsa_key(openssh, tmp_path)
    client = ssh_client(openssh, identity_files=[str(key)])
    try:
        assert (await client.call(b"hello")).args[0] == b"ok"
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_ssh_rsa_key_in_the_agent_logs_in_with_sha2_signatures(openssh, ssh_agent, tmp_path):
    """The agent is asked for an rsa-sha2 signature for an RSA key."""
    ssh_agent(_authorized_rsa_key(openssh, tmp_path))
    client = ssh_client(openssh, identity_files=[], use_agent=True)
    try:
        assert (await client.call(b"hello")).args[0] == b"ok"
    finally:
        await client.close()


def test_ssh_login_never_answers_a_password_or_keyboard_prompt():
    """A server offering only password and keyboard-interactive gets a disconnect (a refused login), no request."""
    from twisted.conch.ssh.common import NS
    from twisted.conch.ssh.connection import SSHConnection
    from twisted.conch.ssh.transport import DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE

    from smartserve.client._ssh import _UserAuth

    class Transport:
        peerExtensions: dict = {}

        def __init__(self):
            self.packets, self.disconnects = [], []

        def sendPacket(self, kind, payload):
            self.packets.append((kind, payload))

        def sendDisconnect(self, reason, description):
            self.disconnects.append(reason)

    auth = _UserAuth(b"alice", SSHConnection(), keys=[], agent=None)
    auth.transport = Transport()
    auth.lastAuth, auth.authenticatedWith, auth.triedPublicKeys = b"none", [], []
    auth.ssh_USERAUTH_FAILURE(NS(b"password,keyboard-interactive") + b"\x00")
    assert auth.transport.packets == []
    assert auth.transport.disconnects == [DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE]


@pytest_twisted.ensureDeferred
async def test_ssh_connect_and_first_call_take_six_round_trips(openssh, tmp_path):
    """A new connection logs in with one signed key and sends its first request with the exec request.

    Counted as the flights of data towards the server through a relay:
    version and key exchange (2), the service request (1), one signed key
    (1), the channel (1), the exec request with the call (1). Without
    asking for ``none`` first, asking whether the key would do, and
    waiting for the exec's answer, it takes three more. One more is
    allowed for the server's version and key exchange arriving between
    the client's.
    """
    relay = FaultRelay(openssh.port).listen()
    port = relay.port.getHost().port
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(openssh.known_hosts.read_text().replace(f"]:{openssh.port} ", f"]:{port} "))
    options = SSHOptions(identity_files=[str(openssh.client_key)], known_hosts=str(known_hosts), use_agent=False)
    client = SmartClient.from_url(f"bzr+ssh://root@127.0.0.1:{port}/", policy=FAST, ssh=options)
    try:
        reply = await client.call(b"hello")
        towards_server = relay.flights.count("to server")
    finally:
        await client.close()
        relay.stop()
    assert reply.args[0] == b"ok"
    assert towards_server <= 7, relay.flights


@pytest_twisted.ensureDeferred
async def test_ssh_command_refused_by_the_server_fails_the_call_as_never_sent(tmp_path, monkeypatch):
    """A server that refuses the exec request, answered after the first request went with it, never ran that request.

    So an append is not "outcome unknown" but a request not sent, tried
    on new connections as the policy allows, and the error names the
    refused command.
    """
    from smartserve.client import RequestNotSent
    from smartserve.ssh._session import SessionChannel

    from ssh.conftest import SSHServerUnderTest

    refused = []
    monkeypatch.setattr(SessionChannel, "request_exec", lambda channel, data: refused.append(data) or 0)
    server = SSHServerUnderTest(tmp_path)
    key = make_key_pair(tmp_path / "client_key")
    server.authorize("alice", key.with_suffix(".pub"))
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{server.port_number} {server.host_public_key}\n")
    options = SSHOptions(identity_files=[str(key)], known_hosts=str(known_hosts), use_agent=False)
    policy = RetryPolicy(backoff_initial=0.01, max_resends=2, deadline=30.0)
    client = SmartClient.from_url(f"bzr+ssh://alice@127.0.0.1:{server.port_number}/", policy=policy, ssh=options)
    try:
        with pytest.raises(RequestNotSent) as raised:
            await client.call(b"append", b"/journal", b"", body=b"one line\n")
    finally:
        await client.close()
        await server.stopped()
    assert "refused to run 'bzr serve --inet --directory=/ --allow-writes'" in str(raised.value)
    assert len(refused) == 3  # the first attempt and two resends
    assert not (server.root / "journal").exists()


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]"])
def test_ssh_connect_to_an_address_uses_the_connect_timeout_and_no_name_lookup(tmp_path, host):
    """An SSH connection's TCP connect is bounded by the policy's connect_timeout, as a bzr:// one is, and an IP address is connected to directly, not looked up in a thread."""
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    options = SSHOptions(known_hosts=str(tmp_path / "known_hosts"), use_agent=False)
    client = SmartClient.from_url(
        f"bzr+ssh://alice@{host}:2222/", reactor=reactor, policy=RetryPolicy(connect_timeout=2.5), ssh=options
    )
    client.call(b"hello")
    connected = reactor.tcpClients
    assert [(where, port, timeout) for where, port, _, timeout, _ in connected] == [(host.strip("[]"), 2222, 2.5)]

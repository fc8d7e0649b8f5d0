"""The SSH front end against the real OpenSSH client: who gets in, and what is refused."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

from smartserve.protocol import (
    NEED_DATA,
    PAUSED,
    Connection,
    EndOfMessage,
    Request,
    Response,
    Role,
)

from support import free_port

from .conftest import SSH, make_user_key, needs_openssh

pytestmark = [needs_openssh, pytest.mark.timeout(60)]

SERVE = "bzr serve --inet --directory=/ --allow-writes"


@pytest_twisted.ensureDeferred
async def test_shell_refused_with_message(ssh_client):
    """Asking for a shell gets one line on stderr and a non-zero exit status."""
    out, err, code = await ssh_client.ssh("alice")
    assert code == 1
    assert b"no shell here" in err
    assert out == b""


@pytest_twisted.ensureDeferred
async def test_forced_pty_refused(ssh_client):
    """``ssh -tt`` is refused a terminal, which OpenSSH treats as fatal when forced."""
    out, err, code = await ssh_client.ssh("alice", options=["-tt"])
    assert code == 255
    assert b"PTY allocation request failed" in err


@pytest_twisted.ensureDeferred
async def test_other_command_refused(ssh_client):
    """``ssh host ls`` is refused with a message naming what the server runs."""
    out, err, code = await ssh_client.ssh("alice", "ls", "/")
    assert code == 1
    assert b"only runs the Breezy smart server" in err


@pytest_twisted.ensureDeferred
async def test_subsystem_refused(ssh_client):
    """An sftp subsystem request is refused with a message."""
    out, err, code = await ssh_client.ssh("alice", "sftp", options=["-s"])
    assert code == 1
    assert b"no subsystems here" in err


@pytest_twisted.ensureDeferred
async def test_remote_port_forward_refused(ssh_client):
    """A ``-R`` forward request is refused, so ssh exits when it must succeed."""
    out, err, code = await ssh_client.ssh(
        "alice", options=["-N", "-R", "0:127.0.0.1:9", "-o", "ExitOnForwardFailure=yes"]
    )
    assert code == 255
    assert b"remote port forwarding failed" in err


class _Collect(ProcessProtocol):
    """Collects a process's stderr and fires ``ended`` with its exit code."""

    def __init__(self, watch_for: bytes = b""):
        self.err = b""
        self.out = b""
        self.ended: Deferred = Deferred()
        self.seen: Deferred = Deferred()
        self.watch_for = watch_for

    def outReceived(self, data: bytes) -> None:
        self.out += data
        self._check()

    def errReceived(self, data: bytes) -> None:
        self.err += data
        self._check()

    def _check(self) -> None:
        if self.watch_for and self.watch_for in self.out + self.err and not self.seen.called:
            self.seen.callback(None)

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value.exitCode)


@pytest_twisted.ensureDeferred
async def test_local_port_forward_refused(ssh_client):
    """A connection through ``-L`` is refused by the server: the channel never opens."""
    local_port = free_port()
    watcher = _Collect(watch_for=b"open failed")
    args = ssh_client.argv("alice", options=["-N", "-L", f"{local_port}:127.0.0.1:9"])
    process = reactor.spawnProcess(watcher, SSH, [SSH, *args], env=ssh_client.env)
    try:
        await _until_channel_refused(local_port, watcher)
        assert b"open failed: unknown channel type" in watcher.err
    finally:
        process.signalProcess("TERM")
        await watcher.ended


async def _until_channel_refused(port: int, watcher: _Collect) -> None:
    """Connect to ssh's forward on ``port`` until ssh reports the refused channel; fail after a bounded time.

    Each connection that reaches ssh's listener asks the server for a
    channel; one made before ssh listens, or one ssh drops before asking,
    is simply made again, so a lost probe cannot leave the test waiting.
    """
    from twisted.internet.task import deferLater

    for _ in range(400):
        if watcher.seen.called:
            return
        if watcher.ended.called:
            raise AssertionError(f"ssh exited: {watcher.err!r}")
        with socket.socket() as probe:
            probe.connect_ex(("127.0.0.1", port))
        await deferLater(reactor, 0.025, lambda: None)
    raise AssertionError(f"ssh never reported the refused channel: {watcher.err!r}")


@pytest_twisted.ensureDeferred
async def test_unknown_key_refused(ssh_client, tmp_path):
    """A key that is in no user's file does not log in."""
    stranger = make_user_key(tmp_path / "stranger", "id_ed25519")
    out, err, code = await ssh_client.ssh("alice", SERVE, key=stranger)
    assert code == 255
    assert b"Permission denied (publickey)" in err


@pytest_twisted.ensureDeferred
async def test_known_key_under_other_user_refused(ssh_client, tmp_path):
    """Alice's key does not log in as bob, even though bob exists."""
    bob_key = make_user_key(tmp_path / "bob", "id_ed25519")
    ssh_client.server.authorize("bob", bob_key.with_suffix(".pub"))
    out, err, code = await ssh_client.ssh("bob", SERVE)
    assert code == 255
    assert b"Permission denied (publickey)" in err


@pytest_twisted.ensureDeferred
async def test_only_publickey_offered(ssh_client, tmp_path):
    """The server offers public-key authentication only: no password, no keyboard-interactive."""
    stranger = make_user_key(tmp_path / "stranger", "id_ed25519")
    out, err, code = await ssh_client.ssh(
        "alice", "true", key=stranger, options=["-v", "-o", "PreferredAuthentications=password,keyboard-interactive,publickey"]
    )
    assert code == 255
    assert b"Authentications that can continue: publickey\n" in err.replace(b"\r", b"")
    assert b"password" not in err.split(b"Authentications that can continue:")[1].split(b"\n")[0]


@pytest_twisted.ensureDeferred
async def test_key_added_later_is_picked_up(ssh_client, tmp_path):
    """A key written to the keys folder while the server runs logs in without a restart."""
    carol_key = make_user_key(tmp_path / "carol", "id_ed25519")
    out, err, code = await ssh_client.ssh("carol", "ls", key=carol_key)
    assert b"Permission denied" in err
    ssh_client.server.authorize("carol", carol_key.with_suffix(".pub"))
    out, err, code = await ssh_client.ssh("carol", "ls", key=carol_key)
    assert code == 1 and b"only runs the Breezy smart server" in err


@pytest.mark.parametrize(
    "option, message",
    [
        ("Ciphers=aes128-cbc", b"no matching cipher found"),
        ("HostKeyAlgorithms=ssh-rsa", b"no matching host key type found"),
        ("KexAlgorithms=diffie-hellman-group14-sha1", b"no matching key exchange method found"),
        ("MACs=hmac-sha1", b"no matching MAC found"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_legacy_algorithm_refused(ssh_client, option, message):
    """A client limited to CBC, SHA-1 ``ssh-rsa`` host signatures, SHA-1 DH or a SHA-1 MAC cannot connect."""
    out, err, code = await ssh_client.ssh("alice", SERVE, options=["-o", option])
    assert code == 255
    assert message in err


@pytest_twisted.ensureDeferred
async def test_rsa_user_key_logs_in_with_sha2(ssh_client, tmp_path):
    """An RSA user key logs in, signing with rsa-sha2, since the server advertises it."""
    rsa_key = make_user_key(tmp_path / "dave", "id_rsa", kind="rsa")
    ssh_client.server.authorize("dave", rsa_key.with_suffix(".pub"))
    out, err, code = await ssh_client.ssh("dave", "ls", key=rsa_key)
    assert code == 1 and b"only runs the Breezy smart server" in err


class _SmartClient(ProcessProtocol):
    """Speaks the smart protocol to ``ssh ... bzr serve --inet`` through its pipes."""

    def __init__(self):
        self.codec = Connection(Role.CLIENT)
        self.events: list = []
        self.err = b""
        self.response: Deferred = Deferred()
        self.ended: Deferred = Deferred()

    def request(self, *args: bytes) -> Deferred:
        """Send a bodiless request; the Deferred fires with its ``Response``."""
        if self.events:
            self.codec.start_next_cycle()
        self.response = Deferred()
        self.transport.write(self.codec.send(Request(args)) + self.codec.send(EndOfMessage()))
        return self.response

    def outReceived(self, data: bytes) -> None:
        self.codec.receive_data(data)
        while (event := self.codec.next_event()) not in (NEED_DATA, PAUSED):
            self.events.append(event)
            if isinstance(event, EndOfMessage) and not self.response.called:
                self.response.callback(
                    next(e for e in reversed(self.events) if isinstance(e, Response))
                )

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value.exitCode)


def _spawn_smart_client(ssh_client, user: str = "alice", command: str = SERVE) -> _SmartClient:
    client = _SmartClient()
    args = [SSH, *ssh_client.argv(user, command)]
    reactor.spawnProcess(client, SSH, args, env=ssh_client.env)
    return client


@pytest_twisted.ensureDeferred
async def test_smart_session_answers_and_exits_zero(ssh_client):
    """A smart session answers ``hello`` and ends with exit status 0 when the client closes."""
    client = _spawn_smart_client(ssh_client)
    response = await client.request(b"hello")
    assert response.success and response.args[0] == b"ok"
    client.transport.closeStdin()
    assert await client.ended == 0
    assert client.err == b""


@pytest_twisted.ensureDeferred
async def test_drain_closes_session_with_tempfail(ssh_client):
    """Draining ends an idle smart session with exit status 75 and drops the connection."""
    client = _spawn_smart_client(ssh_client)
    await client.request(b"hello")
    server = ssh_client.server
    smart_drained = server.smart_factory.drain()
    ssh_drained = server.factory.drain()
    assert await client.ended == 75
    await smart_drained
    await ssh_drained
    assert not server.factory.connections


@pytest_twisted.ensureDeferred
async def test_drain_disconnects_connection_without_session(ssh_client):
    """Draining closes a logged-in connection that has no session at once."""
    server = ssh_client.server
    logged_in = Deferred()
    note_login = server.factory.connection_authenticated

    def authenticated(transport):
        note_login(transport)
        logged_in.callback(transport)

    server.factory.connection_authenticated = authenticated
    watcher = _Collect()
    args = [SSH, *ssh_client.argv("alice", options=["-N"])]
    reactor.spawnProcess(watcher, SSH, args, env=ssh_client.env)
    await logged_in
    await server.factory.drain()
    assert await watcher.ended == 255
    assert b"restarting" in watcher.err


@pytest_twisted.ensureDeferred
async def test_sessions_per_user_limit(tmp_path):
    """A user over the session limit has the extra session refused; others are unaffected."""
    from .conftest import SSHServerUnderTest

    server = SSHServerUnderTest(tmp_path, max_sessions_per_user=1)
    try:
        client = server.client_for("alice", tmp_path)
        first = _spawn_smart_client(client)
        await first.request(b"hello")
        out, err, code = await client.ssh("alice", SERVE)
        assert code == 255 and b"too many sessions" in err
        assert server.factory.refused_sessions == 1
        first.transport.closeStdin()
        assert await first.ended == 0
    finally:
        await server.stopped()


def test_ssh_factory_provides_idrainable(ssh_server):
    """The SSH factory is a drainable set of connections for the drain controller."""
    from zope.interface.verify import verifyObject

    from smartserve.server.interfaces import IDrainable

    assert verifyObject(IDrainable, ssh_server.factory)
    assert ssh_server.factory.client_connections == 0
    assert ssh_server.factory.busy_client_connections == 0


@pytest_twisted.ensureDeferred
async def test_rsa_user_key_with_sha1_signature_refused(ssh_client, tmp_path):
    """An RSA key that may only sign with SHA-1 ``ssh-rsa`` does not log in."""
    rsa_key = make_user_key(tmp_path / "erin", "id_rsa", kind="rsa")
    ssh_client.server.authorize("erin", rsa_key.with_suffix(".pub"))
    out, err, code = await ssh_client.ssh(
        "erin", "ls", key=rsa_key, options=["-o", "PubkeyAcceptedAlgorithms=ssh-rsa"]
    )
    assert code == 255
    assert b"Permission denied (publickey)" in err


def test_user_auth_refuses_sha1_and_dsa_signatures():
    """The user-auth service turns down ssh-rsa and ssh-dss signatures before any checker runs."""
    from twisted.conch.ssh.common import NS
    from twisted.cred.error import UnauthorizedLogin

    from smartserve.ssh._transport import UserAuthServer

    service = UserAuthServer()
    for algorithm in (b"ssh-rsa", b"ssh-dss"):
        failures = []
        packet = b"\x01" + NS(algorithm) + NS(b"blob") + NS(b"signature")
        service.auth_publickey(packet).addErrback(failures.append)
        assert failures and failures[0].check(UnauthorizedLogin), algorithm

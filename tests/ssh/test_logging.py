"""What the SSH front end writes to the twistd log: a line per session start and end,
one per failed login, none of Conch's per-connection trace unless asked for."""

from __future__ import annotations

import re
import socket
import subprocess

import pytest
import pytest_twisted
from twisted.conch.ssh.keys import Key
from twisted.internet import defer, threads
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from smartserve.metrics import ServerMetrics
from smartserve.ssh import show_conch_trace
from smartserve.ssh._hostkeys import fingerprint

from support import wait_for

from .conftest import SSH, SSH_KEYGEN, make_user_key, needs_openssh
from .test_openssh import SERVE, _spawn_smart_client

pytestmark = [needs_openssh, pytest.mark.timeout(60)]


class _Events:
    """The events of SSH namespaces logged while a test runs; ``first`` waits for one."""

    def __init__(self):
        self.events: list[dict] = []
        self._waiting: list = []

    def __call__(self, event: dict) -> None:
        namespace = event.get("log_namespace", "")
        if not namespace.startswith(("smartserve.ssh", "twisted.conch")):
            return
        self.events.append(event)
        for match, found in list(self._waiting):
            if match(event):
                self._waiting.remove((match, found))
                found.callback(event)

    def first(self, text: str) -> defer.Deferred:
        """The first event whose text contains ``text``: one already logged, or the next."""
        match = lambda event: text in formatEvent(event)  # noqa: E731
        for event in self.events:
            if match(event):
                return defer.succeed(event)
        found = defer.Deferred()
        self._waiting.append((match, found))
        return found

    def texts(self, below: LogLevel = LogLevel.warn) -> list[str]:
        """The text of every event under level ``below``."""
        return [formatEvent(event) for event in self.events if event["log_level"] < below]


@pytest.fixture
def ssh_events():
    events = _Events()
    globalLogPublisher.addObserver(events)
    yield events
    globalLogPublisher.removeObserver(events)
    show_conch_trace(False)


async def _one_session(ssh_client) -> None:
    """A smart session over the real ssh: hello, then the client closes; returns once the connection is gone."""
    client = _spawn_smart_client(ssh_client)
    assert (await client.request(b"hello")).success
    client.transport.closeStdin()
    assert await client.ended == 0
    await ssh_client.server.factory.wait_closed()


@pytest_twisted.ensureDeferred
async def test_session_writes_two_lines(ssh_client, ssh_events):
    """A login with one smart session logs its start (with the key it logged in with) and its end, and none of Conch's trace."""
    await _one_session(ssh_client)
    await ssh_events.first("ended by the")
    lines = ssh_events.texts()
    assert len(lines) == 2, lines
    assert "alice from 127.0.0.1:" in lines[0] and "started a smart session" in lines[0]
    expected_key = subprocess.run(
        [SSH_KEYGEN, "-l", "-E", "sha256", "-f", str(ssh_client.key)], capture_output=True, text=True, check=True
    ).stdout.split()[1]
    assert f"key ssh-ed25519 {expected_key}" in lines[0]
    assert "smart session of alice ended by the server, exit status 0 (conn=" in lines[1]
    assert "requests=1," in lines[1]
    started, ended = (event for event in ssh_events.events if event["log_level"] < LogLevel.warn)
    assert started["connection_id"] == ended["connection_id"] and ended["requests"] == 1


@pytest_twisted.ensureDeferred
async def test_session_cut_by_the_client_says_so(ssh_client, ssh_events):
    """A client killed mid-session leaves the end line "ended by the client", with its requests counted."""
    client = _spawn_smart_client(ssh_client)
    assert (await client.request(b"hello")).success
    client.transport.signalProcess("KILL")
    await client.ended
    event = await ssh_events.first("ended by the client")
    await ssh_client.server.factory.wait_closed()
    assert event["requests"] == 1 and event["user"] == "alice"


@pytest_twisted.ensureDeferred
async def test_ssh_debug_logs_conch_trace(ssh_client, ssh_events):
    """With the trace on (``--ssh-debug``), Conch's steps of the same login are logged too."""
    show_conch_trace(True)
    await _one_session(ssh_client)
    lines = ssh_events.texts()
    assert "NEW KEYS" in lines
    assert any("'alice' trying auth b'publickey'" in line for line in lines)
    assert any("started a smart session" in line for line in lines)


@pytest_twisted.ensureDeferred
async def test_refused_shell_writes_one_line(ssh_client, ssh_events):
    """``ssh host`` logs in and asks for a shell: one line says it was refused, nothing else is logged."""
    out, err, code = await ssh_client.ssh("alice", options=["-T"])
    assert code == 1 and b"no shell here" in err
    await ssh_client.server.factory.wait_closed()
    [line] = ssh_events.texts()
    assert re.fullmatch(r"alice from 127\.0\.0\.1:\d+ asked for a shell; refused", line)


@pytest_twisted.ensureDeferred
async def test_refused_login_logged_once_with_its_reason(ssh_client, ssh_events, tmp_path):
    """A client whose key is refused leaves one line: who it tried to be, how, and why it was refused."""
    stranger = make_user_key(tmp_path / "stranger", "id_ed25519")
    stranger_key = Key.fromFile(str(stranger))
    out, err, code = await ssh_client.ssh("alice", SERVE, key=stranger)
    assert code == 255 and b"Permission denied (publickey)" in err
    event = await ssh_events.first("left without logging in")
    await ssh_client.server.factory.wait_closed()
    assert event["log_level"] == LogLevel.info
    assert event["refused_logins"] == 1
    offered = f"{stranger_key.type()} key {fingerprint(stranger_key)}"
    assert f"'alice' by publickey: {offered} not authorized for this user" in formatEvent(event)
    assert ssh_events.texts() == [formatEvent(event)]


@pytest_twisted.ensureDeferred
async def test_client_offering_no_key_is_logged(ssh_client, ssh_events):
    """A client with no key to offer gets the same line, saying so, and counts as refused."""
    out, err, code = await ssh_client.ssh("alice", SERVE, options=["-o", "PubkeyAuthentication=no"])
    assert code == 255 and b"Permission denied (publickey)" in err
    event = await ssh_events.first("left without logging in")
    assert "refused: 'alice' offered no key" in formatEvent(event)
    await ssh_client.server.factory.wait_closed()
    assert ssh_client.server.factory.logins == {"refused": 1}


@pytest_twisted.ensureDeferred
async def test_refused_login_line_is_bounded(ssh_client, ssh_events, tmp_path):
    """Six refused keys (the most a connection may try) under a long user name: the line names the
    first five, cut short, and counts the rest; the client is disconnected."""
    keys = [make_user_key(tmp_path / "strangers", f"id_{number}") for number in range(7)]
    options = [arg for key in keys[1:] for arg in ("-i", str(key))]
    out, err, code = await ssh_client.ssh("x" * 100, SERVE, key=keys[0], options=options)
    assert code == 255 and b"too many bad auths" in err
    event = await ssh_events.first("left without logging in")
    text = formatEvent(event)
    assert event["refused_logins"] == 6
    assert text.count(" not authorized for this user") == 5 and text.endswith("; and 1 more")
    assert "'" + "x" * 64 + "'" in text and "x" * 65 not in text


@pytest.mark.parametrize("max_auth_tries, logs_in", [(2, False), (3, True)])
@pytest_twisted.ensureDeferred
async def test_max_auth_tries_bounds_the_keys_one_connection_tries(tmp_path, max_auth_tries, logs_in):
    """With two wrong keys offered before the right one, a limit of 2 disconnects first; 3 lets the login through."""
    from .conftest import SSHServerUnderTest

    server = SSHServerUnderTest(tmp_path, max_auth_tries=max_auth_tries)
    try:
        client = server.client_for("alice", tmp_path)
        wrong = [make_user_key(tmp_path / "strangers", f"id_{number}") for number in range(2)]
        options = [arg for key in [*wrong[1:], client.key] for arg in ("-i", str(key))]
        out, err, code = await client.ssh("alice", "true", key=wrong[0], options=options)
        await server.factory.wait_closed()
        if logs_in:
            assert code == 1 and b"only runs the Breezy smart server" in err
            assert server.factory.logins == {"accepted": 1}
        else:
            assert code == 255 and b"too many bad auths" in err
            assert server.factory.logins == {"refused": 1}
    finally:
        await server.stopped()


@pytest_twisted.ensureDeferred
async def test_login_outcomes_are_counted_for_metrics(ssh_client, ssh_events, tmp_path):
    """/metrics counts a login that got in and one that was refused, once each."""
    metrics = ServerMetrics()
    metrics.watch_ssh(ssh_client.server.factory)

    def sample(outcome):
        return metrics.registry.get_sample_value("smartserve_ssh_logins_total", {"outcome": outcome})

    await _one_session(ssh_client)
    stranger = make_user_key(tmp_path / "stranger", "id_ed25519")
    out, err, code = await ssh_client.ssh("alice", SERVE, key=stranger)
    assert code == 255
    await ssh_events.first("left without logging in")
    assert (sample("accepted"), sample("refused"), sample("timed_out")) == (1, 1, 0)


@pytest_twisted.ensureDeferred
async def test_login_after_a_refused_key_logs_no_refusal(ssh_client, ssh_events, tmp_path):
    """A client that offers a wrong key before the right one logs in, and no refusal is logged."""
    stranger = make_user_key(tmp_path / "stranger", "id_ed25519")
    out, err, code = await ssh_client.ssh(
        "alice", "true", options=["-i", str(stranger), "-i", str(ssh_client.key)], key=stranger
    )
    assert code == 1 and b"only runs the Breezy smart server" in err
    await ssh_client.server.factory.wait_closed()
    assert not any("left without logging in" in line for line in ssh_events.texts())
    assert ssh_client.server.factory.logins == {"accepted": 1}


def _send_and_read(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(data)
        received = b""
        while chunk := connection.recv(4096):
            received += chunk
        return received


@pytest_twisted.ensureDeferred
async def test_protocol_error_disconnect_is_logged_with_the_peer(ssh_server, ssh_events):
    """A client the server disconnects for a protocol error (an SSH-1 version line) gets a line with its address."""
    received = await threads.deferToThread(_send_and_read, ssh_server.port_number, b"SSH-1.5-ancient\r\n")
    assert received.startswith(b"SSH-2.0-")
    event = await ssh_events.first("disconnecting 127.0.0.1:")
    assert "bad version 1.5" in formatEvent(event)
    await ssh_server.factory.wait_closed()


@pytest.mark.parametrize("debug", [False, True])
def test_twistd_option_ssh_debug(start_smartserve, tmp_path, debug):
    """``twistd smartserve --ssh-debug`` writes Conch's trace to the twistd log; without it there is none."""
    key = make_user_key(tmp_path / "client", "id_ed25519")
    keys = tmp_path / "server-data" / "keys"
    keys.mkdir(parents=True)
    (keys / "alice.pub").write_text(key.with_suffix(".pub").read_text())
    server = start_smartserve("--ssh", "tcp:0:interface=127.0.0.1", *(["--ssh-debug"] if debug else []))
    done = subprocess.run(
        [
            SSH, "-F", "/dev/null", "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-p", str(server.listening["ssh"]), "alice@127.0.0.1", "true",
        ],
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    assert done.returncode == 1 and b"only runs the Breezy smart server" in done.stderr
    log = wait_for(lambda: "asked to run" in server.log() and server.log(), 30, "the refusal to be logged")
    assert ("NEW KEYS" in log) is debug
    assert ("trying auth b'publickey'" in log) is debug

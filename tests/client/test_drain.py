"""The client across a takeover of smartserve: drained between calls and during calls.

Each test runs an old server on a fixed port, then a new one started with
``--takeover``, which takes the listening socket and drains the old one.
The waits on the server processes block the reactor on purpose: while they
run, the client reads nothing, so what the old server sent (a close, a
response) is still unread in the socket when the test goes on.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.logger import globalLogPublisher

from smartserve.client import RetryPolicy, SmartClient, SmartClientProtocol, SSHOptions

from drain.conftest import ServerProcess, server_status
from support import free_port, make_key_pair, wait_for, wait_until

from .conftest import copy_branch

pytestmark = pytest.mark.timeout(60)

SSH_KEYGEN = shutil.which("ssh-keygen")


class Takeover:
    """An old smartserve on fixed ports, and the new one that takes its sockets over."""

    def __init__(self, base: Path, options: list):
        self.data = base / "data"
        self.root = self.data / "branches"
        self.root.mkdir(parents=True)
        self.options = options
        self.old = ServerProcess(self.data, options, name="old")
        self.new = ServerProcess(self.data, [*options, "--takeover", str(self.data / "control.sock")], name="new")

    def start(self) -> "Takeover":
        self.old.start()
        return self

    def take_over(self) -> None:
        """Start the new server and wait until the old one drains."""
        self.new.start()
        wait_for(lambda: "Draining: " in self.old.log(), 30, "the old server to drain")

    def verbs(self, server: ServerProcess) -> list:
        """The verbs ``server`` answered, in order."""
        return [record["verb"] for record in server.access_records()]

    def stop(self) -> None:
        self.old.stop()
        self.new.stop()


@pytest.fixture
def takeover(tmp_path):
    """A Takeover serving bzr:// with writes allowed, the old server running."""
    port = free_port()
    pair = Takeover(tmp_path, ["--bzr", f"tcp:{port}:interface=127.0.0.1", "--bzr-allow-writes", "--ssh", "none"])
    pair.url = f"bzr://127.0.0.1:{port}/"
    pair.port = port
    yield pair.start()
    pair.stop()


def recording_client(port: int, connections: list, **options) -> SmartClient:
    """A bzr:// client on ``port`` that appends each connection it makes to ``connections``."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)

    def connect() -> Deferred:
        made = connectProtocol(endpoint, SmartClientProtocol(reactor))
        made.addCallback(lambda protocol: connections.append(protocol) or protocol)
        return made

    return SmartClient(connect, **options)


async def lock_and_unlock(client: SmartClient, branch: bytes) -> None:
    """Take a branch's write lock and give it back (two semi verbs)."""
    locked = await client.call(b"Branch.lock_write", branch, b"", b"")
    assert locked.args[0] == b"ok", locked.args
    assert (await client.call(b"Branch.unlock", branch, locked.args[1], locked.args[2])).args == (b"ok",)


@pytest_twisted.ensureDeferred
async def test_client_drained_between_calls_reconnects_without_resend(takeover, sample_branch):
    """After a takeover drained its idle connection, every verb class succeeds once on the new server, found by the probe with no resend."""
    root = takeover.root
    copy_branch(sample_branch, root / "branch")
    (root / "log").write_bytes(b"start\n")
    (root / "doomed").write_bytes(b"x")
    client = SmartClient.from_url(takeover.url)
    try:
        assert (await client.call(b"hello")).args == (b"ok", b"2")
        takeover.take_over()
        assert takeover.old.wait_exit(30) == 0
        # The old server's close of the idle connection is unread: only the probe can see it.
        assert (await client.call(b"get", b"/log")).body == b"start\n"
        assert (await client.call(b"stat", b"/log")).args[0] == b"stat"
        assert (await client.call(b"hello")).args == (b"ok", b"2")
        assert (await client.call(b"put", b"/new", b"", body=b"put once")).args == (b"ok",)
        assert (await client.call(b"append", b"/log", b"", body=b"appended\n")).args == (b"appended", b"6")
        assert (await client.call(b"mkdir", b"/folder", b"")).args == (b"ok",)
        assert (await client.call(b"delete", b"/doomed")).args == (b"ok",)
        await lock_and_unlock(client, b"/branch/")
    finally:
        await client.close()
    stats = client.stats
    assert (stats.probe_reconnects, stats.resends, stats.outcome_unknown, stats.connect_failures) == (1, 0, 0, 0)
    assert (root / "log").read_bytes() == b"start\nappended\n"
    assert (root / "new").read_bytes() == b"put once"
    assert (root / "folder").is_dir() and not (root / "doomed").exists()
    assert takeover.verbs(takeover.old) == ["hello"]
    # The server logs a request after sending its response.
    wait_for(lambda: len(takeover.verbs(takeover.new)) >= 9, 10, "the new server to log the last call")
    assert takeover.verbs(takeover.new) == [
        "get", "stat", "hello", "put", "append", "mkdir", "delete", "Branch.lock_write", "Branch.unlock",
    ]  # fmt: skip


async def small_calls(
    client: SmartClient, worker: int, stop: list, done_after_drain: Deferred, drained: list, failures: list
) -> None:
    """Read, idem and semi calls in a loop until ``stop``; fires ``done_after_drain`` after two rounds past the drain."""
    rounds_after_drain = 0
    while not stop:
        try:
            assert (await client.call(b"hello")).args == (b"ok", b"2")
            assert (await client.call(b"get", b"/small")).body == b"small\n"
            assert (await client.call(b"stat", b"/small")).args[0] == b"stat"
            await client.call(b"put", f"/put-{worker}".encode(), b"", body=b"idem")
            await lock_and_unlock(client, f"/branch-{worker}/".encode())
        except Exception as exc:
            failures.append(exc)
            return
        if drained:
            rounds_after_drain += 1
            if rounds_after_drain == 2 and not done_after_drain.called:
                done_after_drain.callback(None)


@pytest_twisted.ensureDeferred
async def test_client_drained_during_calls_loses_and_repeats_nothing(takeover, sample_branch):
    """Calls in flight when the old server drains complete there, calls not yet begun go to the new server, none fails and no append runs twice."""
    root = takeover.root
    workers = 3
    for worker in range(workers):
        copy_branch(sample_branch, root / f"branch-{worker}")
    big = os.urandom(1024 * 1024) * 24
    (root / "big.bin").write_bytes(big)
    (root / "small").write_bytes(b"small\n")
    (root / "written").write_bytes(b"")
    (root / "later").write_bytes(b"")
    reader_connections: list = []
    reader = recording_client(takeover.port, reader_connections)
    writer = SmartClient.from_url(takeover.url)
    pool = SmartClient.from_url(takeover.url, pool_size=workers)
    clients = (reader, writer, pool)
    stop: list = []
    drained: list = []
    failures: list = []
    two_rounds = [Deferred() for _ in range(workers)]
    loops: list = []
    release = Deferred()

    async def slow_body():
        yield b"first "
        await release
        yield b"second\n"

    try:
        assert (await reader.call(b"hello")).args == (b"ok", b"2")
        reader_connections[0].transport.pauseProducing()
        getting = reader.call(b"get", b"/big.bin")
        written = writer.call(b"append", b"/written", b"", body_stream=slow_body())
        # The get's answer fills the socket buffers (the server may still be writing it),
        # and the append waits for the rest of its body.
        await wait_until(
            lambda: server_status(takeover.old)["busy"] + ("get" in takeover.verbs(takeover.old)) == 2,
            30,
            "the get and the append to begin",
        )
        loops.extend(
            Deferred.fromCoroutine(small_calls(pool, worker, stop, two_rounds[worker], drained, failures))
            for worker in range(workers)
        )
        await wait_until(lambda: len(takeover.verbs(takeover.old)) > 10 * workers, 30, "the small calls to run")
        takeover.take_over()
        drained.append(True)
        later = pool.call(b"append", b"/later", b"", body=b"later\n")
        release.callback(None)
        reader_connections[0].transport.resumeProducing()
        assert (await getting).body == big
        assert (await written).args == (b"appended", b"0")
        assert (await later).args == (b"appended", b"0")
        await gatherResults(two_rounds)
        stop.append(True)
        await gatherResults(loops)
        assert takeover.old.wait_exit(30) == 0
    finally:
        stop.append(True)
        if not release.called:
            release.callback(None)
        for client in clients:
            await client.close()
    assert failures == []
    assert (root / "written").read_bytes() == b"first second\n"
    assert (root / "later").read_bytes() == b"later\n"
    # A server logs a request just after sending its response: wait for the new server's last lines.
    await wait_until(
        lambda: {"append", "get"} <= set(takeover.verbs(takeover.new)), 10, "the new server's access log"
    )
    old_verbs, new_verbs = takeover.verbs(takeover.old), takeover.verbs(takeover.new)
    assert old_verbs.count("append") == 1 and new_verbs.count("append") == 1
    assert "get" in old_verbs and "get" in new_verbs
    assert (reader.stats.resends, writer.stats.resends) == (0, 0)
    assert sum(client.stats.outcome_unknown for client in clients) == 0


@pytest.fixture
def ssh_takeover(tmp_path):
    """A Takeover serving bzr+ssh:// only, where ``client_key`` logs in as alice with write access."""
    port = free_port()
    client_key = tmp_path / "client_key"
    make_key_pair(client_key)
    access = tmp_path / "access"
    access.write_text("alice write /\n")
    pair = Takeover(tmp_path, ["--ssh", f"tcp:{port}:interface=127.0.0.1", "--access", str(access)])
    (pair.data / "keys").mkdir()
    shutil.copy(client_key.with_suffix(".pub"), pair.data / "keys" / "alice.pub")
    pair.start()
    host_key = (pair.data / "ssh_host_ed25519_key.pub").read_text().split()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    pair.url = f"bzr+ssh://alice@127.0.0.1:{port}/"
    pair.ssh = SSHOptions(identity_files=[str(client_key)], known_hosts=str(known_hosts), use_agent=False)
    yield pair
    pair.stop()


@pytest.mark.skipif(SSH_KEYGEN is None, reason="ssh-keygen is not installed")
@pytest_twisted.ensureDeferred
async def test_client_append_written_to_drained_ssh_session_resent_once(ssh_takeover, monkeypatch):
    """An append written to an SSH session the draining server closed with exit status 75 did not run there, and is resent and applied once."""
    root = ssh_takeover.root
    (root / "log").write_bytes(b"start\n")
    resends = []
    observer = lambda event: resends.append(event) if event.get("event_kind") == "resend" else None
    globalLogPublisher.addObserver(observer)
    client = SmartClient.from_url(ssh_takeover.url, ssh=ssh_takeover.ssh, policy=RetryPolicy(deadline=30.0))
    try:
        assert (await client.call(b"hello")).args == (b"ok", b"2")
        ssh_takeover.take_over()
        wait_for(lambda: "ended by the server, exit status 75" in ssh_takeover.old.log(), 30, "the old server to end the session")
        # The exit status and channel close are unread; with the probe's wait for
        # them switched off, the append goes out as if they had crossed it on the wire.
        monkeypatch.setattr("smartserve.client._client._PROBE_TURNS", 0)
        assert (await client.call(b"append", b"/log", b"", body=b"appended\n")).args == (b"appended", b"6")
        assert ssh_takeover.old.wait_exit(30) == 0
    finally:
        globalLogPublisher.removeObserver(observer)
        await client.close()
    assert (root / "log").read_bytes() == b"start\nappended\n"
    assert (client.stats.resends, client.stats.probe_reconnects, client.stats.outcome_unknown) == (1, 0, 0)
    assert [(event["verb"], event["point"], event["drain_signal"]) for event in resends] == [
        ("append", "after write", True)
    ]
    assert ssh_takeover.verbs(ssh_takeover.old) == ["hello"]
    assert ssh_takeover.verbs(ssh_takeover.new) == ["append"]

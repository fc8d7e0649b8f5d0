"""Fixtures for the client tests: a real `brz serve` and a fault-injecting relay."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from twisted.internet import defer, protocol, reactor

from support import BRZ, SmartserveProcess, brz_env, free_port, make_key_pair


def _wait_listening(process, port: int, timeout: float, what: str) -> None:
    """Poll until ``port`` accepts connections; fail if ``process`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited with status {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"{what} did not listen on {port} within {timeout} s")


def _stop(process) -> None:
    """Terminate ``process`` and wait for it, killing it if it lingers."""
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class BrzServe:
    """A real `brz serve --allow-writes` on 127.0.0.1, serving ``root``."""

    def __init__(self, root: Path, home: Path):
        self.root = root
        self.env = brz_env(home)
        self.process = None
        self.port = None

    def start(self, timeout: float = 30.0) -> "BrzServe":
        """Start the server on a free port and wait until it accepts connections.

        `brz serve` prints its port only when it exits (its output is
        buffered), so the port is picked here.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process = subprocess.Popen(
            [BRZ, "serve", "--listen=127.0.0.1", f"--port={self.port}", "--allow-writes", f"--directory={self.root}"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_listening(self.process, self.port, timeout, "brz serve")
        return self

    @property
    def url(self) -> str:
        """The bzr:// URL of the served root."""
        return f"bzr://127.0.0.1:{self.port}/"

    def brz(self, *args, cwd=None) -> str:
        """Run `brz args` with the server's environment; return its output."""
        proc = subprocess.run(
            [BRZ, *map(str, args)], cwd=cwd, env=self.env, capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            raise AssertionError(f"brz {args} failed: {proc.stderr}")
        return proc.stdout

    def stop(self) -> None:
        """Stop the server and wait for it."""
        _stop(self.process)


@pytest.fixture(scope="session")
def brz_serve(tmp_path_factory):
    """One `brz serve` for the whole session; tests work in their own subfolder."""
    base = tmp_path_factory.mktemp("brz-serve")
    server = BrzServe(base / "root", base / "home").start()
    yield server
    server.stop()


_counter = iter(range(1_000_000))


@pytest.fixture
def workdir(brz_serve):
    """A fresh folder under the served root: (its path on disk, its path on the server)."""
    name = f"t{next(_counter)}"
    path = brz_serve.root / name
    path.mkdir()
    return path, f"/{name}"


class _RelayServerSide(protocol.Protocol):
    """The relay's connection to the real server."""

    def __init__(self, link):
        self.link = link

    def connectionMade(self):
        self.link.server_connected(self)

    def dataReceived(self, data):
        self.link.from_server(data)

    def connectionLost(self, reason):
        self.link.server_lost()


class _RelayLink(protocol.Protocol):
    """One client connection through the relay, and its faults."""

    def __init__(self, relay):
        self.relay = relay
        self.server = None
        self.pending = []
        self.cut = False
        self.silent = False

    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        self.relay.links.append(self)
        self.relay.connections += 1
        factory = protocol.ClientFactory.forProtocol(lambda: _RelayServerSide(self))
        reactor.connectTCP("127.0.0.1", self.relay.server_port, factory)

    def server_connected(self, server):
        self.server = server
        server.transport.setTcpNoDelay(True)
        if self.cut:
            server.transport.loseConnection()
            return
        for data in self.pending:
            self._forward(data, to_server=True)
        self.pending = []

    def dataReceived(self, data):
        if self.server is None:
            self.pending.append(data)
        else:
            self._forward(data, to_server=True)

    def from_server(self, data):
        self._forward(data, to_server=False)

    def _forward(self, data, to_server):
        relay = self.relay
        if self.cut:
            return
        if self.silent:
            relay.swallowed += len(data)
            return
        limit = relay.cut_client_to_server if to_server else relay.cut_server_to_client
        if limit is not None and len(data) >= limit:
            data = data[:limit]
            relay.cut_client_to_server = relay.cut_server_to_client = None
            self._send(data, to_server)
            self.cut_both()
            relay.cuts += 1
            relay._cut_waiters, waiters = [], relay._cut_waiters
            for waiter in waiters:
                waiter.callback(None)
            return
        self._send(data, to_server)

    def _send(self, data, to_server):
        if not data:
            return
        relay = self.relay
        direction = "to server" if to_server else "to client"
        if not relay.flights or relay.flights[-1] != direction:
            relay.flights.append(direction)
        if to_server:
            if relay.cut_client_to_server is not None:
                relay.cut_client_to_server -= len(data)
            self.server.transport.write(data)
        else:
            if relay.cut_server_to_client is not None:
                relay.cut_server_to_client -= len(data)
            self.transport.write(data)

    def cut_both(self):
        """Close both sides once what was let through has been sent."""
        self.cut = True
        self.transport.loseConnection()
        if self.server is not None:
            self.server.transport.loseConnection()

    def server_lost(self):
        if not self.cut:
            self.transport.loseConnection()

    def connectionLost(self, reason):
        if self in self.relay.links:
            self.relay.links.remove(self)
        if self.server is not None and not self.cut:
            self.server.transport.loseConnection()
        self.relay._lost_waiters, waiters = [], self.relay._lost_waiters
        for waiter in waiters:
            waiter.callback(None)


class FaultRelay(protocol.Factory):
    """A TCP relay in front of a real server that breaks connections on command.

    ``cut_client_to_server = N`` lets N more bytes through towards the
    server, then closes that connection on both sides;
    ``cut_server_to_client`` does the same towards the client. Each is used
    once. ``silence()`` makes the open connections stop forwarding without
    closing anything. ``close_all()`` closes every open connection between
    requests.
    """

    def __init__(self, server_port: int):
        self.server_port = server_port
        self.links = []
        self.connections = 0
        self.cuts = 0
        self.swallowed = 0
        self.cut_client_to_server = None
        self.cut_server_to_client = None
        self.flights = []
        """The directions data went in, one entry per change of direction: "to server", "to client"."""
        self._lost_waiters = []
        self._cut_waiters = []
        self.port = None

    def buildProtocol(self, addr):
        return _RelayLink(self)

    def listen(self) -> "FaultRelay":
        self.port = reactor.listenTCP(0, self, interface="127.0.0.1")
        return self

    @property
    def url(self) -> str:
        return f"bzr://127.0.0.1:{self.port.getHost().port}/"

    def wait_for_cut(self) -> defer.Deferred:
        """A Deferred that fires when the relay next cuts a connection."""
        waiter = defer.Deferred()
        self._cut_waiters.append(waiter)
        return waiter

    def silence(self) -> None:
        """Stop forwarding on every open connection; new ones work normally."""
        for link in self.links:
            link.silent = True

    def close_all(self) -> defer.Deferred:
        """Close every relayed connection; fires once the first close is seen."""
        waiter = defer.Deferred()
        self._lost_waiters.append(waiter)
        for link in list(self.links):
            link.transport.loseConnection()
            if link.server is not None:
                link.server.transport.loseConnection()
        return waiter

    def stop(self) -> defer.Deferred:
        for link in list(self.links):
            link.cut_both()
        return defer.maybeDeferred(self.port.stopListening)


@pytest.fixture
def relay(brz_serve):
    """A FaultRelay in front of the session's `brz serve`."""
    relay = FaultRelay(brz_serve.port).listen()
    yield relay
    relay.stop()


SSHD = "/usr/sbin/sshd"


class OpenSSHServer:
    """A real OpenSSH `sshd` on 127.0.0.1 whose `bzr` is the venv's `brz`."""

    def __init__(self, base: Path):
        self.base = base
        self.process = None
        self.port = None

    def start(self, timeout: float = 20.0) -> "OpenSSHServer":
        base = self.base
        (base / "bin").mkdir(parents=True)
        home = base / "home"
        home.mkdir()
        wrapper = base / "bin" / "bzr"
        wrapper.write_text(f'#!/bin/sh\nexec {BRZ} "$@"\n')
        wrapper.chmod(0o755)
        for name in ("host_key", "client_key", "other_key"):
            make_key_pair(base / name)
        (base / "authorized_keys").write_text((base / "client_key.pub").read_text())
        self.port = free_port()
        (base / "sshd_config").write_text(
            f"Port {self.port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {base / 'host_key'}\n"
            f"PidFile {base / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {base / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            f"SetEnv PATH={base / 'bin'}:/usr/bin:/bin BRZ_HOME={home} BRZ_LOG={home / 'brz.log'} "
            "BRZ_EMAIL=test@example.com\n"
        )
        os.makedirs("/run/sshd", exist_ok=True)
        self.process = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(base / "sshd_config")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        _wait_listening(self.process, self.port, timeout, "sshd")
        host_key = (base / "host_key.pub").read_text().split()
        self.known_hosts = base / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_key[0]} {host_key[1]}\n")
        self.client_key = base / "client_key"
        return self

    def url(self, path: str = "/") -> str:
        """The bzr+ssh:// URL of ``path`` on this server."""
        return f"bzr+ssh://root@127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        _stop(self.process)


@pytest.fixture(scope="session")
def openssh(tmp_path_factory):
    """A running OpenSSH server, or a skip saying why there cannot be one."""
    if os.geteuid() != 0:
        pytest.skip("sshd needs root to run as a login server")
    if not os.path.exists(SSHD):
        pytest.skip("OpenSSH server is not installed (apt-get install openssh-server)")
    server = OpenSSHServer(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.stop()


class SmartserveServer:
    """A `twistd smartserve` process serving bzr:// and bzr+ssh:// to one SSH user."""

    def __init__(self, base: Path, user: str = "alice"):
        self.base = base
        self.data = base / "data"
        self.root = self.data / "branches"
        self.user = user
        self.process = None

    def start(self, timeout: float = 30.0) -> "SmartserveServer":
        (self.data / "keys").mkdir(parents=True)
        self.root.mkdir()
        self.client_key = self.base / "client_key"
        make_key_pair(self.client_key)
        (self.data / "keys" / f"{self.user}.pub").write_text((self.base / "client_key.pub").read_text())
        access = self.base / "access"
        access.write_text(f"{self.user} write /\n")
        self.process = SmartserveProcess(
            self.data,
            [
                "--bzr", "tcp:0:interface=127.0.0.1", "--bzr-allow-writes",
                "--ssh", "tcp:0:interface=127.0.0.1",
                "--access", str(access),
            ],
        ).start(timeout)  # fmt: skip
        self.bzr_port = self.process.listening["bzr"]
        self.ssh_port = self.process.listening["ssh"]
        host_key = (self.data / "ssh_host_ed25519_key.pub").read_text().split()
        self.known_hosts = self.base / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.ssh_port} {host_key[0]} {host_key[1]}\n")
        return self

    @property
    def bzr_url(self) -> str:
        return f"bzr://127.0.0.1:{self.bzr_port}/"

    @property
    def ssh_url(self) -> str:
        return f"bzr+ssh://{self.user}@127.0.0.1:{self.ssh_port}/"

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@pytest.fixture(scope="module")
def smartserve_server(tmp_path_factory):
    """A smartserve process for the tests of one module."""
    server = SmartserveServer(tmp_path_factory.mktemp("smartserve")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sample_branch(brz_serve, tmp_path_factory):
    """A real 2a branch with three revisions, made once; copy it where a test needs it."""
    tree = tmp_path_factory.mktemp("sample") / "branch"
    brz_serve.brz("init", "-q", tree)
    for number in range(3):
        (tree / "file.txt").write_text(f"revision {number}\n")
        if number == 0:
            brz_serve.brz("add", "-q", cwd=tree)
        brz_serve.brz("commit", "-q", "-m", f"revision {number}", cwd=tree)
    return tree


def copy_branch(sample: Path, where: Path) -> Path:
    """A copy of ``sample`` at ``where``."""
    import shutil

    shutil.copytree(sample, where, symlinks=True)
    return where


async def streamed_revisions(client, branch_path: bytes) -> list:
    """The revision keys in a ``Repository.get_stream_1.19`` of everything in ``branch_path``.

    Checks that the reply is ok and that the stream decodes as Breezy's own
    client decodes it.
    """
    from breezy.bzr.groupcompress_repo import RepositoryFormat2a
    from breezy.bzr.smart.repository import _byte_stream_to_stream

    chunks = []
    reply = await client.call(
        b"Repository.get_stream_1.19",
        branch_path,
        RepositoryFormat2a().network_name(),
        body=b"everything",
        on_chunk=chunks.append,
    )
    assert reply.args == (b"ok",) and reply.body is None
    assert len(chunks) > 1
    source_format, stream = _byte_stream_to_stream(iter(chunks))
    assert source_format.network_name() == RepositoryFormat2a().network_name()
    return [record.key for kind, substream in stream for record in substream if kind == "revisions"]

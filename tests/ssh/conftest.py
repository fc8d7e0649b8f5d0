"""Fixtures for the SSH front end: an in-process server and a real OpenSSH client."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.threadpool import ThreadPool

from smartserve.server.backends.bzr import BzrBackend
from smartserve.server.dispatcher import Dispatcher
from smartserve.server.protocol import SmartServerFactory
from smartserve.ssh import make_ssh_factory
from support import make_key_pair

SSH = shutil.which("ssh")
SSH_KEYGEN = shutil.which("ssh-keygen")
BRZ = str(Path(sys.executable).parent / "brz")

needs_openssh = pytest.mark.skipif(
    SSH is None or SSH_KEYGEN is None, reason="the OpenSSH client is not installed"
)


def make_user_key(folder: Path, name: str, kind: str = "ed25519") -> Path:
    """Create an unencrypted key pair ``folder/name`` (and ``.pub``) with ssh-keygen."""
    folder.mkdir(parents=True, exist_ok=True)
    return make_key_pair(folder / name, kind, comment=name)


def make_unusual_file(path: Path, kind: str, too_large: str) -> None:
    """Put at ``path`` what the server must not open blindly: a ``fifo``, a ``folder``, a ``device`` (a
    symlink to /dev/null), or, for ``huge``, the text ``too_large``."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "device":
        path.symlink_to("/dev/null")
    else:
        path.write_text(too_large)


class SSHServerUnderTest:
    """smartserve's SSH front end and smart server on 127.0.0.1, in this process."""

    def __init__(self, base: Path, access_text: str | None = None, **options):
        self.data = base / "server-data"
        self.root = self.data / "branches"
        self.keys = self.data / "keys"
        self.root.mkdir(parents=True)
        self.access_file = None
        if access_text is not None:
            self.access_file = self.data / "access"
            self.access_file.write_text(access_text)
        self.pool = ThreadPool(minthreads=1, maxthreads=4, name="ssh-test-worker")
        self.pool.start()
        self.smart_factory = SmartServerFactory(
            Dispatcher(BzrBackend(str(self.root), self.pool, reactor)), clock=reactor
        )
        self.factory = make_ssh_factory(
            smart_factory=self.smart_factory,
            data_dir=str(self.data),
            host_key_paths=[],
            keys_dir=str(self.keys),
            access_file=str(self.access_file) if self.access_file else None,
            **options,
        )
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.port_number = self.port.getHost().port
        self.host_public_key = (self.data / "ssh_host_ed25519_key.pub").read_text().strip()

    def authorize(self, user: str, public_key_path: Path) -> None:
        """Let the key at ``public_key_path`` log in as ``user``."""
        self.keys.mkdir(exist_ok=True)
        with open(self.keys / f"{user}.pub", "a") as keys_file:
            keys_file.write(public_key_path.read_text())

    def client_for(self, user: str, base: Path) -> "OpenSSHClient":
        """An OpenSSH client kept in ``base`` whose new key logs in as ``user``."""
        client = OpenSSHClient(base, self)
        self.authorize(user, client.key.with_suffix(".pub"))
        return client

    async def stopped(self) -> None:
        """Stop listening, drop every connection and stop the worker pool."""
        await defer.maybeDeferred(self.port.stopListening)
        self.factory.abort()
        await self.factory.wait_closed()
        self.pool.stop()


class OpenSSHClient:
    """The real ``ssh`` (and ``brz`` through it) with a private home, keys and known_hosts."""

    def __init__(self, base: Path, server: SSHServerUnderTest):
        self.server = server
        self.home = base / "client-home"
        self.ssh_dir = self.home / ".ssh"
        self.key = make_user_key(self.ssh_dir, "id_ed25519")
        self.known_hosts = self.ssh_dir / "known_hosts"
        self.known_hosts.write_text(
            f"[127.0.0.1]:{server.port_number} {server.host_public_key}\n"
        )
        self.config = self.ssh_dir / "config"
        self.config.write_text(
            "Host *\n"
            f"  IdentityFile {self.key}\n"
            "  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {self.known_hosts}\n"
            "  StrictHostKeyChecking yes\n"
            "  BatchMode yes\n"
            "  ConnectTimeout 10\n"
            "  LogLevel ERROR\n"
        )
        # brz runs plain ``ssh``; this one reads our config, not the real home's.
        self.bin = base / "client-bin"
        self.bin.mkdir()
        wrapper = self.bin / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec {SSH} -F {self.config} "$@"\n')
        wrapper.chmod(0o755)
        self.env = dict(
            os.environ,
            HOME=str(self.home),
            BRZ_HOME=str(self.home),
            BRZ_SSH="openssh",
            BRZ_EMAIL="Test User <test@example.com>",
            BRZ_LOG=str(self.home / "brz.log"),
            BRZ_DISABLE_PLUGINS="launchpad",
            PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
        )

    def url(self, user: str, path: str = "") -> str:
        """The bzr+ssh:// URL of ``path`` under the served root, as ``user``."""
        return f"bzr+ssh://{user}@127.0.0.1:{self.server.port_number}/{path}"

    def argv(self, user: str, *args: str, options=(), key: Path | None = None) -> list:
        """The arguments (after ``ssh``) that log in as ``user`` with only ``key``."""
        return [
            "-F", "/dev/null",
            "-i", str(key or self.key),
            "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=10",
            "-p", str(self.server.port_number),
            *options,
            f"{user}@127.0.0.1",
            *args,
        ]  # fmt: skip

    def ssh(self, user: str, *args: str, options=(), key: Path | None = None):
        """Run ``ssh user@server args`` with only ``key`` (default: the client's).

        Returns a Deferred firing with (stdout, stderr, exit code).
        """
        return getProcessOutputAndValue(
            SSH, self.argv(user, *args, options=options, key=key), env=self.env
        )

    def brz(self, *args, cwd: Path | None = None):
        """Run ``brz args``; a Deferred firing with (stdout, stderr, exit code)."""
        return getProcessOutputAndValue(
            BRZ, [str(arg) for arg in args], env=self.env, path=str(cwd) if cwd else None
        )


async def conch_connection(server: SSHServerUnderTest, client: OpenSSHClient):
    """Log in to ``server`` with ``client``'s key through smartserve's Conch client code.

    Returns (its SSH transport, its connection service), for tests that
    need to send what OpenSSH would not.
    """
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    from smartserve.client._endpoints import parse_url
    from smartserve.client._ssh import SSHOptions, _ClientTransport, ssh_endpoint

    url = f"bzr+ssh://alice@127.0.0.1:{server.port_number}/"
    options = SSHOptions(identity_files=[str(client.key)], known_hosts=str(client.known_hosts), use_agent=False)
    ready = defer.Deferred()
    transport = _ClientTransport(ssh_endpoint(reactor, parse_url(url), options), ready)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", server.port_number), transport)
    connection = await ready.addTimeout(10, reactor)
    return transport, connection


@pytest.fixture
def ssh_server(tmp_path):
    """A running SSH front end with default options and no access file."""
    server = SSHServerUnderTest(tmp_path)
    yield server
    pytest_twisted.blockon(defer.ensureDeferred(server.stopped()))


@pytest.fixture
def ssh_client(tmp_path, ssh_server):
    """An OpenSSH client whose key logs in as ``alice``."""
    return ssh_server.client_for("alice", tmp_path)

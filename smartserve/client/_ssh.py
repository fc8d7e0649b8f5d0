"""``bzr+ssh://``: the smart protocol over an SSH exec channel, through Conch.

The client runs ``bzr serve --inet --directory=/ --allow-writes`` on the
remote host, as ``brz`` does, and speaks the protocol on the command's
stdin and stdout. When the command ends with exit status 75 the channel
close carries it to ``SmartClientProtocol.connectionLost`` as the drain
signal.

Host keys are checked against a known_hosts file (OpenSSH format, hashed
or not, ``[host]:port`` entries for other ports than 22). An unknown host
or a changed key fails the connection with ``HostKeyError``; only with
``trust_on_first_use`` is an unknown host's key accepted and written to the
file. A changed key is never accepted.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from twisted.conch.client.knownhosts import KnownHostsFile
from twisted.conch.endpoints import AuthenticationFailed, SSHCommandClientEndpoint
from twisted.conch.error import HostKeyChanged, UserRejectedKey
from twisted.conch.ssh.keys import Key
from twisted.internet.defer import succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from zope.interface import implementer

from .._sending import sending_at_once
from ._endpoints import SSH_PORT, Target
from ._exceptions import HostKeyError

__all__ = ["SSHOptions", "ssh_endpoint", "DEFAULT_REMOTE_COMMAND"]

DEFAULT_REMOTE_COMMAND = "bzr serve --inet --directory=/ --allow-writes"
"""What the client runs on the SSH server, as `brz` does."""


@dataclass(frozen=True)
class SSHOptions:
    """How to reach a ``bzr+ssh://`` server.

    ``identity_files`` are private key files (unencrypted, or decrypted
    with ``passphrase``). ``use_agent`` also asks the ssh-agent at
    ``$SSH_AUTH_SOCK``. ``known_hosts`` defaults to ``~/.ssh/known_hosts``.
    ``username`` defaults to the URL's user, then the local user.
    """

    identity_files: Sequence[str] = ()
    passphrase: Optional[bytes] = None
    use_agent: bool = True
    known_hosts: Optional[str] = None
    trust_on_first_use: bool = False
    remote_command: str = DEFAULT_REMOTE_COMMAND
    username: Optional[str] = None


class _PortKnownHosts(KnownHostsFile):
    """known_hosts lookups that also try OpenSSH's ``[host]:port`` form."""

    port: int = SSH_PORT

    def hasHostKey(self, hostname: bytes, key: Key) -> bool:
        if self.port != SSH_PORT:
            bracketed = b"[%s]:%d" % (hostname, self.port)
            if super().hasHostKey(bracketed, key):
                return True
        return super().hasHostKey(hostname, key)


class _HostKeyDecision:
    """The Conch UI: answers the unknown-host question from the options, never a terminal."""

    _log = Logger()

    def __init__(self, trust_on_first_use: bool):
        self._trust = trust_on_first_use

    def prompt(self, text: bytes):
        if self._trust:
            self._log.warn("trusting an unknown host key on first use: {text}", text=text.decode("utf-8", "replace"))
        return succeed(self._trust)

    def warn(self, text: bytes) -> None:
        self._log.info("{text}", text=text.decode("utf-8", "replace").strip())


def _load_keys(options: SSHOptions) -> list:
    return [Key.fromFile(os.path.expanduser(path), passphrase=options.passphrase) for path in options.identity_files]


def ssh_endpoint(reactor, target: Target, options: SSHOptions) -> "_CheckedEndpoint":
    """The endpoint that runs the remote command for a ``bzr+ssh://`` target."""
    known_path = os.path.expanduser(options.known_hosts or "~/.ssh/known_hosts")
    known_hosts = _PortKnownHosts.fromPath(FilePath(known_path))
    known_hosts.port = target.port
    agent = None
    if options.use_agent and os.environ.get("SSH_AUTH_SOCK"):
        agent = UNIXClientEndpoint(reactor, os.environ["SSH_AUTH_SOCK"])
    username = options.username or target.user or getpass.getuser()
    endpoint = SSHCommandClientEndpoint.newConnection(
        reactor,
        options.remote_command.encode("utf-8"),
        username.encode("utf-8"),
        target.host.encode("idna"),
        port=target.port,
        keys=_load_keys(options),
        agentEndpoint=agent,
        knownHosts=known_hosts,
        ui=_HostKeyDecision(options.trust_on_first_use),
    )
    return _CheckedEndpoint(endpoint, target, known_path, username)


def _report_connection_loss(protocol):
    """Make the loss of the SSH connection reach the command channel's protocol.

    Conch's command endpoint does not stop its connection service when the
    TCP connection drops after login (twisted/twisted#7901), so the channel
    is never closed and a request in flight would wait for a response that
    cannot come, until its deadline. Here the connection service is
    stopped once the SSH transport is lost, which closes the channel as a
    clean close would, and the protocol sees the connection lost.
    """
    connection = protocol.transport.conn
    ssh_transport = connection.transport
    lost = ssh_transport.connectionLost

    def connection_lost(reason=None):
        lost(reason)
        if connection.channelsToRemoteChannel or connection.channels:
            connection.serviceStopped()

    ssh_transport.connectionLost = connection_lost
    return protocol


def _send_packets_at_once(protocol):
    """Have each SSH packet leave in the turn it is written, as the server's do (see smartserve._sending)."""
    ssh_transport = protocol.transport.conn.transport
    ssh_transport.transport = sending_at_once(ssh_transport.transport)
    return protocol


@implementer(IStreamClientEndpoint)
class _CheckedEndpoint:
    """Turns Conch's host key refusals into ``HostKeyError``, and its failed logins into a clear message."""

    def __init__(self, endpoint: SSHCommandClientEndpoint, target: Target, known_path: str, username: str):
        self._endpoint = endpoint
        self._target = target
        self._known_path = known_path
        self._username = username

    def connect(self, factory):
        connected = self._endpoint.connect(factory).addCallbacks(_report_connection_loss, self._explain)
        return connected.addCallback(_send_packets_at_once)

    def _explain(self, failure):
        where = f"{self._target.host}:{self._target.port}"
        if failure.check(UserRejectedKey):
            raise HostKeyError(
                f"host key of {where} is not in {self._known_path}; add it "
                "(ssh-keyscan) or allow trust on first use"
            )
        if failure.check(HostKeyChanged):
            raise HostKeyError(
                f"host key of {where} does not match {self._known_path}: "
                "the server changed its key or someone is intercepting the connection"
            )
        if failure.check(AuthenticationFailed):
            # Conch reports a refused key and a connection lost while logging
            # in (a server restarting) alike, so this stays a failure the
            # client tries again, as it would any connection attempt.
            raise ConnectionError(
                f"could not log in to {where} as {self._username!r}: the server refused the keys offered, "
                "or closed the connection during the login"
            )
        return failure

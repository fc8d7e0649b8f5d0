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

Each connection is one SSH connection with one session channel, built from
Conch's SSH classes (transport, user-auth, connection, channel) rather
than its command endpoint, so that a login the server refused
(``LoginRefused``, never tried again) is told apart from a connection lost
during the login (tried again), and so that Conch's per-connection trace
stays out of the log unless ``show_ssh_trace`` lets it through.
"""

from __future__ import annotations

import getpass
import os
import struct
from dataclasses import dataclass
from typing import Optional, Sequence

from twisted.conch.client.knownhosts import KnownHostsFile
from twisted.conch.endpoints import SSHCommandAddress
from twisted.conch.error import HostKeyChanged, UserRejectedKey
from twisted.conch.client.agent import SSHAgentClient
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.common import NS, getNS
from twisted.conch.ssh.connection import SSHConnection
from twisted.conch.ssh.keys import Key
from twisted.conch.ssh.transport import (
    DISCONNECT_BY_APPLICATION,
    DISCONNECT_CONNECTION_LOST,
    DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE,
    SSHClientTransport,
)
from twisted.conch.ssh.agent import AGENT_SIGN_RESPONSE, AGENTC_SIGN_REQUEST
from twisted.conch.ssh.userauth import MSG_USERAUTH_REQUEST, SSHUserAuthClient
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import ConnectionDone, ProcessTerminated
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from .._conch_trace import ConchTrace
from .._quiet import QuietFactory
from .._sending import sending_at_once
from ._endpoints import SSH_PORT, Target, tcp_endpoint
from ._exceptions import CommandRefused, HostKeyError, LoginRefused

__all__ = ["SSHOptions", "ssh_endpoint", "show_ssh_trace", "DEFAULT_REMOTE_COMMAND"]

_log = Logger()
_client_trace = ConchTrace()
_GOODBYES = frozenset({DISCONNECT_BY_APPLICATION, DISCONNECT_CONNECTION_LOST})
_RSA_SHA2 = (b"rsa-sha2-512", b"rsa-sha2-256")
_AGENT_FLAGS = {b"rsa-sha2-256": 2, b"rsa-sha2-512": 4}  # SSH_AGENT_RSA_SHA2_256, _512


def show_ssh_trace(enabled: bool) -> None:
    """Log Conch's whole trace of the client's SSH connections (as ``ssh -v``), or only its warnings and errors."""
    _client_trace.show(enabled)


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
    """known_hosts under OpenSSH's names: ``[host]:port`` for any port but 22, in lookups and in what is written."""

    port: int = SSH_PORT

    def _name(self, host: bytes) -> bytes:
        return host if self.port == SSH_PORT else b"[%s]:%d" % (host, self.port)

    def verifyHostKey(self, ui, hostname: bytes, ip: bytes, key: Key) -> Deferred:
        return super().verifyHostKey(ui, self._name(hostname), self._name(ip), key)


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


def ssh_endpoint(reactor, target: Target, options: SSHOptions, connect_timeout: float = 30.0) -> "_SSHCommandEndpoint":
    """The endpoint that runs the remote command for a ``bzr+ssh://`` target.

    ``connect_timeout`` bounds the TCP connect, as for ``bzr://``.
    """
    known_path = os.path.expanduser(options.known_hosts or "~/.ssh/known_hosts")
    agent = None
    if options.use_agent and os.environ.get("SSH_AUTH_SOCK"):
        agent = UNIXClientEndpoint(reactor, os.environ["SSH_AUTH_SOCK"])
    return _SSHCommandEndpoint(
        tcp_endpoint(reactor, target, connect_timeout),
        target,
        command=options.remote_command.encode("utf-8"),
        username=options.username or target.user or getpass.getuser(),
        keys=_load_keys(options),
        agent=agent,
        known_path=known_path,
        ui=_HostKeyDecision(options.trust_on_first_use),
    )


class _UserAuth(SSHUserAuthClient):
    """Offers the identity files' keys, then the agent's, as OpenSSH does; never a password.

    The login costs one round trip for a key the server takes: it starts
    with a key, not with the ``none`` method that asks which methods the
    server allows, and a key from a file is sent signed at once, where
    OpenSSH first asks whether the server would take it. An agent's key
    is still asked about first, since the agent may need its owner to
    confirm each signature.

    An RSA key signs with SHA-2 (``rsa-sha2-512`` or ``rsa-sha2-256``)
    when the server lists it in ``server-sig-algs``, as OpenSSH's client
    does: OpenSSH servers refuse ``ssh-rsa`` (SHA-1) signatures since 8.8.
    """

    _log = _client_trace.logger()

    def __init__(self, user: bytes, connection: SSHConnection, keys: Sequence[Key], agent: Optional[SSHAgentClient]):
        super().__init__(user, connection)
        self._keys = list(keys)
        self._agent = agent
        self._key: Optional[Key] = None
        self._from_agent = False
        self._algorithm = b""
        self.refused_keys = 0

    def serviceStarted(self) -> None:
        self.authenticatedWith = []
        self.triedPublicKeys = []
        self.lastPublicKey = None
        if not self.tryAuth(b"publickey"):
            self.askForAuth(b"none", b"")  # no key to offer: the failure lists what else the server takes

    def ssh_USERAUTH_FAILURE(self, packet: bytes):
        if self.lastAuth == b"publickey":
            self.refused_keys += 1
        return super().ssh_USERAUTH_FAILURE(packet)

    def getPublicKey(self) -> Optional[Key]:
        if self._keys:
            self._key, self._from_agent = self._keys.pop(0), False
            return self._key.public()
        self._key = None
        self._from_agent = self._agent is not None
        return self._agent.getPublicKey() if self._agent is not None else None

    def getPassword(self, prompt=None):
        return None

    def auth_keyboard_interactive(self) -> bool:
        return False  # a prompt nobody answers; the login fails as refused instead

    def auth_publickey(self) -> bool:
        key = self.getPublicKey()
        if key is None:
            return False
        self.lastPublicKey = key
        self.triedPublicKeys.append(key)
        self._algorithm = self._algorithm_for(key)
        if self._from_agent:
            self.askForAuth(b"publickey", b"\x00" + NS(self._algorithm) + NS(key.blob()))
        else:
            self._send_signed()
        return True

    def _algorithm_for(self, key: Key) -> bytes:
        if key.type() == "RSA":
            listed = self.transport.peerExtensions.get(b"server-sig-algs", b"").split(b",")
            for algorithm in _RSA_SHA2:
                if algorithm in listed:
                    return algorithm
        return key.sshType()

    def ssh_USERAUTH_PK_OK_publickey(self, packet: bytes) -> None:
        self._send_signed()

    def _send_signed(self) -> None:
        key, algorithm = self.lastPublicKey, self._algorithm
        signed = (
            NS(self.transport.sessionID) + bytes((MSG_USERAUTH_REQUEST,)) + NS(self.user) + NS(self.instance.name)
            + NS(b"publickey") + b"\x01" + NS(algorithm) + NS(key.blob())
        )  # fmt: skip

        def send(signature: bytes) -> None:
            self.askForAuth(b"publickey", b"\x01" + NS(algorithm) + NS(key.blob()) + NS(signature))

        def failed(failure: Failure) -> None:
            _log.warn("could not sign with the {kind} key: {reason}", kind=key.type(), reason=failure.getErrorMessage())
            self.askForAuth(b"none", b"")  # the server answers with a failure, and the next key is tried

        self._sign(key, algorithm, signed).addCallbacks(send, failed)

    def _sign(self, key: Key, algorithm: bytes, data: bytes) -> Deferred:
        if self._from_agent:
            request = NS(key.blob()) + NS(data) + struct.pack(">L", _AGENT_FLAGS.get(algorithm, 0))
            return self._agent.sendRequest(AGENTC_SIGN_REQUEST, request).addCallback(_agent_signature)
        return maybeDeferred(self._key.sign, data, signatureType=algorithm)


def _agent_signature(answer: bytes) -> bytes:
    if answer[:1] != bytes((AGENT_SIGN_RESPONSE,)):
        raise ConnectionError(f"the ssh-agent answered a signing request with message {answer[:1]!r}")
    return getNS(answer[1:])[0]


class _Connection(SSHConnection):
    """The connection service: ready once the login succeeded."""

    _log = _client_trace.logger()

    def __init__(self, ready: Deferred):
        super().__init__()
        self._ready = ready

    def serviceStarted(self) -> None:
        super().serviceStarted()
        if not self._ready.called:
            self._ready.callback(self)


class _ClientTransport(SSHClientTransport):
    """One SSH connection to the server: checks its host key, logs in, and says why it failed if it did.

    A login the server refused (every key offered was turned down, or the
    server disconnected for too many attempts) fails with ``LoginRefused``,
    which the client does not try again; a connection lost before the
    login ended fails with ``ConnectionError``, which it does, since a
    server restarting looks like that.
    """

    _log = _client_trace.logger()

    def __init__(self, endpoint: "_SSHCommandEndpoint", ready: Deferred):
        self._endpoint = endpoint
        self._ready = ready
        self._host_key_failure: Optional[Failure] = None
        self._refusal: Optional[str] = None
        self._authenticating = False
        self._agent: Optional[SSHAgentClient] = None

    def connectionMade(self) -> None:
        # Each packet leaves in the turn it is written, as the server's do (smartserve._sending).
        self.transport = sending_at_once(self.transport)
        super().connectionMade()

    def verifyHostKey(self, hostKey: bytes, fingerprint) -> Deferred:
        endpoint = self._endpoint
        address = self.transport.getPeer().host.encode("ascii")
        checked = maybeDeferred(endpoint.known_hosts).addCallback(
            lambda known_hosts: known_hosts.verifyHostKey(endpoint.ui, endpoint.host, address, Key.fromString(hostKey))
        )
        return checked.addErrback(self._remember_host_key_failure)

    def _remember_host_key_failure(self, failure: Failure) -> Failure:
        self._host_key_failure = failure
        return failure

    def connectionSecure(self) -> None:
        self._authenticating = True
        endpoint = self._endpoint
        if endpoint.agent is None:
            self._log_in()
            return
        factory = QuietFactory.forProtocol(SSHAgentClient)

        def agent_ready(agent: SSHAgentClient):
            self._agent = agent
            return agent.getPublicKeys()

        def no_agent(failure: Failure) -> None:
            _log.info("ssh-agent not used: {reason}", reason=failure.getErrorMessage())

        endpoint.agent.connect(factory).addCallback(agent_ready).addErrback(no_agent).addCallback(
            lambda _: self._log_in()
        )

    def _log_in(self) -> None:
        endpoint = self._endpoint
        user = endpoint.username.encode("utf-8")
        self.requestService(_UserAuth(user, _Connection(self._ready), endpoint.keys, self._agent))

    def sendDisconnect(self, reason: int, desc: bytes) -> None:
        if self._authenticating and reason == DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE:
            self._refusal = "the server refused the keys offered"
        super().sendDisconnect(reason, desc)

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        if self._authenticating and (
            reasonCode == DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE
            # OpenSSH's MaxAuthTries disconnects with a protocol error.
            or (reasonCode not in _GOODBYES and getattr(self.service, "refused_keys", 0))
        ):
            self._refusal = "the server refused the keys offered and disconnected: " + description.decode(
                "utf-8", "replace"
            )
        super().receiveError(reasonCode, description)

    def connectionLost(self, reason=None) -> None:
        if self._agent is not None:
            self._agent.transport.loseConnection()
        super().connectionLost(reason)
        if self._ready.called:
            return
        endpoint = self._endpoint
        if self._host_key_failure is not None:
            self._ready.errback(endpoint.host_key_error(self._host_key_failure))
        elif self._refusal is not None:
            self._ready.errback(LoginRefused(f"could not log in to {endpoint.where} as {endpoint.username!r}: {self._refusal}"))
        elif self._authenticating:
            self._ready.errback(ConnectionError(f"connection to {endpoint.where} lost while logging in"))
        else:
            self._ready.errback(reason or ConnectionError(f"connection to {endpoint.where} lost"))


class _CommandChannel(SSHChannel):
    """A session channel that runs the remote command, its stdin and stdout carried to and from a protocol.

    ``started`` fires with the protocol as soon as the server opened the
    channel and the exec request is sent, without waiting for the
    server's answer to it (as OpenSSH's client does), so the first
    request travels with the exec request and a connection costs one
    round trip less. If the server refuses the command, the protocol
    sees its connection lost with ``CommandRefused``: whatever it sent
    was never read by a command. It fails only if the server refuses the
    channel. The protocol sees the channel close as its connection lost,
    with ``ProcessTerminated`` when the command exited with a status
    other than 0 (75: a draining smartserve) or a signal.
    """

    name = b"session"
    _log = _client_trace.logger()
    eof_received = False
    """Whether the command's output ended: nothing more can come, though the channel is still open."""

    def __init__(self, command: bytes, factory, address: SSHCommandAddress, started: Deferred):
        super().__init__()
        self._command = command
        self._factory = factory
        self._address = address
        self._started = started
        self._protocol = None
        self._ended: Optional[Exception] = None

    def eofReceived(self) -> None:
        self.eof_received = True

    def openFailed(self, reason) -> None:
        self._started.errback(ConnectionError(f"the SSH server refused a session channel: {reason}"))

    def channelOpen(self, specificData: bytes) -> None:
        self.conn.sendRequest(self, b"exec", NS(self._command), wantReply=True).addErrback(self._command_refused)
        self._protocol = self._factory.buildProtocol(self._address)
        self._protocol.makeConnection(self)
        self._started.callback(self._protocol)

    def _command_refused(self, failure: Failure) -> None:
        if self.remoteClosed:
            return  # the channel or the connection ended before the answer came: not a refusal
        self._ended = CommandRefused(f"the SSH server refused to run {self._command.decode('utf-8', 'replace')!r}")
        self.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._protocol is not None:
            self._protocol.dataReceived(data)

    def extReceived(self, dataType: int, data: bytes) -> None:
        _log.info("remote command wrote to stderr: {text}", text=data.decode("utf-8", "replace").rstrip())

    def request_exit_status(self, data: bytes) -> None:
        (status,) = struct.unpack(">L", data[:4])
        if status:
            self._ended = ProcessTerminated(status)

    def request_exit_signal(self, data: bytes) -> None:
        signal_name, _ = getNS(data)
        self._ended = ProcessTerminated(None, signal_name.decode("ascii", "replace"))

    def closed(self) -> None:
        if self._protocol is not None:
            self._protocol.connectionLost(Failure(self._ended or ConnectionDone("ssh channel closed")))


@implementer(IStreamClientEndpoint)
class _SSHCommandEndpoint:
    """Each ``connect`` makes an SSH connection, logs in, and runs the remote command on a channel of it.

    The connection lives as long as the command: when the channel closes,
    or the connection is lost under it, the protocol hears of it and the
    connection is closed.
    """

    def __init__(self, tcp: IStreamClientEndpoint, target: Target, *, command: bytes, username: str, keys, agent,
                 known_path: str, ui):
        self._tcp = tcp
        self._port = target.port
        self.host = target.host.encode("idna")
        self.where = f"{target.host}:{target.port}"
        self.command = command
        self.username = username
        self.keys = keys
        self.agent = agent
        self.known_path = known_path
        self.ui = ui

    def connect(self, factory) -> Deferred:
        transport: Optional[_ClientTransport] = None

        def cancel(_) -> None:
            connecting.cancel()
            if transport is not None and transport.transport is not None:
                transport.transport.abortConnection()

        ready: Deferred = Deferred(cancel)
        transport = _ClientTransport(self, ready)
        connecting = self._tcp.connect(QuietFactory.forProtocol(lambda: transport))
        connecting.addErrback(lambda failure: None if ready.called else ready.errback(failure))

        def open_channel(connection: SSHConnection) -> Deferred:
            started: Deferred = Deferred()
            address = SSHCommandAddress(transport.transport.getPeer(), self.username.encode("utf-8"), self.command)
            connection.openChannel(_CommandChannel(self.command, factory, address, started))

            def running(protocol):
                protocol.when_closed().addCallback(lambda _: transport.transport.loseConnection())
                return protocol

            def refused(failure: Failure) -> Failure:
                transport.transport.loseConnection()
                return failure

            return started.addCallbacks(running, refused)

        return ready.addCallback(open_channel)

    def known_hosts(self) -> _PortKnownHosts:
        """The known_hosts file as it is now, read afresh for each connection as OpenSSH does.

        A missing file knows no host; one that exists but cannot be read
        raises ``HostKeyError``, where Conch would take it for an empty one
        (and trust on first use would then accept any key).
        """
        try:
            with open(self.known_path, "rb"):
                pass
        except FileNotFoundError:
            pass
        except OSError as error:
            raise HostKeyError(f"cannot read {self.known_path}: {error.strerror or error}") from None
        known_hosts = _PortKnownHosts.fromPath(FilePath(self.known_path))
        known_hosts.port = self._port
        return known_hosts

    def host_key_error(self, failure: Failure) -> Exception:
        """The ``HostKeyError`` for a host key refusal, or the failure's own error."""
        if failure.check(HostKeyError):
            return failure.value
        if failure.check(OSError):
            return HostKeyError(
                f"cannot record the host key of {self.where} in {self.known_path}: "
                f"{failure.value.strerror or failure.value}"
            )
        if failure.check(UserRejectedKey):
            return HostKeyError(
                f"host key of {self.where} is not in {self.known_path}; add it "
                "(ssh-keyscan) or allow trust on first use"
            )
        if failure.check(HostKeyChanged):
            return HostKeyError(
                f"host key of {self.where} does not match {self.known_path}: "
                "the server changed its key or someone is intercepting the connection"
            )
        return failure.value

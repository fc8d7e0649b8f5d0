"""The SSH transport and user-auth service: modern algorithms, keys only, a grace time.

Conch offers SHA-1 and CBC algorithms by default; we offer only these. The
client's preference decides among them, so order matters little; fast ones
come first. Finite-field Diffie-Hellman is left out altogether: every client
that matters speaks curve25519 or ECDH, which are faster and need no moduli.
"""

from __future__ import annotations

import socket

from twisted.conch.error import IgnoreAuthentication
from twisted.conch.ssh import transport, userauth
from twisted.conch.ssh.common import getNS
from twisted.conch.ssh.keys import BadKeyError, Key
from twisted.cred.credentials import ISSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from .._sending import sending_at_once
from ..server.caller import peer_text
from ._hostkeys import fingerprint
from ._trace import conch_logger

__all__ = [
    "CIPHERS",
    "MACS",
    "KEY_EXCHANGES",
    "USER_SIGNATURE_ALGORITHMS",
    "ServerTransport",
    "UserAuthServer",
    "host_signature_algorithms",
]

_log = Logger()

CIPHERS = [
    name
    for name in (b"aes128-ctr", b"aes256-ctr", b"aes192-ctr")
    if name in transport.SSHTransportBase.supportedCiphers
]
MACS = [b"hmac-sha2-256", b"hmac-sha2-512"]
KEY_EXCHANGES = [
    name
    for name in (
        b"curve25519-sha256",
        b"curve25519-sha256@libssh.org",
        b"mlkem768x25519-sha256",
        b"ecdh-sha2-nistp256",
        b"ecdh-sha2-nistp384",
        b"ecdh-sha2-nistp521",
    )
    if name in transport.SSHTransportBase.supportedKeyExchanges
]
# Signatures a client may log in with: no SHA-1 ``ssh-rsa``, no DSA.
USER_SIGNATURE_ALGORITHMS = [
    b"ssh-ed25519",
    b"sk-ssh-ed25519@openssh.com",
    b"ecdsa-sha2-nistp256",
    b"ecdsa-sha2-nistp384",
    b"ecdsa-sha2-nistp521",
    b"sk-ecdsa-sha2-nistp256@openssh.com",
    b"rsa-sha2-512",
    b"rsa-sha2-256",
]
_REFUSED_HOST_SIGNATURES = frozenset({b"ssh-rsa", b"ssh-dss"})
_GOODBYES = frozenset({transport.DISCONNECT_BY_APPLICATION, transport.DISCONNECT_CONNECTION_LOST})
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only
# A client may try up to --max-auth-tries logins with names of any length;
# the log line names the first few, cut short.
_REFUSALS_LOGGED = 5
_NAME_LOGGED = 64


def host_signature_algorithms(offered: list[bytes]) -> list[bytes]:
    """Return the host key signature algorithms to offer, SHA-1 and DSA removed."""
    return [name for name in offered if name not in _REFUSED_HOST_SIGNATURES]


@implementer(IPushProducer)
class ServerTransport(transport.SSHServerTransport):
    """An SSH server transport with a login grace time and a drain hook.

    ``factory`` is the ``SSHServerFactory``: it counts connections that have
    not logged in yet and gets told when this one logs in or goes away.
    """

    supportedCiphers = CIPHERS
    supportedMACs = MACS
    supportedKeyExchanges = KEY_EXCHANGES
    supportedCompressions = [b"none"]
    _log = conch_logger()

    def __init__(self):
        super().__init__()
        self.authenticated = False
        self.login_key: str | None = None  # "ssh-ed25519 SHA256:...", once logged in with it
        self.draining = False
        self._grace_timer = None
        self._timed_out = False
        self.sending_paused = False

    def makeConnection(self, transport) -> None:
        # Each packet leaves in the turn it is written (see smartserve._sending).
        super().makeConnection(sending_at_once(transport))

    # IPushProducer, for the socket: a client may grant its channels windows
    # of up to 4 GiB without reading, so the windows alone do not bound
    # what waits in the socket's buffer.

    def pauseProducing(self) -> None:
        """The socket's buffer is full: the session channels stop sending."""
        self.sending_paused = True
        self._tell_channels("socket_full")

    def resumeProducing(self) -> None:
        """The socket sent what it held: the session channels send on."""
        self.sending_paused = False
        self._tell_channels("socket_drained")

    def stopProducing(self) -> None:
        """The connection is going; its connectionLost ends the channels."""

    def _tell_channels(self, name: str) -> None:
        if not self.authenticated:
            return
        for channel in list(getattr(self.service, "channels", {}).values()):
            notify = getattr(channel, name, None)
            if notify is not None:
                notify()

    def connectionMade(self) -> None:
        if not self.factory.admits(self):
            self.transport.loseConnection()
            return
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)  # small replies must not wait for delayed ACKs
        super().connectionMade()
        self.transport.registerProducer(self, True)
        self.factory.connection_started(self)
        grace = self.factory.login_grace_time
        if grace:
            self._grace_timer = self.factory.clock.callLater(grace, self._grace_expired)

    def dataReceived(self, data: bytes) -> None:
        sent = self.outgoingPacketSequence
        super().dataReceived(data)
        if self.outgoingPacketSequence == sent:
            self._acknowledge_at_once()

    def _acknowledge_at_once(self) -> None:
        """Acknowledge what the client sent now, when no reply carries the acknowledgement.

        OpenSSH's client leaves Nagle's algorithm on for sessions without a
        terminal: when it sends two messages in a row and the first needs
        no reply (NEWKEYS during the handshake, a window adjustment before
        the next request), the second waits for the acknowledgement of the
        first, which Linux delays up to 40 ms: about half the logins took
        40 ms more. Asking for quick acknowledgement sends the pending one
        at once; a read that gets a reply at once needs nothing, its
        acknowledgement goes with the reply.
        """
        handle = getattr(self.transport, "getHandle", None)
        if _QUICKACK is None or handle is None:
            return
        try:
            handle().setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        except (OSError, AttributeError):
            pass

    def setService(self, service) -> None:
        if service.name == b"ssh-connection" and not self.authenticated:
            self.authenticated = True
            self._cancel_grace()
            self.factory.connection_authenticated(self)
        super().setService(service)

    def connectionLost(self, reason=None) -> None:
        self._cancel_grace()
        if not self.authenticated:
            self._end_of_failed_login()
        super().connectionLost(reason)
        self.factory.connection_ended(self)

    @property
    def peer(self) -> str:
        """The client's address and port, as log lines write it."""
        return peer_text(self.transport.getPeer())

    @property
    def peer_address(self) -> str:
        """The client's address without its port, which the per-address limit counts by."""
        return str(getattr(self.transport.getPeer(), "host", ""))

    def _end_of_failed_login(self) -> None:
        service = self.service
        asked_as = getattr(service, "asked_as", None)
        if asked_as is None:
            return  # it never got as far as asking to log in (a scanner, a key exchange that failed)
        if not self._timed_out:  # counted as timed out already
            self.factory.login_failed("refused")
        refused = service.refused
        if refused:
            more = refused - len(service.refusals)
            attempts = "; ".join(service.refusals) + (f"; and {more} more" if more else "")
        else:
            attempts = f"{asked_as!r} offered no key"
        _log.info(
            "{peer} left without logging in; refused: {attempts}",
            peer=self.peer,
            attempts=attempts,
            refused_logins=refused,
        )

    def sendDisconnect(self, reason: int, desc: bytes) -> None:
        # Conch's own line for this goes to the trace; a disconnect for a
        # protocol error is worth a line with the peer. Disconnects of our
        # own choosing (drain, grace time) are logged where they are chosen.
        if reason != transport.DISCONNECT_BY_APPLICATION and self.transport is not None:
            _log.info(
                "disconnecting {peer}: {description} (code {code})",
                peer=self.peer,
                description=desc.decode("utf-8", "replace"),
                code=reason,
            )
        self._unregister_from_socket()
        super().sendDisconnect(reason, desc)

    def ssh_DISCONNECT(self, packet: bytes) -> None:
        self._unregister_from_socket()
        super().ssh_DISCONNECT(packet)

    def _unregister_from_socket(self) -> None:
        # A TCP transport with a paused producer registered never closes.
        if self.transport is not None:
            self.transport.unregisterProducer()

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        # A client saying goodbye (OpenSSH sends "disconnected by user",
        # Conch "user closed connection") is the normal end of a
        # connection; the session's own line already says who ended it.
        if reasonCode in _GOODBYES:
            return
        _log.info(
            "{peer} disconnected: {description} (code {code})",
            peer=self.peer,
            code=reasonCode,
            description=description.decode("utf-8", "replace"),
        )

    def sendExtInfo(self, extensions) -> None:
        # Conch advertises its host key algorithms as the signatures it
        # accepts from users; say what the user-auth service really takes.
        extensions = [
            (name, b",".join(USER_SIGNATURE_ALGORITHMS) if name == b"server-sig-algs" else value)
            for name, value in extensions
        ]
        super().sendExtInfo(extensions)

    def open_channels(self) -> int:
        """How many channels are open on this connection."""
        if not self.authenticated:
            return 0
        return len(getattr(self.service, "channels", ()))

    def drain(self) -> None:
        """Disconnect once no channel is open: now, or when the last one closes.

        A connection still logging in is left to finish (the grace time
        bounds it): its session then meets the draining smart server, which
        answers or ends it with exit status 75, instead of a cut handshake.
        """
        self.draining = True
        if not self.authenticated:
            return
        for channel in list(getattr(self.service, "channels", {}).values()):
            if getattr(channel, "client", True) is None:
                channel.loseConnection()  # a session channel that runs nothing yet
        if not self.open_channels():
            self.disconnect_with(b"the server is restarting; try again")

    def disconnect_with(self, message: bytes) -> None:
        """Send an SSH disconnect with ``message`` and close the connection."""
        if self.transport is not None and not self.transport.disconnecting:
            self.sendDisconnect(transport.DISCONNECT_BY_APPLICATION, message)

    def _grace_expired(self) -> None:
        self._grace_timer = None
        self._timed_out = True
        self.factory.login_failed("timed_out")
        _log.info("{peer} did not log in within the grace time", peer=self.peer)
        self.disconnect_with(b"login grace time exceeded")

    def _cancel_grace(self) -> None:
        if self._grace_timer is not None and self._grace_timer.active():
            self._grace_timer.cancel()
        self._grace_timer = None


class UserAuthServer(userauth.SSHUserAuthServer):
    """The user-auth service: public keys only, never a SHA-1 or DSA signature.

    The transport's grace timer bounds the whole login, so this service's
    own timeout uses the same clock and length. A client is disconnected
    after the factory's ``max_auth_tries`` refused attempts (sshd's
    MaxAuthTries), so that one connection cannot try keys without end.
    """

    interfaceToMethod = {ISSHPrivateKey: b"publickey"}
    _log = conch_logger()

    def __init__(self):
        super().__init__()
        self.asked_as: str | None = None  # the user name of the first login request
        self.refused = 0
        self.refusals: list[str] = []  # the first few, for the log

    def serviceStarted(self) -> None:
        factory = self.transport.factory
        self.clock = factory.clock
        self.loginTimeout = factory.login_grace_time or self.loginTimeout
        # Conch disconnects once more than this many attempts failed; each
        # key a client offers and the server refuses is one, as in sshd.
        self.attemptsBeforeDisconnect = factory.max_auth_tries - 1
        super().serviceStarted()

    def tryAuth(self, kind: bytes, user: bytes, data: bytes):
        if self.asked_as is None:
            self.asked_as = _name_for_log(user)
        attempt = super().tryAuth(kind, user, data)
        if kind == b"publickey":
            attempt.addCallback(self._note_login_key, data)
        if kind != b"none":  # clients ask with "none" which methods there are
            attempt.addErrback(self._note_refusal, user, kind)
        return attempt

    def _note_login_key(self, result, data: bytes):
        """Remember which key logged in, for the session lines (as sshd's "Accepted publickey")."""
        blob = getNS(data[1:], 2)[1]
        try:
            key = Key.fromString(blob)
        except (BadKeyError, ValueError):  # a custom checker accepted what Conch cannot parse
            self.transport.login_key = "unparsed key"
        else:
            self.transport.login_key = f"{key.sshType().decode('ascii', 'replace')} {fingerprint(key)}"
        return result

    def _note_refusal(self, reason, user: bytes, kind: bytes):
        """Remember why a login attempt failed, for the line logged if the client never logs in."""
        if reason.check(IgnoreAuthentication):  # a key the client may go on to sign with
            return reason
        self.refused += 1
        if len(self.refusals) < _REFUSALS_LOGGED:
            self.refusals.append(f"{_name_for_log(user)!r} by {_name_for_log(kind)}: {reason.getErrorMessage()}")
        return reason

    def auth_publickey(self, packet: bytes):
        algorithm = getNS(packet[1:])[0]
        if algorithm not in USER_SIGNATURE_ALGORITHMS:
            return defer.fail(UnauthorizedLogin(f"signature algorithm {algorithm!r} refused"))
        return super().auth_publickey(packet)


def _name_for_log(name: bytes) -> str:
    """A user or method name a client sent, cut to ``_NAME_LOGGED`` bytes, as text for a log line."""
    return name[:_NAME_LOGGED].decode("utf-8", "replace")

"""The logged-in user: one avatar per SSH connection, and the realm that makes it."""

from __future__ import annotations

from twisted.conch.avatar import ConchUser
from twisted.conch.interfaces import IConchUser, ISession
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.logger import Logger
from twisted.python import components
from zope.interface import implementer

from ..server.caller import peer_text
from ._session import SessionChannel, SmartSession
from ._username import is_valid_username

__all__ = ["SmartUser", "SmartRealm"]

_log = Logger()


class SmartUser(ConchUser):
    """A user who may open session channels and nothing else.

    No port forwarding (``tcpip-forward`` or ``direct-tcpip``), no agent or
    X11 channels, no subsystems: only ``session`` is in the channel table and
    every global request is refused. ``server`` is the ``SSHServerFactory``
    holding the smart factory, access policy and limits.
    """

    def __init__(self, username: str, server):
        super().__init__()
        self.username = username
        self.server = server
        self.channelLookup = {b"session": SessionChannel}

    @property
    def peer(self) -> str:
        """The client's address as ``host:port``."""
        return peer_text(self.conn.transport.transport.getPeer())

    @property
    def login_key(self) -> str:
        """The key the user logged in with, as ``ssh-ed25519 SHA256:...``."""
        return getattr(self.conn.transport, "login_key", None) or "unknown key"

    def gotGlobalRequest(self, requestType: bytes, data: bytes) -> int:
        _log.info(
            "{user} sent global request {request!r}; refused",
            user=self.username,
            request=requestType,
        )
        return 0

    def lookupSubsystem(self, subsystem: bytes, data: bytes):
        return None


components.registerAdapter(SmartSession, SmartUser, ISession)


@implementer(IRealm)
class SmartRealm:
    """Makes a ``SmartUser`` for each login; avatar ids are user names.

    A checker plugged in by the operator may return any avatar id: one that
    is not a valid user name is refused here, since it becomes a path.
    """

    def __init__(self, server):
        self.server = server

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IConchUser not in interfaces:
            raise NotImplementedError("only SSH logins are supported")
        try:
            username = avatarId.decode("utf-8") if isinstance(avatarId, bytes) else avatarId
        except UnicodeDecodeError:
            raise UnauthorizedLogin("user name is not UTF-8") from None
        if not is_valid_username(username):
            raise UnauthorizedLogin(f"invalid user name {username!r}")
        return IConchUser, SmartUser(username, self.server), lambda: None

"""The credentials checker that lets a user in with a key from a key store."""

from __future__ import annotations

import struct

from twisted.conch.error import ValidPublicKey
from twisted.conch.ssh.keys import BadKeyError, Key
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ISSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from ._hostkeys import fingerprint
from ._interfaces import IKeyStore

__all__ = ["PublicKeyChecker"]


@implementer(ICredentialsChecker)
class PublicKeyChecker:
    """Accept a user whose key is in an ``IKeyStore`` and who proves holding it.

    Unlike Conch's ``SSHPublicKeyChecker``, the key is looked up before the
    client is told it may sign with it, so a client probing with a key that
    is not authorized gets a plain failure, not an invitation to sign. The
    avatar id is the user name as bytes, as Conch's checkers return it.
    """

    credentialInterfaces = (ISSHPrivateKey,)

    def __init__(self, store: IKeyStore):
        self.store = store

    def requestAvatarId(self, credentials: ISSHPrivateKey) -> Deferred[bytes]:
        """Check ``credentials`` against the store.

        Fails with ``UnauthorizedLogin`` for an unknown user, a key that is
        not the user's or a bad signature, and with Conch's ``ValidPublicKey``
        when the key is the user's but no signature was sent yet.
        """
        try:
            username = credentials.username.decode("utf-8")
            offered = Key.fromString(credentials.blob)
        except (UnicodeError, BadKeyError, ValueError, IndexError, struct.error):
            return fail(UnauthorizedLogin("malformed user name or key"))
        if not any(offered == known for known in self.store.authorized_keys(username)):
            # Named as OpenSSH names it, so an operator can tell a removed key from a stranger's.
            return fail(UnauthorizedLogin(f"{offered.type()} key {fingerprint(offered)} not authorized for this user"))
        if credentials.signature is None:
            return fail(ValidPublicKey())
        try:
            verified = offered.verify(credentials.signature, credentials.sigData)
        except Exception:
            verified = False
        if not verified:
            return fail(UnauthorizedLogin("bad signature"))
        return succeed(credentials.username)

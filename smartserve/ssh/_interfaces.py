"""The seams of the SSH front end that have more than one implementation."""

from __future__ import annotations

from zope.interface import Interface

__all__ = ["IKeyStore"]


class IKeyStore(Interface):
    """Where the public keys a user may log in with are kept."""

    def authorized_keys(username):
        """
        Return the public keys that may log in as ``username``.

        ``username`` is a ``str``.  The result is a sequence of
        ``twisted.conch.ssh.keys.Key`` (public keys), empty for an unknown or
        invalid user name.  Never raises for a missing or malformed entry: a
        broken entry is logged and yields no key.
        """

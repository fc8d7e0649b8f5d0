"""Key stores: users' public keys, from a folder or from memory."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping, Sequence

from twisted.conch.ssh.keys import BadKeyError, Key
from twisted.logger import Logger
from zope.interface import implementer

from ._files import NotASmallFile, read_small_file
from ._interfaces import IKeyStore
from ._username import is_valid_username

__all__ = ["KeyFolder", "MemoryKeyStore", "parse_public_keys"]

_log = Logger()

# A user's key file larger than this is ignored: a few thousand keys at most.
MAX_KEY_FILE_BYTES = 1 << 20

# DSA is broken; RSA keys shorter than this are refused as OpenSSH does.
_MIN_RSA_BITS = 2048


def _refusal(key: Key) -> str | None:
    """Return why ``key`` may not be used to log in, or None if it may."""
    if key.type() == "DSA":
        return "DSA keys are not accepted"
    if key.type() == "RSA" and key.size() < _MIN_RSA_BITS:
        return f"RSA keys shorter than {_MIN_RSA_BITS} bits are not accepted"
    return None


def _holds_private_key(text: str) -> bool:
    """Whether ``text`` looks like a private key file: PEM or OpenSSH armour, or PuTTY's format."""
    return "PRIVATE KEY-----" in text or text.lstrip().startswith("PuTTY-User-Key-File")


def parse_public_keys(text: str, source: str) -> list[Key]:
    """Parse OpenSSH public key lines, one key per line.

    Blank lines and lines starting with ``#`` are skipped. A line that is not
    a public key, or a key of a refused kind, is logged with ``source`` and
    its line number and skipped, so one bad line does not lock a user out.
    A private key put there by mistake is refused whole, logged once; no
    log line quotes what a line holds, which could be secret.
    """
    if _holds_private_key(text):
        _log.warn(
            "{source}: holds a private key; ignored (remove it, and treat that key as exposed)", source=source
        )
        return []
    keys: list[Key] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = Key.fromString(line.encode("utf-8"))
        except (BadKeyError, ValueError, IndexError, UnicodeError, struct.error):
            _log.warn("{source}:{line}: not an OpenSSH public key line; ignored", source=source, line=number)
            continue
        if not key.isPublic():
            _log.warn("{source}:{line}: a private key; ignored", source=source, line=number)
            continue
        reason = _refusal(key)
        if reason is not None:
            _log.warn("{source}:{line}: {reason}", source=source, line=number, reason=reason)
            continue
        keys.append(key)
    return keys


@implementer(IKeyStore)
class KeyFolder:
    """Keys from ``<folder>/<username>.pub``, re-read when the file changes.

    Each lookup costs one ``stat`` of that user's file; the file is parsed
    again only when its modification time, size or inode changed, so keys
    can be added, replaced or removed without a restart. Anything but a
    regular file of at most ``MAX_KEY_FILE_BYTES`` (a FIFO, a device, a
    folder), or one the server may not read, authorizes no key and is
    logged once per change.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self._cache: dict[str, tuple[tuple[int, int, int], list[Key]]] = {}

    def authorized_keys(self, username: str) -> Sequence[Key]:
        """See ``IKeyStore.authorized_keys``."""
        if not is_valid_username(username):
            return ()
        path = os.path.join(self.folder, username + ".pub")
        try:
            info = os.stat(path)
        except FileNotFoundError:
            self._cache.pop(username, None)
            return ()
        except OSError as error:
            _log.error("cannot read {path}: {error}", path=path, error=str(error))
            return ()
        signature = (info.st_mtime_ns, info.st_size, info.st_ino)
        cached = self._cache.get(username)
        if cached is not None and cached[0] == signature:
            return cached[1]
        try:
            _, data = read_small_file(path, MAX_KEY_FILE_BYTES, info)
        except NotASmallFile as error:
            _log.error("ignoring {path}: {why}", path=path, why=str(error))
            keys = []
        except OSError as error:
            # Logged once per change of the file, as above, not at every login attempt.
            _log.error("cannot read {path}: {error}", path=path, error=error.strerror or str(error))
            keys = []
        else:
            keys = parse_public_keys(data.decode("utf-8", errors="replace"), path)
        self._cache[username] = (signature, keys)
        return keys


@implementer(IKeyStore)
class MemoryKeyStore:
    """Keys held in a mapping of user name to keys; for tests and embedding."""

    def __init__(self, keys: Mapping[str, Iterable[Key]] | None = None):
        self._keys: dict[str, list[Key]] = {
            name: list(user_keys) for name, user_keys in (keys or {}).items()
        }

    def add(self, username: str, key: Key) -> None:
        """Let ``key`` log in as ``username`` from now on."""
        self._keys.setdefault(username, []).append(key)

    def authorized_keys(self, username: str) -> Sequence[Key]:
        """See ``IKeyStore.authorized_keys``."""
        return tuple(self._keys.get(username, ()))

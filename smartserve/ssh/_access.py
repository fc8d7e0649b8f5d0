"""Who may write where: the access file and the policy built from it.

Every authenticated user may read everything under the served root and, by
default, write under ``/~<user>/``. The access file (format in
``doc/access.md``) grants more prefixes or makes a user read-only. Each line
is ``<user> read-only`` or ``<user> write <prefix>...``; the user ``*``
stands for every user who has no line of their own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from twisted.logger import Logger

from ._exceptions import AccessFileError, SSHSetupError
from ._files import read_small_file
from ._username import is_valid_username

__all__ = ["Rights", "AccessRules", "AccessPolicy", "parse_access", "home_prefix"]

_log = Logger()

DEFAULT_USER = "*"

# An access file larger than this is refused: tens of thousands of rules.
MAX_ACCESS_FILE_BYTES = 1 << 20


def home_prefix(username: str) -> str:
    """Return the client path prefix every user may write under by default."""
    return f"/~{username}/"


@dataclass(frozen=True)
class Rights:
    """What one user may do: nothing but read, or write under these prefixes.

    A prefix of ``/`` means everywhere. Prefixes are client paths starting
    and ending with ``/``.
    """

    read_only: bool = False
    write_prefixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Grant:
    """One user's lines in the access file, merged."""

    read_only: bool = False
    extra_prefixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class AccessRules:
    """The parsed access file: grants by user name, and the ``*`` default."""

    grants: dict[str, _Grant] = field(default_factory=dict)

    def rights_for(self, username: str) -> Rights:
        """Return ``username``'s rights: its own lines, else ``*``'s, else the default."""
        grant = self.grants.get(username) or self.grants.get(DEFAULT_USER) or _Grant()
        if grant.read_only:
            return Rights(read_only=True)
        prefixes = (home_prefix(username),) + tuple(
            prefix for prefix in grant.extra_prefixes if prefix != home_prefix(username)
        )
        return Rights(read_only=False, write_prefixes=prefixes)


def parse_access(text: str, path: str = "<access>") -> AccessRules:
    """Parse the text of an access file.

    Raises ``AccessFileError`` naming ``path`` and the line number for an
    invalid user name, an unknown keyword, a bad prefix, ``write`` with no
    prefix, or a user who is both ``read-only`` and granted ``write``.
    """
    grants: dict[str, _Grant] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        user, *rest = words
        if user != DEFAULT_USER and not is_valid_username(user):
            raise AccessFileError(path, number, f"invalid user name {user!r}")
        if not rest:
            raise AccessFileError(path, number, "expected 'read-only' or 'write <prefix>...'")
        keyword, *prefixes = rest
        previous = grants.get(user, _Grant())
        if keyword == "read-only":
            if prefixes:
                raise AccessFileError(path, number, "'read-only' takes no prefixes")
            if previous.extra_prefixes:
                raise AccessFileError(path, number, f"{user} is both read-only and granted write")
            grants[user] = _Grant(read_only=True)
        elif keyword == "write":
            if not prefixes:
                raise AccessFileError(path, number, "'write' needs at least one prefix")
            if previous.read_only:
                raise AccessFileError(path, number, f"{user} is both read-only and granted write")
            normalized = tuple(_normalize_prefix(prefix, path, number) for prefix in prefixes)
            merged = previous.extra_prefixes + tuple(
                prefix for prefix in normalized if prefix not in previous.extra_prefixes
            )
            grants[user] = _Grant(extra_prefixes=merged)
        else:
            raise AccessFileError(
                path, number, f"unknown keyword {keyword!r} (expected 'read-only' or 'write')"
            )
    return AccessRules(grants)


def _normalize_prefix(prefix: str, path: str, number: int) -> str:
    """Return ``prefix`` ending in ``/``; raise ``AccessFileError`` if it is unsafe."""
    if not prefix.startswith("/"):
        raise AccessFileError(path, number, f"prefix {prefix!r} must start with '/'")
    if "%" in prefix or "\\" in prefix:
        raise AccessFileError(path, number, f"prefix {prefix!r} may not contain '%' or '\\'")
    segments = prefix.strip("/").split("/") if prefix != "/" else []
    if any(segment in ("", ".", "..") for segment in segments):
        raise AccessFileError(
            path, number, f"prefix {prefix!r} has an empty, '.' or '..' segment"
        )
    return prefix if prefix.endswith("/") else prefix + "/"


class AccessPolicy:
    """The rights of each user, from an optional access file kept up to date.

    With no file everyone gets the defaults. With a file, it is parsed at
    once (an error is fatal at startup: ``AccessFileError``, or
    ``SSHSetupError`` for a file that cannot be read or is not a regular
    file of at most ``MAX_ACCESS_FILE_BYTES``) and parsed again whenever its
    modification time or size changes; a file that turns invalid or
    disappears later is logged and the last valid rules stay in force.
    """

    def __init__(self, path: str | None = None):
        self.path = path
        self._signature: tuple[int, int, int] | None = None
        self._rules = AccessRules()
        self._unreadable: str | None = None
        if path is not None:
            self._signature, self._rules = self._load(path)

    def rights_for(self, username: str) -> Rights:
        """Return ``username``'s current rights."""
        if self.path is not None:
            self._refresh(self.path)
        return self._rules.rights_for(username)

    def _refresh(self, path: str) -> None:
        """Reload the file if it changed since it was last read."""
        try:
            info = os.stat(path)
        except OSError as error:
            # Logged once, not at every login, until the file is back.
            if str(error) != self._unreadable:
                self._unreadable = str(error)
                _log.error(
                    "access file {path} unreadable ({error}); keeping the last rules",
                    path=path,
                    error=str(error),
                )
            return
        self._unreadable = None
        signature = (info.st_mtime_ns, info.st_size, info.st_ino)
        if signature == self._signature:
            return
        # Remember a broken version too, so it is reported once, not per login.
        self._signature = signature
        try:
            self._signature, self._rules = self._load(path)
        except SSHSetupError as error:
            _log.error("{error}; keeping the last valid access rules", error=str(error))
        else:
            _log.info("access file {path} reloaded", path=path)

    @staticmethod
    def _load(path: str) -> tuple[tuple[int, int, int], AccessRules]:
        """Read and parse ``path``; return its stat signature and rules.

        Raises ``AccessFileError`` for bad contents, ``SSHSetupError`` for a
        file that cannot be read or is not a small regular file.
        """
        try:
            info, data = read_small_file(path, MAX_ACCESS_FILE_BYTES)
        except OSError as error:
            raise SSHSetupError(f"cannot read the access file {path}: {error.strerror}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            line = data.count(b"\n", 0, error.start) + 1
            raise AccessFileError(path, line, "not UTF-8 text") from None
        return (info.st_mtime_ns, info.st_size, info.st_ino), parse_access(text, path)

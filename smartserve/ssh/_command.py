"""Which exec commands start the smart server.

Over ``bzr+ssh://``, Breezy runs ``<remote path> serve --inet --directory=/
--allow-writes`` on the server, where the remote path is ``bzr`` unless the
user set ``BRZ_REMOTE_PATH`` or ``bzr_remote_path``. OpenSSH joins the words
with spaces, so the command arrives as one string that we split as a shell
would. Anything else is refused.
"""

from __future__ import annotations

import posixpath
import shlex
from dataclasses import dataclass

from ._exceptions import CommandRefused

__all__ = ["ServeCommand", "parse_serve_command"]

_PROGRAMS = frozenset({"bzr", "brz"})


@dataclass(frozen=True)
class ServeCommand:
    """A request for the smart server; read-only unless ``allow_writes``."""

    allow_writes: bool


def parse_serve_command(command: bytes) -> ServeCommand:
    """Parse an exec request into a ``ServeCommand``.

    Accepted: ``bzr`` or ``brz`` (bare or as an absolute path), then
    ``serve``, then ``--inet``, ``--directory=/`` (or ``--directory /``) and
    optionally ``--allow-writes``, in any order. Raises ``CommandRefused``,
    whose message is one line for the client's stderr, for anything else.
    """
    try:
        words = shlex.split(command.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise CommandRefused(_ONLY_SERVE) from None
    if len(words) < 2 or words[1] != "serve" or not _is_serve_program(words[0]):
        raise CommandRefused(_ONLY_SERVE)
    inet = allow_writes = False
    directory = None
    options = iter(words[2:])
    for option in options:
        if option == "--inet":
            inet = True
        elif option == "--allow-writes":
            allow_writes = True
        elif option.startswith("--directory="):
            directory = option.partition("=")[2]
        elif option == "--directory":
            directory = next(options, None)
        else:
            raise CommandRefused(f"smartserve: unsupported option {option!r} for serve")
    if not inet:
        raise CommandRefused("smartserve: only 'serve --inet' is supported")
    if directory != "/":
        raise CommandRefused("smartserve: serve needs --directory=/ (the served root)")
    return ServeCommand(allow_writes=allow_writes)


def _is_serve_program(word: str) -> bool:
    """Return whether ``word`` names bzr or brz, bare or by absolute path."""
    if "/" not in word:
        return word in _PROGRAMS
    return word.startswith("/") and posixpath.basename(word) in _PROGRAMS


_ONLY_SERVE = (
    "smartserve: this server only runs the Breezy smart server; "
    "use a bzr+ssh:// URL with brz"
)

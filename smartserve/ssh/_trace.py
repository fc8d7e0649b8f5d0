"""The server's share of Conch's log lines: the trace ``--ssh-debug`` turns on.

smartserve's own lines (sessions, refused logins and requests) do not go
through it; see ``smartserve._conch_trace``.
"""

from __future__ import annotations

from twisted.logger import Logger

from .._conch_trace import ConchTrace

__all__ = ["conch_logger", "show_conch_trace"]

_server_trace = ConchTrace()


def conch_logger() -> Logger:
    """A ``_log`` for a server-side subclass of a Conch class."""
    return _server_trace.logger()


def show_conch_trace(enabled: bool) -> None:
    """Let all of Conch's server-side lines through (``--ssh-debug``), or only its warnings and errors."""
    _server_trace.show(enabled)

"""Conch's own log lines: a protocol trace that stays out of the log unless asked for.

Conch logs each step of each connection (key exchange, every
authentication attempt, channel requests, opens and closes): about fifteen
lines per login, at debug and info level, which bury the lines an operator
reads and took about a third of the server's CPU per login. smartserve's
subclasses of Conch's classes log Conch's lines through ``conch_logger``,
which passes warnings and errors only, unless ``show_conch_trace`` turned
the trace on (``--ssh-debug``). smartserve's own lines (sessions, refused
logins and requests) do not go through it.
"""

from __future__ import annotations

from twisted.logger import ILogObserver, LogLevel, Logger, globalLogPublisher
from zope.interface import implementer

__all__ = ["conch_logger", "show_conch_trace"]


@implementer(ILogObserver)
class _ConchLines:
    """Forwards an event of Conch's to the global log if its level is high enough."""

    def __init__(self) -> None:
        self.lowest = LogLevel.warn

    def __call__(self, event: dict) -> None:
        if event.get("log_level", LogLevel.critical) >= self.lowest:
            globalLogPublisher(event)


_conch_lines = _ConchLines()


def conch_logger() -> Logger:
    """A ``_log`` for a subclass of a Conch class, so that Conch's lines go through the filter."""
    return Logger(observer=_conch_lines)


def show_conch_trace(enabled: bool) -> None:
    """Let all of Conch's lines through (``--ssh-debug``), or only its warnings and errors."""
    _conch_lines.lowest = LogLevel.debug if enabled else LogLevel.warn

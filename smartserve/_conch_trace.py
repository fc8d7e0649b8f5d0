"""Conch's own log lines: a protocol trace that stays out of the log unless asked for.

Conch logs each step of each SSH connection (key exchange, every
authentication attempt, channel requests, opens and closes): about fifteen
lines per login, at debug and info level, which bury the lines people read.
smartserve's subclasses of Conch's classes log Conch's lines through a
``ConchTrace``, which passes warnings and errors only unless its trace was
turned on. The server and the client each have their own.
"""

from __future__ import annotations

from twisted.logger import ILogObserver, LogLevel, Logger, globalLogPublisher
from zope.interface import implementer

__all__ = ["ConchTrace"]


@implementer(ILogObserver)
class ConchTrace:
    """Forwards an event of Conch's to the global log if its level is high enough."""

    def __init__(self) -> None:
        self.lowest = LogLevel.warn

    def __call__(self, event: dict) -> None:
        if event.get("log_level", LogLevel.critical) >= self.lowest:
            globalLogPublisher(event)

    def logger(self) -> Logger:
        """A ``_log`` for a subclass of a Conch class, so that Conch's lines go through this filter."""
        return Logger(observer=self)

    def show(self, enabled: bool) -> None:
        """Let all of Conch's lines through, or only its warnings and errors."""
        self.lowest = LogLevel.debug if enabled else LogLevel.warn

"""The SSH front end's errors."""

from __future__ import annotations

__all__ = ["SSHSetupError", "HostKeyError", "AccessFileError", "CommandRefused"]


class SSHSetupError(Exception):
    """The SSH front end cannot start with the configuration it was given."""


class HostKeyError(SSHSetupError):
    """A host key file is missing, unreadable, or of an algorithm we refuse."""


class AccessFileError(SSHSetupError):
    """The access file is malformed; the message names the file and line."""

    def __init__(self, path: str, line_number: int, message: str):
        super().__init__(f"{path}:{line_number}: {message}")
        self.path = path
        self.line_number = line_number


class CommandRefused(Exception):
    """An exec request asked for something other than the smart server.

    ``str(error)`` is the one line written to the client's stderr.
    """

"""The protocol's errors: who broke the rule, and what to tell the peer."""

from __future__ import annotations

import reprlib
from typing import Any, Optional, Tuple

__all__ = [
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "LimitExceeded",
    "UnsupportedProtocolVersion",
]


_BRIEF = reprlib.Repr()
_BRIEF.maxlevel = 4
_BRIEF.maxother = 80


def brief(value: Any) -> str:
    """A short repr of ``value`` for an error message.

    Its depth and length are bounded, so a peer's deeply nested structure
    cannot make the message itself fail (``repr`` recurses once per level).
    """
    return _BRIEF.repr(value)[:80]


class ProtocolError(Exception):
    """The smart protocol's rules were broken.

    ``error_args`` is the v3 error tuple a server sends back for it.
    """

    def __init__(self, message: str, error_args: Optional[Tuple[Any, ...]] = None):
        super().__init__(message)
        self.error_args = error_args or (b"error", message.encode("utf-8", "replace"))


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class LimitExceeded(RemoteProtocolError):
    """The peer went over one of the configured limits.

    A part announcing a size over its limit is refused as soon as the
    length prefix is read, before the part is buffered; bytes sent ahead of
    an answer, as soon as there are too many.
    """

    def __init__(self, limit: str, size: int, maximum: int):
        super().__init__(
            f"{limit} of {size} bytes exceeds the limit of {maximum} bytes"
        )
        self.limit = limit
        self.size = size
        self.maximum = maximum


class UnsupportedProtocolVersion(RemoteProtocolError):
    """The peer speaks protocol version 1 or 2.

    ``reply`` is the error answer in that version's own format.
    """

    def __init__(self, version: int, reply: bytes):
        super().__init__(
            f"smart protocol version {version} is not supported; "
            "use version 3 (bzr 1.6 or later)"
        )
        self.version = version
        self.reply = reply

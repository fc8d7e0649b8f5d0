"""The events of Breezy's smart protocol version 3.

A message is one ``Request`` (client to server) or one ``Response`` (server
to client), then any number of ``BodyChunk`` events, optionally one
``BodyError``, then ``EndOfMessage``. ``ConnectionClosed`` is the peer's EOF
at a message boundary. The same classes describe what is received and what
is sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Tuple, Union

__all__ = [
    "Event",
    "Request",
    "Response",
    "BodyChunk",
    "BodyError",
    "EndOfMessage",
    "ConnectionClosed",
]


@dataclass(frozen=True, slots=True)
class Request:
    """A request's arguments: ``args[0]`` is the verb, as bytes."""

    args: Tuple[Any, ...]
    headers: Mapping[bytes, Any] = field(default_factory=dict)

    @property
    def verb(self) -> bytes:
        """The verb this request calls."""
        return self.args[0]


@dataclass(frozen=True, slots=True)
class Response:
    """A response's status and arguments.

    ``success`` is False for an error response; its ``args`` are then the
    error tuple, whose first element names the error.
    """

    args: Tuple[Any, ...]
    success: bool = True
    headers: Mapping[bytes, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BodyChunk:
    """One body part. A body sent in one piece is a single chunk."""

    data: bytes


@dataclass(frozen=True, slots=True)
class BodyError:
    """An error in the middle of a body stream; only the end may follow."""

    args: Tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    """The end of the current message."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its side of the connection between two messages."""


Event = Union[Request, Response, BodyChunk, BodyError, EndOfMessage, ConnectionClosed]

"""A sans-IO codec for Breezy's smart protocol version 3.

Nothing here does I/O or imports Twisted: a ``Connection`` turns received
bytes into events and events into bytes to send, for either role.
"""

from ._connection import NEED_DATA, PAUSED, Connection
from ._events import (
    BodyChunk,
    BodyError,
    ConnectionClosed,
    EndOfMessage,
    Event,
    Request,
    Response,
)
from ._exceptions import (
    LimitExceeded,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    UnsupportedProtocolVersion,
)
from ._collect import BodyCollector
from ._limits import DEFAULT_LIMITS, Limits
from ._state import Role, State
from ._wire import MAX_PART_SIZE, MESSAGE_MARKER, REQUEST_TOO_LARGE, SERVER_BUSY, SERVER_DRAINING, TOO_MANY_CONNECTIONS
from ._writers import error_response

__all__ = [
    "Connection",
    "NEED_DATA",
    "PAUSED",
    "Role",
    "State",
    "Limits",
    "DEFAULT_LIMITS",
    "MESSAGE_MARKER",
    "MAX_PART_SIZE",
    "TOO_MANY_CONNECTIONS",
    "SERVER_DRAINING",
    "REQUEST_TOO_LARGE",
    "SERVER_BUSY",
    "error_response",
    "BodyCollector",
    "Event",
    "Request",
    "Response",
    "BodyChunk",
    "BodyError",
    "EndOfMessage",
    "ConnectionClosed",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "LimitExceeded",
    "UnsupportedProtocolVersion",
]

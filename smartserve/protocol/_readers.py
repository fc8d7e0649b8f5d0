"""Turning received bytes into events, one message part at a time.

A ``MessageReader`` knows the grammar of the messages one role sends::

    request   = MARKER headers args body
    response  = MARKER headers status args body
    body      = *(bytes) [status-error error-args | status-success] end

It works on a ``ReceiveBuffer`` and only consumes a part once all of its
bytes are there; a length prefix over the limits is refused as soon as its
four bytes have arrived.
"""

from __future__ import annotations

import enum
from typing import Optional

from fastbencode import bdecode_as_tuple

from ._events import BodyChunk, BodyError, EndOfMessage, Event, Request, Response
from ._exceptions import LimitExceeded, RemoteProtocolError, UnsupportedProtocolVersion
from ._limits import Limits
from ._receivebuffer import ReceiveBuffer
from ._state import Role
from ._wire import (
    LENGTH,
    MESSAGE_MARKER,
    PART_BYTES,
    PART_END,
    PART_STATUS,
    PART_STRUCTURE,
    STATUS_ERROR,
    STATUS_SUCCESS,
    V2_REQUEST_MARKER,
    V2_RESPONSE_MARKER,
)

__all__ = ["MessageReader"]

_MARKER_LEN = len(MESSAGE_MARKER)
_unpack_length = LENGTH.unpack_from


class _Expect(enum.Enum):
    """The next part a reader waits for."""

    MARKER = "marker"
    HEADERS = "headers"
    STATUS = "status"
    ARGS = "args"
    BODY = "body"
    ERROR_ARGS = "error args"
    END = "end"
    NOTHING = "nothing"


class MessageReader:
    """Reads the messages sent by ``sender``, part by part."""

    __slots__ = ("_sender", "_limits", "_expect", "_headers", "_success")

    def __init__(self, sender: Role, limits: Limits):
        self._sender = sender
        self._limits = limits
        self._expect = _Expect.MARKER
        self._headers: dict = {}
        self._success = True

    @property
    def between_messages(self) -> bool:
        """True when no part of a message has been consumed yet."""
        return self._expect is _Expect.MARKER

    def reset(self) -> None:
        """Get ready for the next message."""
        self._expect = _Expect.MARKER

    def read(self, buf: ReceiveBuffer) -> Optional[Event]:
        """Consume parts from ``buf`` until one makes an event.

        Returns None when ``buf`` does not yet hold a whole part, and raises
        ``RemoteProtocolError`` for bytes the grammar does not allow.
        """
        while True:
            expect = self._expect
            if expect is _Expect.BODY:
                return self._read_body_part(buf)
            if expect is _Expect.MARKER:
                if not self._read_marker(buf):
                    return None
            elif expect is _Expect.HEADERS:
                headers = self._read_structure(buf, self._limits.max_headers_size, "headers")
                if headers is None:
                    return None
                if not isinstance(headers, dict):
                    raise RemoteProtocolError(f"message headers are not a dict: {headers!r:.80}")
                self._headers = headers
                self._expect = _Expect.ARGS if self._sender is Role.CLIENT else _Expect.STATUS
            elif expect is _Expect.STATUS:
                status = self._read_status(buf)
                if status is None:
                    return None
                self._success = status
                self._expect = _Expect.ARGS
            elif expect is _Expect.ARGS:
                return self._read_args(buf)
            elif expect is _Expect.ERROR_ARGS:
                args = self._read_tagged_structure(buf, "error arguments")
                if args is None:
                    return None
                self._expect = _Expect.END
                return BodyError(_as_args(args, "error arguments"))
            elif expect is _Expect.END:
                if not buf:
                    return None
                kind = buf.byte_at(0)
                if kind != PART_END:
                    raise RemoteProtocolError(f"expected the end of the message, got part {bytes([kind])!r}")
                buf.consume(1)
                self._expect = _Expect.NOTHING
                return EndOfMessage()
            else:
                return None

    def _read_marker(self, buf: ReceiveBuffer) -> bool:
        available = len(buf)
        if available >= _MARKER_LEN:
            if buf.startswith(MESSAGE_MARKER):
                buf.consume(_MARKER_LEN)
                self._expect = _Expect.HEADERS
                return True
        elif MESSAGE_MARKER.startswith(buf.slice(0, available)):
            return False
        return self._reject_marker(buf)

    def _reject_marker(self, buf: ReceiveBuffer) -> bool:
        """Raise the error for a wrong marker, or wait for more of a v2 one."""
        head = buf.slice(0, _MARKER_LEN)
        if self._sender is Role.CLIENT:
            if V2_REQUEST_MARKER.startswith(head[: len(V2_REQUEST_MARKER)]):
                if len(head) < len(V2_REQUEST_MARKER):
                    return False
                raise UnsupportedProtocolVersion(2, _legacy_error_reply(2))
            raise UnsupportedProtocolVersion(1, _legacy_error_reply(1))
        if head.startswith(V2_RESPONSE_MARKER[: len(head)]):
            raise RemoteProtocolError("the server answered in smart protocol version 2")
        raise RemoteProtocolError(f"not a version 3 message: {head!r}")

    def _read_length_prefixed(self, buf: ReceiveBuffer, offset: int, maximum: int, what: str):
        """Return ``(payload, part_length)`` or None if it is not all there."""
        if len(buf) < offset + 4:
            return None
        (length,) = _unpack_length(buf.slice(offset, offset + 4))
        if length > maximum:
            raise LimitExceeded(what, length, maximum)
        end = offset + 4 + length
        if len(buf) < end:
            return None
        return buf.slice(offset + 4, end), end

    def _read_structure(self, buf: ReceiveBuffer, maximum: int, what: str, offset: int = 0):
        found = self._read_length_prefixed(buf, offset, maximum, what)
        if found is None:
            return None
        payload, end = found
        try:
            value = bdecode_as_tuple(payload)
        except Exception as exc:
            raise RemoteProtocolError(f"{what} are not valid bencode: {exc}") from None
        buf.consume(end)
        return value

    def _read_tagged_structure(self, buf: ReceiveBuffer, what: str):
        if not buf:
            return None
        kind = buf.byte_at(0)
        if kind != PART_STRUCTURE:
            raise RemoteProtocolError(f"expected {what}, got part {bytes([kind])!r}")
        return self._read_structure(buf, self._limits.max_structure_size, what, offset=1)

    def _read_status(self, buf: ReceiveBuffer) -> Optional[bool]:
        if len(buf) < 2:
            if buf and buf.byte_at(0) != PART_STATUS:
                raise RemoteProtocolError(f"expected a status, got part {buf.slice(0, 1)!r}")
            return None
        if buf.byte_at(0) != PART_STATUS:
            raise RemoteProtocolError(f"expected a status, got part {buf.slice(0, 1)!r}")
        status = buf.byte_at(1)
        if status not in (STATUS_SUCCESS, STATUS_ERROR):
            raise RemoteProtocolError(f"bad status byte {bytes([status])!r}")
        buf.consume(2)
        return status == STATUS_SUCCESS

    def _read_args(self, buf: ReceiveBuffer) -> Optional[Event]:
        args = self._read_tagged_structure(buf, "arguments")
        if args is None:
            return None
        args = _as_args(args, "arguments")
        self._expect = _Expect.BODY
        if self._sender is Role.CLIENT:
            if not args or not isinstance(args[0], bytes):
                raise RemoteProtocolError(f"a request must start with a verb, got {args!r:.80}")
            return Request(args, self._headers)
        return Response(args, self._success, self._headers)

    def _read_body_part(self, buf: ReceiveBuffer) -> Optional[Event]:
        if not buf:
            return None
        kind = buf.byte_at(0)
        if kind == PART_BYTES:
            found = self._read_length_prefixed(buf, 1, self._limits.max_body_part_size, "body part")
            if found is None:
                return None
            data, end = found
            buf.consume(end)
            return BodyChunk(data)
        if kind == PART_END:
            buf.consume(1)
            self._expect = _Expect.NOTHING
            return EndOfMessage()
        if kind == PART_STATUS:
            status = self._read_status(buf)
            if status is None:
                return None
            self._expect = _Expect.END if status else _Expect.ERROR_ARGS
            return self.read(buf)
        raise RemoteProtocolError(f"bad message part kind {bytes([kind])!r}")


def _as_args(value, what: str) -> tuple:
    if not isinstance(value, tuple):
        raise RemoteProtocolError(f"{what} are not a list: {value!r:.80}")
    return value


def _legacy_error_reply(version: int) -> bytes:
    """An error answer a version 1 or 2 client can read."""
    line = (
        b"error\x01Generic bzr smart protocol error: "
        b"this server speaks only smart protocol version 3 (bzr 1.6 or later)\n"
    )
    if version == 2:
        return V2_RESPONSE_MARKER + b"failed\n" + line
    return line

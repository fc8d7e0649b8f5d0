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
from ._exceptions import LimitExceeded, RemoteProtocolError, UnsupportedProtocolVersion, brief
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
_END = EndOfMessage()


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
    PART_REST = "rest of a body part handed on in pieces"


# Module-level names for the members: looking up an Enum attribute costs
# more than the rest of a small part's parsing.
_MARKER = _Expect.MARKER
_HEADERS = _Expect.HEADERS
_STATUS = _Expect.STATUS
_ARGS = _Expect.ARGS
_BODY = _Expect.BODY
_ERROR_ARGS = _Expect.ERROR_ARGS
_END_PART = _Expect.END
_NOTHING = _Expect.NOTHING
_PART_REST = _Expect.PART_REST


class MessageReader:
    """Reads the messages sent by ``sender``, part by part."""

    __slots__ = (
        "_sender",
        "_from_client",
        "_limits",
        "_whole_part_limit",
        "_max_whole_part",
        "_part_left",
        "_expect",
        "_headers",
        "_success",
    )

    def __init__(self, sender: Role, limits: Limits):
        self._sender = sender
        self._from_client = sender is Role.CLIENT
        self._limits = limits
        whole = limits.max_whole_part_size
        self._whole_part_limit = limits.max_body_part_size if whole is None else min(whole, limits.max_body_part_size)
        self._max_whole_part = self._whole_part_limit  # for the message being read
        self._part_left = 0  # bytes of a part handed on in pieces still to come
        self._expect = _MARKER
        self._headers: dict = {}
        self._success = True

    @property
    def between_messages(self) -> bool:
        """True when no part of a message has been consumed yet."""
        return self._expect is _MARKER

    def reset(self) -> None:
        """Get ready for the next message."""
        self._expect = _MARKER
        self._part_left = 0
        self._max_whole_part = self._whole_part_limit

    def hand_on_in_pieces(self) -> None:
        """Hand on every body part of the message being read in pieces, as its bytes arrive, until ``reset``."""
        self._max_whole_part = 0

    def read(self, buf: ReceiveBuffer) -> Optional[Event]:
        """Consume parts from ``buf`` until one makes an event.

        Returns None when ``buf`` does not yet hold a whole part, and raises
        ``RemoteProtocolError`` for bytes the grammar does not allow.
        """
        if not buf:
            return None
        expect = self._expect
        if expect is _BODY:
            return self._read_body_part(buf)
        if expect is _PART_REST:
            return self._read_part_piece(buf)
        if expect is _MARKER:
            event = self._read_opening_in_place(buf)
            if event is not None:
                return event
        while True:
            expect = self._expect
            if expect is _BODY:
                return self._read_body_part(buf)
            if expect is _MARKER:
                if not self._read_marker(buf):
                    return None
            elif expect is _HEADERS:
                headers = self._read_structure(buf, self._limits.max_headers_size, "headers")
                if headers is None:
                    return None
                if not isinstance(headers, dict):
                    raise RemoteProtocolError(f"message headers are not a dict: {brief(headers)}")
                self._headers = headers
                self._expect = _ARGS if self._from_client else _STATUS
            elif expect is _STATUS:
                status = self._read_status(buf)
                if status is None:
                    return None
                self._success = status
                self._expect = _ARGS
            elif expect is _ARGS:
                return self._read_args(buf)
            elif expect is _ERROR_ARGS:
                args = self._read_tagged_structure(buf, "error arguments")
                if args is None:
                    return None
                self._expect = _END_PART
                return BodyError(_as_args(args, "error arguments"))
            elif expect is _END_PART:
                if not buf:
                    return None
                kind = buf.byte_at(0)
                if kind != PART_END:
                    raise RemoteProtocolError(f"expected the end of the message, got part {bytes([kind])!r}")
                buf.consume(1)
                self._expect = _NOTHING
                return _END
            else:
                return None

    def _read_opening_in_place(self, buf: ReceiveBuffer) -> Optional[Event]:
        """Read a message's opening parts at once if the first chunk holds them.

        A shortcut for the common case of a whole small message in one
        chunk. It returns None, consuming nothing, for anything unusual
        (a part cut short, over a limit, or malformed), and the part-by-part
        path then gives the right answer or error.
        """
        data, start = buf.contiguous()
        opening = self._parse_opening(data, start)
        if opening is None:
            return None
        event, end = opening
        buf.consume(end - start)
        self._expect = _BODY
        return event

    def read_whole_message(self, buf: ReceiveBuffer) -> Optional[list]:
        """All events of the next message, if the buffer's first chunk holds all of it.

        The shortcut for a small message received in one piece: opening,
        body parts and end parsed in one pass. Returns None, consuming
        nothing, if the message is not all there or has anything unusual
        (a status part in its body, a part over a limit, bytes that are not
        a message), which the part-by-part path then handles.
        """
        if self._expect is not _MARKER:
            return None
        data, start = buf.contiguous()
        opening = self._parse_opening(data, start)
        if opening is None:
            return None
        event, pos = opening
        events = [event]
        size = len(data)
        max_part = self._max_whole_part
        while pos < size:
            kind = data[pos]
            if kind == PART_END:
                buf.consume(pos + 1 - start)
                self._expect = _NOTHING
                events.append(_END)
                return events
            if kind != PART_BYTES or pos + 5 > size:
                return None
            (length,) = _unpack_length(data, pos + 1)
            end = pos + 5 + length
            if end > size or length > max_part:
                return None
            events.append(BodyChunk(data[pos + 5 : end]))
            pos = end
        return None

    def _parse_opening(self, data: bytes, pos: int) -> Optional[tuple]:
        """The opening event of a message at ``data[pos:]`` and where it ends, or None.

        None means the opening parts are not all in ``data`` or something
        about them is unusual. Nothing is recorded: the caller consumes.
        """
        size = len(data)
        if not data.startswith(MESSAGE_MARKER, pos):
            return None
        pos += _MARKER_LEN
        if size < pos + 4:
            return None
        (length,) = _unpack_length(data, pos)
        headers_at = pos + 4
        pos = headers_at + length
        if length > self._limits.max_headers_size or size < pos + 5:
            return None
        headers_end = pos
        success = True
        if not self._from_client:
            if data[pos] != PART_STATUS:
                return None
            status = data[pos + 1]
            if status == STATUS_ERROR:
                success = False
            elif status != STATUS_SUCCESS:
                return None
            pos += 2
            if size < pos + 5:
                return None
        if data[pos] != PART_STRUCTURE:
            return None
        (length,) = _unpack_length(data, pos + 1)
        end = pos + 5 + length
        if length > self._limits.max_structure_size or size < end:
            return None
        try:
            headers = bdecode_as_tuple(data[headers_at:headers_end])
            args = bdecode_as_tuple(data[pos + 5 : end])
        except Exception:
            return None
        if type(headers) is not dict or type(args) is not tuple:
            return None
        if self._from_client:
            if not args or type(args[0]) is not bytes:
                return None
            event = Request(args, headers)
        else:
            event = Response(args, success, headers)
        return event, end

    def _read_marker(self, buf: ReceiveBuffer) -> bool:
        if buf.startswith(MESSAGE_MARKER):
            buf.consume(_MARKER_LEN)
            self._expect = _HEADERS
            return True
        if len(buf) < _MARKER_LEN and MESSAGE_MARKER.startswith(buf.peek(_MARKER_LEN)):
            return False
        return self._reject_marker(buf)

    def _reject_marker(self, buf: ReceiveBuffer) -> bool:
        """Raise the error for a wrong marker, or wait for more of a v2 one."""
        head = buf.peek(_MARKER_LEN)
        if self._from_client:
            if V2_REQUEST_MARKER.startswith(head[: len(V2_REQUEST_MARKER)]):
                if len(head) < len(V2_REQUEST_MARKER):
                    return False
                raise UnsupportedProtocolVersion(2, _legacy_error_reply(2))
            raise UnsupportedProtocolVersion(1, _legacy_error_reply(1))
        if head.startswith(V2_RESPONSE_MARKER[: len(head)]):
            raise RemoteProtocolError("the server answered in smart protocol version 2")
        raise RemoteProtocolError(f"not a version 3 message: {head!r}")

    def _take_length_prefixed(
        self, buf: ReceiveBuffer, offset: int, maximum: int, what: str
    ) -> Optional[bytes]:
        """Consume ``offset`` bytes, a length prefix and the payload it announces.

        Returns the payload, or None (consuming nothing) if it is not all there.
        """
        available = len(buf)
        if available < offset + 4:
            return None
        length = buf.length_at(offset)
        if length > maximum:
            raise LimitExceeded(what, length, maximum)
        if available < offset + 4 + length:
            return None
        buf.consume(offset + 4)
        return buf.take(length)

    def _read_structure(self, buf: ReceiveBuffer, maximum: int, what: str, offset: int = 0):
        payload = self._take_length_prefixed(buf, offset, maximum, what)
        if payload is None:
            return None
        try:
            return bdecode_as_tuple(payload)
        except Exception as exc:
            raise RemoteProtocolError(f"{what} are not valid bencode: {exc}") from None

    def _read_tagged_structure(self, buf: ReceiveBuffer, what: str):
        if not buf:
            return None
        kind = buf.byte_at(0)
        if kind != PART_STRUCTURE:
            raise RemoteProtocolError(f"expected {what}, got part {bytes([kind])!r}")
        return self._read_structure(buf, self._limits.max_structure_size, what, offset=1)

    def _read_status(self, buf: ReceiveBuffer) -> Optional[bool]:
        if not buf:
            return None
        if buf.byte_at(0) != PART_STATUS:
            raise RemoteProtocolError(f"expected a status, got part {buf.peek(1)!r}")
        if len(buf) < 2:
            return None
        status = buf.byte_at(1)
        if status != STATUS_SUCCESS and status != STATUS_ERROR:
            raise RemoteProtocolError(f"bad status byte {bytes([status])!r}")
        buf.consume(2)
        return status == STATUS_SUCCESS

    def _read_args(self, buf: ReceiveBuffer) -> Optional[Event]:
        args = self._read_tagged_structure(buf, "arguments")
        if args is None:
            return None
        if type(args) is not tuple:
            raise RemoteProtocolError(f"arguments are not a list: {brief(args)}")
        self._expect = _BODY
        if self._from_client:
            if not args or type(args[0]) is not bytes:
                raise RemoteProtocolError(f"a request must start with a verb, got {brief(args)}")
            return Request(args, self._headers)
        return Response(args, self._success, self._headers)

    def _read_body_part(self, buf: ReceiveBuffer) -> Optional[Event]:
        data, pos = buf.contiguous()
        if pos < len(data):
            kind = data[pos]
            if kind == PART_BYTES and pos + 5 <= len(data):
                (length,) = _unpack_length(data, pos + 1)
                end = pos + 5 + length
                if end <= len(data) and length <= self._max_whole_part:
                    buf.consume(end - pos)
                    return BodyChunk(data[pos + 5 : end])
            elif kind == PART_END:
                buf.consume(1)
                self._expect = _NOTHING
                return _END
        if not buf:
            return None
        kind = buf.byte_at(0)
        if kind == PART_BYTES:
            if len(buf) >= 5:
                length = buf.length_at(1)
                if self._max_whole_part < length <= self._limits.max_body_part_size:
                    buf.consume(5)
                    self._part_left = length
                    self._expect = _PART_REST
                    return self._read_part_piece(buf)
            data = self._take_length_prefixed(buf, 1, self._limits.max_body_part_size, "body part")
            if data is None:
                return None
            return BodyChunk(data)
        if kind == PART_END:
            buf.consume(1)
            self._expect = _NOTHING
            return _END
        if kind == PART_STATUS:
            status = self._read_status(buf)
            if status is None:
                return None
            self._expect = _END_PART if status else _ERROR_ARGS
            return self.read(buf)
        raise RemoteProtocolError(f"bad message part kind {bytes([kind])!r}")

    def _read_part_piece(self, buf: ReceiveBuffer) -> Optional[Event]:
        """The received bytes of a part larger than ``max_whole_part_size``, as one ``BodyChunk``; None if none."""
        if not buf:
            return None
        piece = buf.take(min(len(buf), self._part_left))
        self._part_left -= len(piece)
        if not self._part_left:
            self._expect = _BODY
        return BodyChunk(piece)


def _as_args(value, what: str) -> tuple:
    if not isinstance(value, tuple):
        raise RemoteProtocolError(f"{what} are not a list: {brief(value)}")
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

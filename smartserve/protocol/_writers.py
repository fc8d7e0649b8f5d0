"""Turning events into bytes: one writer per event type."""

from __future__ import annotations

from fastbencode import bencode

from ._events import BodyChunk, BodyError, ConnectionClosed, EndOfMessage, Request, Response
from ._exceptions import LocalProtocolError
from ._wire import LENGTH, MESSAGE_MARKER

__all__ = ["WRITERS", "error_response"]

_pack_length = LENGTH.pack


def _prefixed_bencode(value) -> bytes:
    try:
        encoded = bencode(value)
    except Exception as exc:
        raise LocalProtocolError(f"cannot bencode {value!r:.80}: {exc}") from None
    return _pack_length(len(encoded)) + encoded


def _wire_args(args) -> list:
    # Breezy sends top-level str arguments as UTF-8; do the same.
    return [arg.encode("utf-8") if isinstance(arg, str) else arg for arg in args]


def _write_request(event: Request) -> bytes:
    if not event.args or not isinstance(event.args[0], (bytes, str)):
        raise LocalProtocolError(f"a request must start with a verb, got {event.args!r:.80}")
    return b"".join(
        (
            MESSAGE_MARKER,
            _prefixed_bencode(dict(event.headers)),
            b"s",
            _prefixed_bencode(_wire_args(event.args)),
        )
    )


def _write_response(event: Response) -> bytes:
    return b"".join(
        (
            MESSAGE_MARKER,
            _prefixed_bencode(dict(event.headers)),
            b"oS" if event.success else b"oE",
            b"s",
            _prefixed_bencode(_wire_args(event.args)),
        )
    )


def _write_body_chunk(event: BodyChunk) -> bytes:
    return b"b" + _pack_length(len(event.data)) + event.data


def _write_body_error(event: BodyError) -> bytes:
    return b"oEs" + _prefixed_bencode(_wire_args(event.args))


def _write_end(event: EndOfMessage) -> bytes:
    return b"e"


def _write_nothing(event: ConnectionClosed) -> bytes:
    return b""


WRITERS = {
    Request: _write_request,
    Response: _write_response,
    BodyChunk: _write_body_chunk,
    BodyError: _write_body_error,
    EndOfMessage: _write_end,
    ConnectionClosed: _write_nothing,
}


def error_response(error_args: tuple) -> bytes:
    """A whole error response message, as a server sends for a bad request."""
    return _write_response(Response(error_args, success=False)) + b"e"

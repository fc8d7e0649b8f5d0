"""Turning events into bytes: one writer per event type."""

from __future__ import annotations

from fastbencode import bencode

from ._events import BodyChunk, BodyError, ConnectionClosed, EndOfMessage, Request, Response
from ._exceptions import LocalProtocolError, brief
from ._wire import LENGTH, MESSAGE_MARKER

__all__ = ["WRITERS", "body_part_header", "error_response"]

_pack_length = LENGTH.pack


def _bencode(value) -> bytes:
    """Bencode ``value``, with top-level str items sent as UTF-8 as Breezy does.

    Flat lists of bytes and ints and dicts of them, which is what almost
    every message holds, are encoded here: that is about twice as fast as
    calling into fastbencode for a few short items.
    """
    if type(value) is dict:
        out = [b"d"]
        try:
            keys = sorted(value)
        except TypeError:
            return _bencode_any(value)  # keys of mixed types: it names the one that is not bytes
        for key in keys:
            item = value[key]
            if type(key) is not bytes:
                return _bencode_any(value)
            out.append(b"%d:" % len(key))
            out.append(key)
            if type(item) is bytes:
                out.append(b"%d:" % len(item))
                out.append(item)
            elif type(item) is int:
                out.append(b"i%de" % item)
            else:
                return _bencode_any(value)
    else:
        out = [b"l"]
        for item in value:
            kind = type(item)
            if kind is str:
                item = item.encode("utf-8")
                kind = bytes
            if kind is bytes:
                out.append(b"%d:" % len(item))
                out.append(item)
            elif kind is int:
                out.append(b"i%de" % item)
            else:
                return _bencode_any([
                    arg.encode("utf-8") if isinstance(arg, str) else arg for arg in value
                ])
    out.append(b"e")
    return b"".join(out)


def _bencode_any(value) -> bytes:
    try:
        return bencode(value)
    except Exception as exc:
        raise LocalProtocolError(f"cannot bencode {brief(value)}: {exc}") from None


def _prefixed(value) -> bytes:
    encoded = _bencode(value)
    return _pack_length(len(encoded)) + encoded


_NO_HEADERS = _prefixed({})
_HEADERS_CACHE: dict = {}
_HEADERS_CACHE_SIZE = 32


def _prefixed_headers(headers) -> bytes:
    # A server sends the same headers with every response: remember a few.
    if not headers:
        return _NO_HEADERS
    try:
        # Types are part of the key: 1, 1.0 and True are equal keys but not the same bencode.
        key = (tuple(headers.items()), tuple(map(type, headers.values())))
        return _HEADERS_CACHE[key]
    except KeyError:
        encoded = _prefixed(dict(headers))
        if len(_HEADERS_CACHE) >= _HEADERS_CACHE_SIZE:
            _HEADERS_CACHE.clear()
        _HEADERS_CACHE[key] = encoded
        return encoded
    except TypeError:
        return _prefixed(dict(headers))


def _write_request(event: Request) -> bytes:
    args = event.args
    if not args or not isinstance(args[0], (bytes, str)):
        raise LocalProtocolError(f"a request must start with a verb, got {brief(args)}")
    return b"".join((MESSAGE_MARKER, _prefixed_headers(event.headers), b"s", _prefixed(args)))


def _write_response(event: Response) -> bytes:
    return b"".join(
        (
            MESSAGE_MARKER,
            _prefixed_headers(event.headers),
            b"oSs" if event.success else b"oEs",
            _prefixed(event.args),
        )
    )


def body_part_header(data: bytes) -> bytes:
    """The bytes that precede ``data`` sent as one body part.

    Raises ``LocalProtocolError`` unless ``data`` is bytes-like: a ``str``
    or a number would otherwise fail only once part of a message is out.
    """
    if type(data) is bytes or isinstance(data, (bytes, bytearray)):
        return b"b" + _pack_length(len(data))
    if isinstance(data, memoryview):
        return b"b" + _pack_length(data.nbytes)
    raise LocalProtocolError(f"a body part is bytes, not {type(data).__name__}")


def _write_body_chunk(event: BodyChunk) -> bytes:
    data = event.data
    return b"".join((body_part_header(data), data))


def _write_body_error(event: BodyError) -> bytes:
    return b"oEs" + _prefixed(event.args)


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

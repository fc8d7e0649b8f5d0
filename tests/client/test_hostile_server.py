"""Whatever bytes a server sends, the client settles the call and never leaves it hanging.

The client protocol is fed hand-made and random server bytes over a
``StringTransport``: each call ends with a reply, a ``RemoteError`` or a
``TransportFailure``, and nothing else escapes ``dataReceived``.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from smartserve.client import RemoteError, ResponseTooLarge, SmartClientProtocol, TransportFailure
from smartserve.client._protocol import Outgoing, Reply
from smartserve.protocol import MESSAGE_MARKER, Limits
from smartserve.protocol._wire import LENGTH

from protocol.helpers import damaged


def _prefixed(data: bytes) -> bytes:
    return LENGTH.pack(len(data)) + data


def _response(status: bytes, args: bytes, rest: bytes = b"") -> bytes:
    return MESSAGE_MARKER + _prefixed(b"de") + b"o" + status + b"s" + _prefixed(args) + rest + b"e"


def _call(pieces) -> list:
    """Send a ``get``, feed the server's ``pieces``, then lose the connection; the call's outcomes."""
    protocol = SmartClientProtocol(Clock())
    protocol.makeConnection(StringTransport())
    outcomes = []
    protocol.send_request(Outgoing(b"get", (b"f",))).addBoth(outcomes.append)
    for piece in pieces:
        protocol.dataReceived(piece)
    protocol.connectionLost(Failure(ConnectionDone()))
    return outcomes


def _error(pieces) -> Exception:
    [outcome] = _call(pieces)
    assert isinstance(outcome, Failure)
    return outcome.value


def test_error_named_by_a_dict_is_a_remote_error():
    """An error tuple whose first element is a dict (unhashable) fails the call with a RemoteError."""
    error = _error([_response(b"E", b"ld1:ai1eee")])
    assert isinstance(error, RemoteError)
    assert error.error_args == ({b"a": 1},)


def test_stream_error_named_by_a_dict_is_a_remote_error():
    """A mid-stream error tuple whose first element is a dict fails the call with a RemoteError."""
    error = _error([_response(b"S", b"l2:oke", b"b" + _prefixed(b"x") + b"oEs" + _prefixed(b"ldee"))])
    assert isinstance(error, RemoteError)
    assert error.error_args == ({},)


def test_deeply_nested_error_arguments_are_a_remote_error():
    """Error arguments nested far deeper than Python's recursion limit fail the call with a short message."""
    depth = 50_000
    error = _error([_response(b"E", b"l7:Failure" + b"l" * depth + b"0:" + b"e" * depth + b"e")])
    assert isinstance(error, RemoteError)
    assert error.error_name == b"Failure"
    assert len(str(error)) < 200


def _valid_responses() -> list:
    return [
        _response(b"S", b"l2:oke"),
        _response(b"S", b"l2:oke", b"b" + _prefixed(b"body")),
        _response(b"E", b"l10:NoSuchFile1:fe"),
        _response(b"S", b"l2:oke", b"b" + _prefixed(b"x") + b"oEs" + _prefixed(b"l5:errore")),
    ]


@st.composite
def server_bytes(draw):
    """A valid response with bytes flipped, dropped, inserted or cut, or plain random bytes, in pieces."""
    if draw(st.booleans()):
        inserted = st.sampled_from([b"\xff\xff\xff\xff", b"ldee", MESSAGE_MARKER, b"e", b"oE"])
        wire = damaged(draw, draw(st.sampled_from(_valid_responses())), inserted)
    else:
        wire = draw(st.binary(max_size=200))
    step = draw(st.integers(1, 64))
    return [wire[start : start + step] for start in range(0, len(wire), step)]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(server_bytes())
def test_any_server_bytes_settle_the_call_once(pieces):
    """Any bytes from the server settle the call exactly once, with a reply or a client error."""
    [outcome] = _call(pieces)
    if isinstance(outcome, Failure):
        assert isinstance(outcome.value, (RemoteError, TransportFailure))
    else:
        assert isinstance(outcome, Reply)


def _many_parts(count: int, size: int) -> bytes:
    return b"".join(b"b" + _prefixed(b"x" * size) for _ in range(count))


def _get_with_limit(limit: int, server_bytes, on_chunk=None):
    """A ``get`` whose client takes bodies of at most ``limit`` bytes, fed ``server_bytes`` (or a list of
    pieces of them); its outcomes and the transport."""
    protocol = SmartClientProtocol(Clock(), Limits(max_body_part_size=limit))
    transport = StringTransport()
    protocol.makeConnection(transport)
    outcomes = []
    protocol.send_request(Outgoing(b"get", (b"f",), on_chunk=on_chunk)).addBoth(outcomes.append)
    for piece in [server_bytes] if isinstance(server_bytes, bytes) else server_bytes:
        protocol.dataReceived(piece)
    if transport.disconnecting:
        protocol.connectionLost(Failure(ConnectionDone()))
    return outcomes, transport


def test_response_body_collected_past_the_limit_fails_the_call_and_drops_the_connection():
    """Parts each within the limit that add up past it end the call with ResponseTooLarge, unread further."""
    outcomes, transport = _get_with_limit(1000, _response(b"S", b"l2:oke", _many_parts(3, 400)))
    [outcome] = outcomes
    assert isinstance(outcome, Failure) and isinstance(outcome.value, ResponseTooLarge)
    assert (outcome.value.verb, outcome.value.limit) == (b"get", 1000)
    assert transport.disconnecting


def test_response_body_of_exactly_the_limit_or_taken_by_on_chunk_is_delivered():
    """The limit is for what the client collects: a body of the limit arrives whole, a larger one part by part."""
    outcomes, transport = _get_with_limit(1200, _response(b"S", b"l2:oke", _many_parts(3, 400)))
    assert outcomes == [Reply((b"ok",), b"x" * 1200)] and not transport.disconnecting
    chunks = []
    outcomes, transport = _get_with_limit(1000, _response(b"S", b"l2:oke", _many_parts(5, 400)), chunks.append)
    assert outcomes == [Reply((b"ok",), None)] and chunks == [b"x" * 400] * 5 and not transport.disconnecting


def test_one_response_part_past_the_limit_is_too_large_collected_and_delivered_to_on_chunk():
    """A body sent as one part larger than the limit (a ``get`` of a large file) is ResponseTooLarge when
    collected, not a protocol error, and reaches ``on_chunk`` in pieces as its bytes arrive.

    Found wrong: the codec refused the part as a protocol error, so the
    client took the answer for a lost connection and sent the ``get``
    again, three times, before failing with ResponseFailed.
    """
    one_part = _response(b"S", b"l2:oke", b"b" + _prefixed(b"x" * 3000))
    outcomes, transport = _get_with_limit(1000, one_part)
    [outcome] = outcomes
    assert isinstance(outcome, Failure) and isinstance(outcome.value, ResponseTooLarge), outcome
    assert transport.disconnecting
    chunks = []
    halves = [one_part[:1500], one_part[1500:]]
    outcomes, transport = _get_with_limit(1000, halves, chunks.append)
    assert outcomes == [Reply((b"ok",), None)] and not transport.disconnecting
    assert b"".join(chunks) == b"x" * 3000 and len(chunks) == 2


def test_error_body_past_the_limit_fails_the_call_too():
    """An error response's body is collected as well, and held to the same limit."""
    outcomes, transport = _get_with_limit(1000, _response(b"E", b"l5:errore", _many_parts(3, 400)))
    [outcome] = outcomes
    assert isinstance(outcome.value, ResponseTooLarge) and transport.disconnecting


def test_response_body_of_many_tiny_parts_costs_about_its_bytes():
    """A server sending a body as a great many two-byte parts gets it collected in a few pieces, not held as a
    list of objects twenty times its size."""
    import tracemalloc

    parts = b"".join(b"b" + LENGTH.pack(2) + b"%02d" % (index % 100) for index in range(200_000))
    wire = _response(b"S", b"l2:oke", parts)
    tracemalloc.start()
    try:
        outcomes = _call([wire[start : start + 65536] for start in range(0, len(wire), 65536)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    [reply] = outcomes
    assert reply.args == (b"ok",) and len(reply.body) == 400_000
    assert reply.body[:6] == b"000102"
    assert peak < 8 * 400_000, f"{peak} bytes held for a body of 400 kB"

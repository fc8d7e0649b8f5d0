"""Whatever bytes a client sends, the server answers or closes that connection, and serves the next.

Random and damaged requests are fed to a ``SmartServerProtocol`` over a
``StringTransport``: nothing escapes ``dataReceived``, what the server
wrote reads as whole responses (or the legacy error line for a version 1
or 2 client), and after the client's EOF the connection is closed.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from smartserve.protocol import MESSAGE_MARKER, NEED_DATA, Connection, EndOfMessage, Request, Role
from smartserve.protocol._wire import LENGTH
from smartserve.server.caller import Caller
from smartserve.testing import MemoryBackend, encode_request, response_args, serve_in_memory

from protocol.helpers import damaged

# The legacy error replies, as they begin; one may follow the responses to
# whole requests, for bytes that cannot start a version 3 message.
_LEGACY_REPLIES = (b"error\x01Generic bzr smart protocol error", b"bzr response 2\nfailed\n")


def _check_replies(written: bytes) -> None:
    """Check that ``written`` is whole v3 responses, then at most one legacy error reply."""
    ends = [written.find(legacy) for legacy in _LEGACY_REPLIES]
    legacy_at = min((end for end in ends if end >= 0), default=len(written))
    assert written[legacy_at:].endswith(b"(bzr 1.6 or later)\n") or legacy_at == len(written)
    codec = Connection(Role.CLIENT)
    codec.receive_data(written[:legacy_at])
    while codec.trailing_data:
        codec.send(Request((b"any",)))
        codec.send(EndOfMessage())
        while (event := codec.next_event()) is not NEED_DATA and type(event) is not EndOfMessage:
            pass
        assert event is not NEED_DATA, "a response was cut short"
        codec.start_next_cycle()


def _valid_requests() -> list:
    return [
        encode_request([b"hello"]),
        encode_request([b"get", b"f"]),
        encode_request([b"put", b"g"], b"data"),
        encode_request([b"append", b"g", 1, (2, b"x")], b"more"),
        encode_request([b"no-such-verb"]),
    ]


@st.composite
def client_bytes(draw):
    """A few valid requests with bytes flipped, dropped, inserted or cut, or plain random bytes, in pieces."""
    if draw(st.booleans()):
        inserted = st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x02de", b"ldee", MESSAGE_MARKER, b"e", b"oE", b"b"])
        wire = damaged(draw, b"".join(draw(st.lists(st.sampled_from(_valid_requests()), max_size=3))), inserted)
    else:
        wire = draw(st.binary(max_size=200))
    step = draw(st.integers(1, 64))
    return [wire[start : start + step] for start in range(0, len(wire), step)]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(client_bytes())
def test_any_client_bytes_are_answered_then_closed(pieces):
    """Any bytes give whole responses and a closed connection after EOF; the server serves the next connection."""
    factory, protocol, transport = serve_in_memory(MemoryBackend({b"f": b"data"}), clock=Clock())
    for piece in pieces:
        protocol.dataReceived(piece)
    protocol.eofReceived()
    _check_replies(transport.value())
    assert transport.disconnecting
    protocol.connectionLost()
    assert factory.open_connections == 0

    second = factory.build_protocol(Caller(None, "memory", factory.tcp_writable))
    second_transport = StringTransport()
    second.makeConnection(second_transport)
    second.dataReceived(encode_request([b"hello"]))
    assert response_args(second_transport.value()) == [(b"ok", b"2")]


def test_request_with_a_deeply_nested_verb_gets_an_error_reply():
    """A request whose verb is a list nested past the recursion limit is answered with an error, then closed."""
    depth = 50_000
    args = b"l" + b"l" * depth + b"e" * depth + b"e"
    wire = MESSAGE_MARKER + LENGTH.pack(2) + b"de" + b"s" + LENGTH.pack(len(args)) + args + b"e"
    factory, protocol, transport = serve_in_memory(MemoryBackend(), clock=Clock())
    protocol.dataReceived(wire)
    [reply] = response_args(transport.value())
    assert reply[0] == b"error" and b"must start with a verb" in reply[1]
    assert transport.disconnecting

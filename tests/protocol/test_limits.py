"""Size limits are enforced as soon as a length prefix arrives, or as soon as too much is sent ahead of an answer."""

import pytest
from breezy import errors

from smartserve.protocol import (
    DEFAULT_LIMITS,
    MESSAGE_MARKER,
    NEED_DATA,
    PAUSED,
    BodyChunk,
    Connection,
    EndOfMessage,
    LimitExceeded,
    Limits,
    RemoteProtocolError,
    Request,
    Response,
    Role,
)
from smartserve.protocol._wire import LENGTH

from .helpers import HELLO, breezy_read_response, prefixed, receive_all, receiver, send_all, sender

SMALL = Limits(max_headers_size=10, max_structure_size=20, max_body_part_size=30)
REQUEST_HEAD = MESSAGE_MARKER + prefixed(b"de") + b"s" + prefixed(b"l3:gete")
RESPONSE_HEAD = MESSAGE_MARKER + prefixed(b"de") + b"oSs" + prefixed(b"l2:oke")

# (sender, bytes before the prefix, limit name, what the limit is called)
PREFIXES = [
    (Role.CLIENT, MESSAGE_MARKER, "max_headers_size", "headers"),
    (Role.SERVER, MESSAGE_MARKER, "max_headers_size", "headers"),
    (Role.CLIENT, MESSAGE_MARKER + prefixed(b"de") + b"s", "max_structure_size", "arguments"),
    (Role.SERVER, MESSAGE_MARKER + prefixed(b"de") + b"oSs", "max_structure_size", "arguments"),
    (Role.CLIENT, REQUEST_HEAD + b"b", "max_body_part_size", "body part"),
    (Role.SERVER, RESPONSE_HEAD + b"b" + prefixed(b"x") + b"b", "max_body_part_size", "body part"),
    (Role.SERVER, RESPONSE_HEAD + b"oEs", "max_structure_size", "error arguments"),
]


@pytest.mark.parametrize("role, before, limit, what", PREFIXES)
def test_oversized_prefix_raises_before_payload(role, before, limit, what):
    """A length over the limit raises once its 4 bytes are in, with no payload sent."""
    maximum = getattr(SMALL, limit)
    conn = receiver(role, limits=SMALL)
    receive_all(conn, before)
    conn.receive_data(LENGTH.pack(maximum + 1))
    with pytest.raises(LimitExceeded) as caught:
        conn.next_event()
    assert (caught.value.limit, caught.value.size, caught.value.maximum) == (what, maximum + 1, maximum)
    # Nothing past the prefix was ever fed, so nothing more can be buffered.
    assert len(conn.trailing_data) <= len(before) + 4


@pytest.mark.parametrize("role, before, limit, what", PREFIXES)
def test_prefix_at_limit_waits_for_payload(role, before, limit, what):
    """A length exactly at the limit is accepted and waits for its bytes."""
    maximum = getattr(SMALL, limit)
    conn = receiver(role, limits=SMALL)
    receive_all(conn, before)
    conn.receive_data(LENGTH.pack(maximum))
    assert conn.next_event() is NEED_DATA


def test_default_limits_refuse_a_4_gib_prefix():
    """With default limits, a body part announcing 4 GiB is refused at once."""
    conn = receiver(Role.CLIENT)
    receive_all(conn, REQUEST_HEAD)
    conn.receive_data(b"b\xff\xff\xff\xff")
    with pytest.raises(LimitExceeded) as caught:
        conn.next_event()
    assert caught.value.maximum == DEFAULT_LIMITS.max_body_part_size


def test_default_limits_hold_a_64_mib_body_part():
    """The default body limit leaves room for a whole file sent as one part."""
    assert DEFAULT_LIMITS.max_body_part_size >= 64 * 1024 * 1024


def test_limit_exceeded_queues_v3_error_for_breezy():
    """A server over a limit queues a v3 error reply that Breezy's client raises."""
    server = Connection(Role.SERVER, limits=SMALL)
    server.receive_data(MESSAGE_MARKER + LENGTH.pack(1000))
    with pytest.raises(LimitExceeded):
        server.next_event()
    with pytest.raises(errors.ErrorFromSmartServer) as caught:
        breezy_read_response(server.data_to_send()).read_response_tuple()
    assert caught.value.error_tuple[0] == b"error"
    assert b"headers of 1000 bytes" in caught.value.error_tuple[1]


HELLO_BYTES = send_all(Connection(Role.CLIENT), HELLO)
PIPELINED = Limits(max_pipelined_size=3 * len(HELLO_BYTES))


def test_bytes_sent_ahead_of_the_answer_up_to_the_limit_wait_for_the_next_cycle():
    """Pipelined requests that fit the limit are held while the first waits for its answer, then read in turn."""
    server = Connection(Role.SERVER, limits=PIPELINED)
    server.receive_data(HELLO_BYTES)
    assert receive_all(server) == HELLO
    for _ in range(3):
        server.receive_data(HELLO_BYTES)
    for _ in range(3):
        assert server.next_event() is PAUSED
        send_all(server, [Response((b"ok",)), EndOfMessage()])
        server.start_next_cycle()
        assert receive_all(server) == HELLO


def test_bytes_sent_ahead_of_the_answer_over_the_limit_are_refused():
    """Bytes beyond a complete request that go over the limit raise at once, unbuffered, and queue a v3 error reply."""
    server = Connection(Role.SERVER, limits=PIPELINED)
    server.receive_data(HELLO_BYTES)
    assert receive_all(server) == HELLO
    maximum = PIPELINED.max_pipelined_size
    server.receive_data(b"j" * maximum)
    with pytest.raises(LimitExceeded) as caught:
        server.receive_data(b"j")
    assert (caught.value.limit, caught.value.size, caught.value.maximum) == ("pipelined data", maximum + 1, maximum)
    assert len(server.trailing_data) == maximum
    with pytest.raises(errors.ErrorFromSmartServer) as error:
        breezy_read_response(server.data_to_send()).read_response_tuple()
    expected = b"pipelined data of %d bytes exceeds the limit of %d bytes" % (maximum + 1, maximum)
    assert expected in error.value.error_tuple[1]
    with pytest.raises(RemoteProtocolError):
        server.next_event()


WHOLE_TEN = Limits(max_body_part_size=30, max_whole_part_size=10)


@pytest.mark.parametrize("role", [Role.CLIENT, Role.SERVER])
def test_part_over_the_whole_limit_is_handed_on_as_its_bytes_arrive(role):
    """With max_whole_part_size, a larger part is handed on in pieces as it comes, never held whole; a part within
    it still arrives as one BodyChunk, and the message goes on as usual after."""
    part = bytes(range(25))
    small = b"0123456789"
    wire = send_all(sender(role), [opening(role), BodyChunk(part), BodyChunk(small), EndOfMessage()])
    conn = receiver(role, limits=WHOLE_TEN)
    events = receive_all(conn, wire[: wire.index(part)])
    assert [type(event) for event in events] == [type(opening(role))]
    pieces = []
    for start in range(0, len(part), 7):
        received = receive_all(conn, part[start : start + 7])
        assert received == [BodyChunk(part[start : start + 7])]
        assert conn.trailing_data == b""
        pieces.append(received[0].data)
    assert b"".join(pieces) == part
    assert receive_all(conn, wire[wire.index(part) + len(part) :]) == [BodyChunk(small), EndOfMessage()]


def test_part_over_the_whole_limit_in_one_read_is_one_piece_and_a_whole_message_still_parses():
    """A message holding a large part, received at once, gives the part as one piece (the bytes that are there)
    through the part-by-part path; and a part over max_body_part_size is still refused."""
    part = b"x" * 25
    wire = send_all(sender(Role.CLIENT), [opening(Role.CLIENT), BodyChunk(part), EndOfMessage()])
    conn = receiver(Role.CLIENT, limits=WHOLE_TEN)
    conn.receive_data(wire)
    assert conn.next_message() is None
    assert receive_all(conn)[1:] == [BodyChunk(part), EndOfMessage()]
    conn = receiver(Role.CLIENT, limits=WHOLE_TEN)
    receive_all(conn, REQUEST_HEAD + b"b")
    conn.receive_data(LENGTH.pack(WHOLE_TEN.max_body_part_size + 1))
    with pytest.raises(LimitExceeded):
        conn.next_event()


def test_connection_closed_in_a_part_handed_on_in_pieces_is_an_error():
    """An EOF inside a part handed on in pieces is the end of the connection in the middle of a message."""
    conn = receiver(Role.CLIENT, limits=WHOLE_TEN)
    receive_all(conn, REQUEST_HEAD + b"b" + LENGTH.pack(20) + b"y" * 5)
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a message"):
        conn.next_event()


def test_rest_of_a_message_taken_in_pieces_frees_a_part_half_held_and_the_next_message_is_read_whole():
    """After take_rest_in_pieces, the part being received is handed on at once with what arrived of it, later
    parts come in pieces too, and the next message's parts are held whole again."""
    part = bytes(range(28))
    wire = send_all(sender(Role.CLIENT), [opening(Role.CLIENT), BodyChunk(part), BodyChunk(part), EndOfMessage()])
    conn = receiver(Role.CLIENT, limits=SMALL)
    half = wire.index(part) + 12
    assert [type(event) for event in receive_all(conn, wire[:half])] == [Request]
    assert conn.buffered_size == 5 + 12
    conn.take_rest_in_pieces()
    assert receive_all(conn) == [BodyChunk(part[:12])]
    assert conn.buffered_size == 0
    second = wire.index(part, half)
    assert receive_all(conn, wire[half:second + 3]) == [BodyChunk(part[12:]), BodyChunk(part[:3])]
    assert receive_all(conn, wire[second + 3 :]) == [BodyChunk(part[3:]), EndOfMessage()]
    conn.send(Response((b"ok",)))
    conn.send(EndOfMessage())
    conn.start_next_cycle()
    later = wire.index(part) + 20
    assert [type(event) for event in receive_all(conn, wire[:later])] == [Request]
    assert conn.buffered_size == 5 + 20, "a part of the next message is held until it is whole"
    assert receive_all(conn, wire[later:]) == [BodyChunk(part), BodyChunk(part), EndOfMessage()]


def opening(role: Role):
    """A request or response opening from ``role``."""
    return Request((b"put", b"/file", b"")) if role is Role.CLIENT else Response((b"ok",))

"""Properties that must hold for any message and any input."""

import contextlib
import gc
import time

import pytest
from breezy import errors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smartserve.protocol import (
    MESSAGE_MARKER,
    NEED_DATA,
    PAUSED,
    BodyChunk,
    BodyError,
    Connection,
    ConnectionClosed,
    EndOfMessage,
    Limits,
    LocalProtocolError,
    ProtocolError,
    Request,
    Response,
    Role,
    State,
    UnsupportedProtocolVersion,
)

from .helpers import HELLO, ConnectionPair, breezy_decode, damaged, breezy_read_response, prefixed, receive_all, receiver, send_all, sender

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SMALL = Limits(max_headers_size=64, max_structure_size=64, max_body_part_size=64)
# The most a connection may hold unparsed: one whole part of the largest
# kind, with its kind byte and length prefix, or a message marker.
SMALL_BOUND = max(len(MESSAGE_MARKER), 64 + 5)

leaf = st.one_of(st.binary(max_size=12), st.integers(min_value=-(2**63), max_value=2**63))
value = st.recursive(leaf, lambda inner: st.lists(inner, max_size=3).map(tuple), max_leaves=6)
args = st.lists(value, max_size=4).map(tuple)
headers = st.dictionaries(st.binary(max_size=8), st.binary(max_size=8), max_size=3)
chunks = st.lists(st.binary(max_size=40).map(BodyChunk), max_size=4)
error = st.none() | st.lists(value, min_size=1, max_size=3).map(tuple).map(BodyError)


@st.composite
def messages(draw):
    """A role and the events of one whole message that role may send."""
    role = draw(st.sampled_from([Role.CLIENT, Role.SERVER]))
    if role is Role.CLIENT:
        opening = Request((draw(st.binary(min_size=1, max_size=20)),) + draw(args), draw(headers))
    else:
        opening = Response(draw(args), draw(st.booleans()), draw(headers))
    body_error = draw(error)
    return role, [opening, *draw(chunks), *([body_error] if body_error else []), EndOfMessage()]


def _feed_bounded(conn: Connection, pieces) -> list:
    """Feed ``pieces``, checking that the connection never holds too much."""
    events = []
    for piece in pieces:
        conn.receive_data(piece)
        while True:
            event = conn.next_event()
            if event is NEED_DATA or event is PAUSED:
                break
            events.append(event)
            if type(event) is ConnectionClosed:
                return events
        assert len(conn.trailing_data) <= SMALL_BOUND
    return events


@SETTINGS
@given(messages())
def test_message_round_trips(message):
    """Every message decodes to the events it was encoded from."""
    role, events = message
    assert receive_all(receiver(role), send_all(sender(role), events)) == events


@SETTINGS
@given(messages(), st.data())
def test_any_split_decodes_the_same(message, data):
    """However the bytes are split, the same events come out."""
    role, events = message
    wire = send_all(sender(role), events)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    pieces = [wire[start:end] for start, end in zip([0, *cuts], [*cuts, len(wire)])]
    conn = receiver(role)
    got = []
    for piece in pieces:
        got += receive_all(conn, piece)
    assert got == events


def _parts_joined(events) -> list:
    """``events`` with each run of BodyChunks as one BodyChunk of their bytes (an empty run as none)."""
    joined: list = []
    for event in events:
        if type(event) is BodyChunk and joined and type(joined[-1]) is BodyChunk:
            joined[-1] = BodyChunk(joined[-1].data + event.data)
        elif type(event) is not BodyChunk or event.data:
            joined.append(event)
    return joined


@SETTINGS
@given(messages(), st.data(), st.integers(0, 40))
def test_large_parts_in_pieces_carry_the_same_bytes(message, data, whole):
    """With max_whole_part_size, however the bytes are split: the same events but for how body bytes are cut,
    and a part larger than the limit handed on as its bytes come (no piece bigger than the bytes just received)."""
    role, events = message
    wire = send_all(sender(role), events)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    pieces = [wire[start:end] for start, end in zip([0, *cuts], [*cuts, len(wire)])]
    conn = receiver(role, limits=Limits(max_whole_part_size=whole))
    got = []
    for piece in pieces:
        received = receive_all(conn, piece)
        assert all(len(event.data) <= max(whole, len(piece)) for event in received if type(event) is BodyChunk)
        got += received
    assert _parts_joined(got) == _parts_joined(events)


@settings(max_examples=40, deadline=None)
@given(messages())
def test_one_byte_at_a_time_decodes_the_same(message):
    """Bytes fed one at a time give the same events."""
    role, events = message
    wire = send_all(sender(role), events)
    conn = receiver(role)
    got = []
    for index in range(len(wire)):
        got += receive_all(conn, wire[index : index + 1])
    assert got == events


@SETTINGS
@given(messages(), st.binary(max_size=40) | st.none())
def test_send_message_writes_what_send_writes(message, body):
    """send_message's bytes are those of send for the opening, the body as one part, and the end."""
    role, events = message
    events = [events[0], *([BodyChunk(body)] if body is not None else []), EndOfMessage()]
    one_by_one = sender(role)
    at_once = sender(role)
    assert b"".join(at_once.send_message(events[0], body)) == send_all(one_by_one, events)
    assert at_once.our_state is one_by_one.our_state is State.DONE


@pytest.mark.parametrize("opening", [BodyChunk(b"x"), EndOfMessage(), ConnectionClosed()])
def test_send_message_refuses_what_is_not_an_opening(opening):
    conn = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError):
        conn.send_message(opening)
    assert conn.our_state is State.IDLE
    assert conn.send_message(Request((b"hello",))) == [send_all(Connection(Role.CLIENT), [Request((b"hello",)), EndOfMessage()])]


def test_send_message_refuses_a_response_to_no_request_and_a_second_message():
    server = Connection(Role.SERVER)
    with pytest.raises(LocalProtocolError, match="must follow a request"):
        server.send_message(Response((b"ok",)))
    assert server.our_state is State.IDLE
    client = Connection(Role.CLIENT)
    client.send_message(Request((b"hello",)))
    with pytest.raises(LocalProtocolError):
        client.send_message(Request((b"hello",)))
    assert client.our_state is State.DONE


def _states(conn: Connection) -> tuple:
    return conn.our_state, conn.their_state, conn.trailing_data


@SETTINGS
@given(messages(), st.binary(max_size=30))
def test_next_message_gives_what_next_event_gives(message, after):
    """A whole message in one piece comes out of next_message as next_event would give it.

    Only a message with an error in its body is left to next_event; either
    way the connection ends in the same state, the bytes after the message
    still unread.
    """
    role, events = message
    wire = send_all(sender(role), events) + after
    one_by_one = receiver(role)
    one_by_one.receive_data(wire)
    expected = []
    while not expected or type(expected[-1]) is not EndOfMessage:
        expected.append(one_by_one.next_event())
    at_once = receiver(role)
    at_once.receive_data(wire)
    got = at_once.next_message()
    if got is None:
        assert any(type(event) is BodyError for event in events)
        assert receive_all(at_once) == events
    else:
        assert got == expected == events
    assert _states(at_once) == _states(one_by_one)


@SETTINGS
@given(messages(), st.data())
def test_next_message_takes_nothing_from_part_of_a_message(message, data):
    """Until the last byte of a message has arrived, next_message consumes nothing."""
    role, events = message
    wire = send_all(sender(role), events)
    cut = data.draw(st.integers(0, len(wire) - 1))
    conn = receiver(role)
    if cut:
        conn.receive_data(wire[:cut])  # b"" would be an EOF
    before = _states(conn)
    assert conn.next_message() is None
    assert _states(conn) == before
    conn.receive_data(wire[cut:])
    assert receive_all(conn) == events


@SETTINGS
@given(messages())
def test_breezy_decodes_any_message_we_send(message):
    """Breezy's decoder finds the same content in whatever we encode."""
    role, events = message
    assert breezy_decode(role, send_all(sender(role), events), pieces=2) == events


@SETTINGS
@given(st.sampled_from([Role.CLIENT, Role.SERVER]), st.lists(st.binary(min_size=1, max_size=200), max_size=10))
def test_random_input_raises_only_protocol_error(role, pieces):
    """Random bytes give events or a ProtocolError, and stay within the limits."""
    conn = receiver(role, limits=SMALL)
    try:
        _feed_bounded(conn, [MESSAGE_MARKER[: len(pieces) * 3 + 1], *pieces])
    except ProtocolError:
        pass


@st.composite
def mutations(draw):
    """A valid message's bytes with a few bytes flipped, dropped, added or cut."""
    role, events = draw(messages())
    wire = damaged(draw, send_all(sender(role), events), st.binary(min_size=1, max_size=8), fewest=1)
    return role, wire, draw(st.integers(1, 50))


@SETTINGS
@given(mutations())
def test_mutated_input_raises_only_protocol_error(mutation):
    """Damaged messages give events or a ProtocolError, and stay within the limits."""
    role, wire, step = mutation
    conn = receiver(role, limits=SMALL)
    try:
        _feed_bounded(conn, [wire[i : i + step] for i in range(0, len(wire), step)] + [b""])
    except ProtocolError:
        pass


def _nest(depth: int, kinds, inner: bytes) -> bytes:
    """``inner`` bencoded inside ``depth`` lists or dicts, the outermost first in ``kinds``."""
    opening = b"".join(b"l" if kinds[level % len(kinds)] == "l" else b"d1:k" for level in range(depth))
    return opening + inner + b"e" * depth


nested = st.builds(
    _nest,
    st.integers(0, 20_000),
    st.lists(st.sampled_from("ld"), min_size=1, max_size=3),
    st.sampled_from([b"0:", b"i7e", b"le", b"de", b"5:hello", b"i-0e", b"i03e", b"x"]),
)


@st.composite
def nested_messages(draw):
    """A role and a message with a deeply nested, possibly invalid, bencoded value in one of its parts."""
    role = draw(st.sampled_from([Role.CLIENT, Role.SERVER]))
    value = draw(nested)
    where = draw(st.sampled_from(["headers", "args", "first arg", "error args"]))
    headers = value if where == "headers" else b"de"
    if where == "args":
        args = value
    elif where == "first arg":
        args = b"l" + value + b"e"
    else:
        args = b"l5:helloe"
    body = b"oEs" + prefixed(b"l" + value + b"e") if where == "error args" else b""
    status = b"" if role is Role.CLIENT else b"oE"
    wire = MESSAGE_MARKER + prefixed(headers) + status + b"s" + prefixed(args) + body + b"e"
    return role, wire


@settings(max_examples=60, deadline=None)
@given(nested_messages())
def test_nested_bencode_raises_only_protocol_error(message):
    """Any nesting in headers, arguments or error arguments gives events or a ProtocolError.

    A server refuses a bad one with an error response Breezy's client reads.
    """
    role, wire = message
    conn = receiver(role)
    try:
        receive_all(conn, wire)
    except ProtocolError:
        if role is Role.CLIENT:
            with pytest.raises(errors.ErrorFromSmartServer) as caught:
                breezy_read_response(conn.data_to_send()).read_response_tuple()
            assert caught.value.error_tuple[0] == b"error"


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 20_000), st.sampled_from([None, 1.5, b"x"]))
def test_nested_arguments_give_bytes_or_local_protocol_error(depth, leaf):
    """Sending arguments nested at any depth gives bytes, or a LocalProtocolError if bencode cannot carry them."""
    value = leaf
    for _ in range(depth):
        value = (value,)
    conn = Connection(Role.CLIENT)
    try:
        assert conn.send(Request((b"get", value))).startswith(MESSAGE_MARKER)
    except LocalProtocolError:
        assert conn.our_state is State.IDLE


header_keys = st.one_of(st.binary(max_size=4), st.text(max_size=4), st.integers(-3, 3))


@SETTINGS
@given(st.sampled_from([Role.CLIENT, Role.SERVER]), st.dictionaries(header_keys, st.binary(max_size=4), max_size=4))
def test_any_header_keys_give_bytes_or_local_protocol_error(role, headers):
    """Headers with keys of any type, mixed or not, give bytes or a LocalProtocolError."""
    conn = sender(role)
    event = Request((b"get",), headers) if role is Role.CLIENT else Response((b"ok",), True, headers)
    try:
        data = conn.send(event)
    except LocalProtocolError:
        assert conn.our_state is State.IDLE
    else:
        assert receive_all(receiver(role), data + conn.send(EndOfMessage())) == [event, EndOfMessage()]


@settings(max_examples=30, deadline=None)
@given(messages())
def test_every_split_point_and_every_truncation(message):
    """Split in two at every byte, the same events come out; cut inside the message then EOF, a ProtocolError."""
    role, events = message
    wire = send_all(sender(role), events)
    for cut in range(len(wire) + 1):
        conn = receiver(role)
        assert receive_all(conn, wire[:cut]) + receive_all(conn, wire[cut:]) == events
        if 0 < cut < len(wire):
            conn = receiver(role)
            receive_all(conn, wire[:cut])
            conn.receive_data(b"")
            with pytest.raises(ProtocolError):
                receive_all(conn)


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from([b"hello\n", b"bzr request 2\nhello\n", b"GET / HTTP/1.1\r\n", b"\x00", b"bzr message 2 (bzr 1.6)\n"]),
    st.binary(max_size=30),
    st.integers(1, 8),
)
def test_legacy_markers_and_garbage_before_the_marker(garbage, more, step):
    """Anything but the v3 marker first gets a legacy error reply, whatever follows and however it is split."""
    wire = garbage + more + MESSAGE_MARKER + send_all(Connection(Role.CLIENT), HELLO)[len(MESSAGE_MARKER) :]
    conn = Connection(Role.SERVER)
    with pytest.raises(UnsupportedProtocolVersion) as caught:
        for start in range(0, len(wire), step):
            receive_all(conn, wire[start : start + step])
    assert caught.value.version == (2 if garbage.startswith(b"bzr request 2\n") else 1)
    assert conn.data_to_send() == caught.value.reply


@settings(max_examples=20, deadline=None)
@given(st.sampled_from([Role.CLIENT, Role.SERVER]), st.binary(min_size=1, max_size=40))
def test_garbage_after_a_whole_message_is_refused_in_the_next_cycle(role, garbage):
    """Bytes after a whole message wait for the next cycle, where they are a ProtocolError or the next message's start."""
    pair = ConnectionPair()
    pair.send(Role.CLIENT, HELLO)
    pair.send(Role.SERVER, [Response((b"ok", b"2")), EndOfMessage()])
    receiving = pair.server if role is Role.CLIENT else pair.client
    receiving.receive_data(garbage)
    assert receiving.next_event() is PAUSED
    pair.start_next_cycle()
    if role is Role.SERVER:
        send_all(pair.client, HELLO)
    try:
        assert receive_all(receiving) == []
    except ProtocolError:
        pass
    else:
        assert MESSAGE_MARKER.startswith(garbage[: len(MESSAGE_MARKER)])


def _events_per_chunk_time(parts: int, step: int) -> float:
    """CPU seconds to decode a request whose body is ``parts`` one-byte parts, fed ``step`` bytes at a time.

    CPU time, not wall time, so that other processes on the machine do not
    skew the ratio the linear-time tests compare (a quadratic decoder would
    take 64 times as long for 8 times the input).
    """
    wire = send_all(Connection(Role.CLIENT), [Request((b"put", b"f")), *[BodyChunk(b"x")] * parts, EndOfMessage()])
    conn = Connection(Role.SERVER)
    with _collector_off():
        started = time.process_time()
        count = 0
        for start in range(0, len(wire), step):
            count += len(receive_all(conn, wire[start : start + step]))
        elapsed = time.process_time() - started
    assert count == parts + 2
    return elapsed


@contextlib.contextmanager
def _collector_off():
    """Time the decoder alone: the garbage collector off, after collecting what the last run left.

    A full collection walks every object the test process holds, so with
    the collector on, the time of a run depends on what earlier tests left
    alive (in the whole suite, 200,000 parts took 20 times as long as
    25,000), which is not what the linear-time tests measure.
    """
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.parametrize("step", [7, 65536, 10**9])
def test_many_tiny_body_parts_decode_in_linear_time(step):
    """Eight times the one-byte body parts take about eight times as long, not more, however they are fed."""
    small = min(_events_per_chunk_time(25_000, step) for _ in range(3))
    large = min(_events_per_chunk_time(200_000, step) for _ in range(3))
    assert large / small < 8 * 2.5


@pytest.mark.parametrize("step", [1, 3])
def test_one_large_body_part_fed_in_tiny_pieces_decodes_in_linear_time(step):
    """A body part arriving a byte or three at a time costs time linear in its size."""
    def run(size):
        wire = send_all(Connection(Role.CLIENT), [Request((b"put", b"f")), BodyChunk(b"x" * size), EndOfMessage()])
        conn = Connection(Role.SERVER)
        with _collector_off():
            started = time.process_time()
            for start in range(0, len(wire), step):
                receive_all(conn, wire[start : start + step])
            return time.process_time() - started

    small = min(run(20_000) for _ in range(3))
    large = min(run(160_000) for _ in range(2))
    assert large / small < 8 * 2.5


@SETTINGS
@given(mutations())
def test_next_message_on_damaged_input_agrees_with_next_event(mutation):
    """On damaged bytes next_message raises nothing and gives only what next_event would give."""
    role, wire, _ = mutation
    if not wire:
        return  # b"" would be an EOF
    slow = receiver(role)
    slow.receive_data(wire)
    try:
        expected = []
        while not expected or type(expected[-1]) is not EndOfMessage:
            event = slow.next_event()
            if event is NEED_DATA:
                break
            expected.append(event)
    except ProtocolError:
        expected = None
    fast = receiver(role)
    fast.receive_data(wire)
    got = fast.next_message()
    if got is not None:
        assert got == expected
        assert _states(fast) == _states(slow)

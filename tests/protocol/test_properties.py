"""Properties that must hold for any message and any input."""

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
    ProtocolError,
    Request,
    Response,
    Role,
)

from .helpers import breezy_decode, receive_all, receiver, send_all, sender

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
    wire = bytearray(send_all(sender(role), events))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "drop", "insert", "cut"]))
        where = draw(st.integers(0, len(wire)))
        if kind == "flip" and where < len(wire):
            wire[where] = draw(st.integers(0, 255))
        elif kind == "drop" and where < len(wire):
            del wire[where]
        elif kind == "insert":
            wire[where:where] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "cut":
            del wire[where:]
    return role, bytes(wire), draw(st.integers(1, 50))


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

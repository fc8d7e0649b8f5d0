"""Exact bytes for each kind of message, checked in both directions."""

import pytest

from smartserve.protocol import (
    MESSAGE_MARKER,
    BodyChunk,
    BodyError,
    EndOfMessage,
    Request,
    Response,
    Role,
    State,
)

from .helpers import ConnectionPair, prefixed, receive_all, receiver, send_all, sender

M = MESSAGE_MARKER
NO_HEADERS = prefixed(b"de")

# (sender's role, events, the exact bytes on the wire)
CASES = [
    (
        Role.CLIENT,
        [Request((b"hello",)), EndOfMessage()],
        M + NO_HEADERS + b"s" + prefixed(b"l5:helloe") + b"e",
    ),
    (
        Role.CLIENT,
        [Request((b"get", b"a/file"), {b"k": b"v"}), EndOfMessage()],
        M + prefixed(b"d1:k1:ve") + b"s" + prefixed(b"l3:get6:a/filee") + b"e",
    ),
    (
        Role.CLIENT,
        [Request((b"put", b"f", b"")), BodyChunk(b"content"), EndOfMessage()],
        M + NO_HEADERS + b"s" + prefixed(b"l3:put1:f0:e") + b"b" + prefixed(b"content") + b"e",
    ),
    (
        Role.CLIENT,
        [
            Request((b"Repository.insert_stream", b"repo/", b"")),
            BodyChunk(b"one"),
            BodyChunk(b""),
            BodyChunk(b"three"),
            EndOfMessage(),
        ],
        M
        + NO_HEADERS
        + b"s"
        + prefixed(b"l24:Repository.insert_stream5:repo/0:e")
        + b"b" + prefixed(b"one")
        + b"b" + prefixed(b"")
        + b"b" + prefixed(b"three")
        + b"e",
    ),
    (
        Role.CLIENT,
        [Request((b"insert_stream",)), BodyChunk(b"one"), BodyError((b"error",)), EndOfMessage()],
        M
        + NO_HEADERS
        + b"s"
        + prefixed(b"l13:insert_streame")
        + b"b" + prefixed(b"one")
        + b"oEs" + prefixed(b"l5:errore")
        + b"e",
    ),
    (
        Role.SERVER,
        [Response((b"ok", b"2")), EndOfMessage()],
        M + NO_HEADERS + b"oSs" + prefixed(b"l2:ok1:2e") + b"e",
    ),
    (
        Role.SERVER,
        [Response((b"NoSuchFile", b"a/file"), success=False), EndOfMessage()],
        M + NO_HEADERS + b"oEs" + prefixed(b"l10:NoSuchFile6:a/filee") + b"e",
    ),
    (
        Role.SERVER,
        [Response((b"ok", 3, (b"x", 10)), headers={b"Software version": b"3.3"}), EndOfMessage()],
        M + prefixed(b"d16:Software version3:3.3e") + b"oSs" + prefixed(b"l2:oki3el1:xi10eee") + b"e",
    ),
    (
        Role.SERVER,
        [Response((b"ok",)), BodyChunk(b"file contents\n"), EndOfMessage()],
        M + NO_HEADERS + b"oSs" + prefixed(b"l2:oke") + b"b" + prefixed(b"file contents\n") + b"e",
    ),
    (
        Role.SERVER,
        [Response((b"ok",)), BodyChunk(b"a" * 300), BodyChunk(b"b"), EndOfMessage()],
        M + NO_HEADERS + b"oSs" + prefixed(b"l2:oke")
        + b"b" + prefixed(b"a" * 300) + b"b" + prefixed(b"b") + b"e",
    ),
    (
        Role.SERVER,
        [Response((b"ok",)), BodyChunk(b"part"), BodyError((b"error", b"boom")), EndOfMessage()],
        M + NO_HEADERS + b"oSs" + prefixed(b"l2:oke")
        + b"b" + prefixed(b"part") + b"oEs" + prefixed(b"l5:error4:boome") + b"e",
    ),
]


@pytest.mark.parametrize("role, events, data", CASES)
def test_send_gives_exact_bytes(role, events, data):
    """Sending each case's events produces exactly its bytes."""
    conn = sender(role)
    assert send_all(conn, events) == data
    assert conn.our_state is State.DONE


@pytest.mark.parametrize("role, events, data", CASES)
def test_receive_gives_exact_events(role, events, data):
    """Receiving each case's bytes produces exactly its events."""
    conn = receiver(role)
    assert receive_all(conn, data) == events
    assert conn.their_state is State.DONE
    assert conn.trailing_data == b""


@pytest.mark.parametrize("role, events, data", CASES)
def test_receive_byte_by_byte_gives_same_events(role, events, data):
    """Bytes fed one at a time decode to the same events as all at once."""
    conn = receiver(role)
    got = []
    for index in range(len(data)):
        got += receive_all(conn, data[index : index + 1])
    assert got == events


def test_send_encodes_str_arguments_as_utf8():
    """Top-level str arguments go out as UTF-8 bytes, as Breezy sends them."""
    data = send_all(sender(Role.CLIENT), [Request(("get", "d\u00e9j\u00e0")), EndOfMessage()])
    assert data == M + NO_HEADERS + b"s" + prefixed(b"l3:get6:d\xc3\xa9j\xc3\xa0e") + b"e"


def test_receive_success_status_inside_body_is_not_an_event():
    """A success status after body parts (allowed by the grammar) yields only the end."""
    data = M + NO_HEADERS + b"oSs" + prefixed(b"l2:oke") + b"b" + prefixed(b"x") + b"oS" + b"e"
    assert receive_all(receiver(Role.SERVER), data) == [
        Response((b"ok",)),
        BodyChunk(b"x"),
        EndOfMessage(),
    ]


def test_connection_pair_runs_several_cycles():
    """One pair carries request/response cycles back to back."""
    pair = ConnectionPair()
    for number in range(3):
        pair.send(Role.CLIENT, [Request((b"get", b"%d" % number)), EndOfMessage()])
        pair.send(Role.SERVER, [Response((b"ok",)), BodyChunk(b"body %d" % number), EndOfMessage()])
        assert pair.client.our_state is pair.server.our_state is State.DONE
        pair.start_next_cycle()
        assert pair.client.their_state is pair.server.their_state is State.IDLE


def test_send_with_data_passthrough_matches_send():
    """The passthrough variant writes the same bytes and keeps body data uncopied."""
    events = CASES[-2][1]
    expected = send_all(sender(Role.SERVER), events)
    conn = sender(Role.SERVER)
    pieces = [conn.send_with_data_passthrough(event) for event in events]
    assert b"".join(b"".join(piece) for piece in pieces) == expected
    assert pieces[1][-1] is events[1].data

"""End of file handling and the message state machine."""

import pytest
from breezy import errors

from smartserve.protocol import (
    MESSAGE_MARKER,
    NEED_DATA,
    PAUSED,
    BodyChunk,
    BodyError,
    ConnectionClosed,
    Connection,
    EndOfMessage,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    Request,
    Response,
    Role,
    State,
)

from .helpers import HELLO, ConnectionPair, breezy_read_response, prefixed, receive_all, send_all, sender

STREAM = [Request((b"insert_stream", b"r/")), BodyChunk(b"ab"), BodyError((b"error",)), EndOfMessage()]


def test_eof_at_start_is_connection_closed():
    """EOF before any message is a clean close."""
    server = Connection(Role.SERVER)
    server.receive_data(b"")
    assert server.next_event() == ConnectionClosed()
    assert server.their_state is State.CLOSED
    assert server.next_event() == ConnectionClosed()
    assert server.data_to_send() == b""


def test_eof_between_messages_is_connection_closed():
    """EOF after a complete message is a clean close on either side."""
    pair = ConnectionPair()
    pair.send(Role.CLIENT, HELLO)
    pair.send(Role.SERVER, [Response((b"ok", b"2")), EndOfMessage()])
    pair.server.receive_data(b"")
    assert pair.server.next_event() == ConnectionClosed()
    pair.client.receive_data(b"")
    assert pair.client.next_event() == ConnectionClosed()
    assert pair.client.their_eof


def test_eof_after_cycle_is_connection_closed():
    """EOF once the next cycle has started is a clean close."""
    pair = ConnectionPair()
    pair.send(Role.CLIENT, HELLO)
    pair.send(Role.SERVER, [Response((b"ok", b"2")), EndOfMessage()])
    pair.start_next_cycle()
    pair.server.receive_data(b"")
    assert pair.server.next_event() == ConnectionClosed()


@pytest.mark.parametrize("role", [Role.CLIENT, Role.SERVER])
def test_eof_mid_message_is_remote_error(role):
    """EOF at any point inside a message is a protocol error, never a clean close."""
    if role is Role.CLIENT:
        data = send_all(sender(Role.CLIENT), STREAM)
    else:
        data = send_all(sender(Role.SERVER), [Response((b"ok",)), BodyChunk(b"ab"), EndOfMessage()])
    for cut in range(1, len(data)):
        pair = ConnectionPair()
        if role is Role.SERVER:
            pair.send(Role.CLIENT, HELLO)
        conn = pair.conn[pair.other(role)]
        receive_all(conn, data[:cut])
        conn.receive_data(b"")
        with pytest.raises(RemoteProtocolError):
            conn.next_event()
        assert conn.their_state is State.ERROR


def test_data_after_eof_is_remote_error():
    """Bytes fed after EOF are refused."""
    server = Connection(Role.SERVER)
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        server.receive_data(b"x")


MALFORMED = [
    MESSAGE_MARKER + prefixed(b"not bencode") + b"s" + prefixed(b"l3:gete") + b"e",
    MESSAGE_MARKER + prefixed(b"le") + b"s" + prefixed(b"l3:gete") + b"e",
    MESSAGE_MARKER + prefixed(b"de") + b"x",
    MESSAGE_MARKER + prefixed(b"de") + b"s" + prefixed(b"i3e") + b"e",
    MESSAGE_MARKER + prefixed(b"de") + b"s" + prefixed(b"le") + b"e",
    MESSAGE_MARKER + prefixed(b"de") + b"s" + prefixed(b"li3ee") + b"e",
    MESSAGE_MARKER + prefixed(b"de") + b"s" + prefixed(b"l3:gete") + b"z",
    MESSAGE_MARKER + prefixed(b"de") + b"s" + prefixed(b"l3:gete") + b"oX",
    MESSAGE_MARKER + prefixed(b"de") + b"s" + prefixed(b"l3:gete") + b"oEb",
    b"GET / HTTP/1.1\r\n",
]


@pytest.mark.parametrize("data", MALFORMED)
def test_malformed_request_queues_error_breezy_reads(data):
    """A malformed request raises, and the server queues a v3 error Breezy's client raises."""
    server = Connection(Role.SERVER)
    server.receive_data(data)
    with pytest.raises(RemoteProtocolError):
        receive_all(server)
    assert server.their_state is State.ERROR
    reply = server.data_to_send()
    if data.startswith(MESSAGE_MARKER):
        with pytest.raises(errors.ErrorFromSmartServer) as caught:
            breezy_read_response(reply).read_response_tuple()
        assert caught.value.error_tuple[0] == b"error"
    else:
        assert reply.endswith(b"\n")
    assert server.data_to_send() == b""
    with pytest.raises(RemoteProtocolError):
        server.next_event()


def test_malformed_body_after_response_started_queues_nothing():
    """Once our response has begun, a broken request adds no second reply."""
    server = Connection(Role.SERVER)
    server.receive_data(send_all(Connection(Role.CLIENT), [Request((b"get",))]))
    receive_all(server)
    server.send(Response((b"ok",)))
    server.receive_data(b"?")
    with pytest.raises(RemoteProtocolError):
        server.next_event()
    assert server.data_to_send() == b""


def test_pipelined_request_waits_for_next_cycle():
    """A second request already received is PAUSED until the cycle restarts."""
    client = Connection(Role.CLIENT)
    data = send_all(client, HELLO)
    server = Connection(Role.SERVER)
    assert receive_all(server, data + data) == HELLO
    assert server.next_event() is PAUSED
    server.send(Response((b"ok", b"2")))
    server.send(EndOfMessage())
    server.start_next_cycle()
    assert receive_all(server) == HELLO


def test_client_receiving_response_before_request_is_remote_error():
    """A response that answers no request is the peer's protocol error."""
    client = Connection(Role.CLIENT)
    client.receive_data(send_all(sender(Role.SERVER), [Response((b"ok",)), EndOfMessage()]))
    with pytest.raises(RemoteProtocolError):
        client.next_event()


def _after(role, events):
    conn = sender(role)
    send_all(conn, events)
    return conn


# (role, events already sent, event whose sending the protocol forbids)
OUT_OF_ORDER = [
    (Role.CLIENT, [], BodyChunk(b"x")),
    (Role.CLIENT, [], EndOfMessage()),
    (Role.CLIENT, [], Response((b"ok",))),
    (Role.CLIENT, [Request((b"get",))], Request((b"get",))),
    (Role.CLIENT, HELLO, Request((b"get",))),
    (Role.CLIENT, HELLO, BodyChunk(b"x")),
    (Role.CLIENT, [Request((b"get",)), BodyError((b"error",))], BodyChunk(b"x")),
    (Role.CLIENT, [Request((b"get",)), BodyError((b"error",))], BodyError((b"error",))),
    (Role.SERVER, [], Request((b"get",))),
    (Role.SERVER, [Response((b"ok",))], Response((b"ok",))),
    (Role.SERVER, [Response((b"ok",)), EndOfMessage()], EndOfMessage()),
]


@pytest.mark.parametrize("role, before, event", OUT_OF_ORDER)
def test_send_out_of_order_is_local_error_and_keeps_state(role, before, event):
    """Sending what the state forbids raises LocalProtocolError and changes nothing."""
    conn = _after(role, before)
    states = (conn.our_state, conn.their_state)
    with pytest.raises(LocalProtocolError):
        conn.send(event)
    assert (conn.our_state, conn.their_state) == states


@pytest.mark.parametrize("role, before, event", OUT_OF_ORDER)
def test_send_with_data_passthrough_out_of_order_is_local_error(role, before, event):
    """The passthrough variant refuses the same events and changes nothing either."""
    conn = _after(role, before)
    states = (conn.our_state, conn.their_state)
    with pytest.raises(LocalProtocolError):
        conn.send_with_data_passthrough(event)
    assert (conn.our_state, conn.their_state) == states


@pytest.mark.parametrize("data", ["text", 3, [b"a"]])
def test_a_body_that_is_not_bytes_is_refused_before_anything_is_sent(data):
    """A str or number as a body is refused up front by each way of sending one, the state unchanged.

    Found wrong: ``send_message`` and the passthrough marked the message
    sent before a ``str`` body failed, leaving the connection unusable.
    """
    client = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError, match="a body part is bytes"):
        client.send_message(Request((b"put", b"f")), data)
    assert client.our_state is State.IDLE
    client.send(Request((b"put", b"f")))
    for send in (client.send, client.send_with_data_passthrough):
        with pytest.raises(LocalProtocolError, match="a body part is bytes"):
            send(BodyChunk(data))
        assert client.our_state is State.BODY


def test_a_memoryview_body_is_sent_by_its_bytes():
    """A body given as a memoryview of wider items is framed by its size in bytes."""
    import array

    data = array.array("I", [1, 2, 3])
    client = Connection(Role.CLIENT)
    parts = client.send_message(Request((b"put", b"f")), memoryview(data))
    reference = Connection(Role.CLIENT).send_message(Request((b"put", b"f")), data.tobytes())
    assert b"".join(parts) == b"".join(reference)


def test_client_sending_response_is_told_the_state():
    """A client trying to send a response is told what its state allows."""
    with pytest.raises(LocalProtocolError, match="Response not allowed when the client is IDLE"):
        Connection(Role.CLIENT).send(Response((b"ok",)))


def test_server_response_before_request_is_local_error():
    """A server may not open a response before it has received a request."""
    server = Connection(Role.SERVER)
    with pytest.raises(LocalProtocolError, match="must follow a request"):
        server.send(Response((b"ok",)))
    assert server.our_state is State.IDLE


def test_send_request_without_verb_is_local_error():
    """A request needs a verb as its first argument."""
    client = Connection(Role.CLIENT)
    for args in [(), (3,), (None,)]:
        with pytest.raises(LocalProtocolError):
            client.send(Request(args))
    assert client.our_state is State.IDLE


def test_send_unencodable_arguments_is_local_error():
    """Arguments bencode cannot carry raise LocalProtocolError, not TypeError."""
    client = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError):
        client.send(Request((b"get", 1.5)))
    with pytest.raises(LocalProtocolError):
        client.send(Request((b"get",), {b"k": object()}))
    assert client.our_state is State.IDLE


def test_start_next_cycle_before_done_is_local_error():
    """The next cycle starts only once both messages are complete."""
    pair = ConnectionPair()
    pair.send(Role.CLIENT, HELLO)
    with pytest.raises(LocalProtocolError):
        pair.client.start_next_cycle()
    with pytest.raises(LocalProtocolError):
        pair.server.start_next_cycle()
    assert pair.server.their_state is State.DONE
    assert pair.server.our_state is State.IDLE


def test_send_failed_stops_sending():
    """After send_failed nothing more can be sent."""
    client = Connection(Role.CLIENT)
    client.send(Request((b"get",)))
    client.send_failed()
    assert client.our_state is State.ERROR
    with pytest.raises(LocalProtocolError):
        client.send(EndOfMessage())


def test_errors_share_one_base():
    """Every codec error is a ProtocolError carrying a v3 error tuple."""
    for cls in (LocalProtocolError, RemoteProtocolError):
        exc = cls("boom")
        assert isinstance(exc, ProtocolError)
        assert exc.error_args == (b"error", b"boom")


def test_receive_nothing_is_need_data():
    """With no bytes yet, a connection needs data."""
    assert Connection(Role.SERVER).next_event() is NEED_DATA


def test_header_values_equal_as_numbers_encode_by_their_own_type():
    """Headers sent before are remembered, but 1.0 after 1 is still refused, not sent as i1e."""
    assert b"d1:xi1ee" in Connection(Role.CLIENT).send(Request((b"hello",), {b"x": 1}))
    with pytest.raises(LocalProtocolError):
        Connection(Role.CLIENT).send(Request((b"hello",), {b"x": 1.0}))

"""Our codec against Breezy's own: same bytes, same events, both ways."""

import breezy
import pytest
from breezy import errors
from breezy.bzr.smart import protocol as breezy_protocol
from breezy.bzr.smart import request as breezy_request
from breezy.bzr.smart.message import ConventionalRequestHandler
from breezy.transport import NoSuchFile
from breezy.transport.memory import MemoryTransport

from smartserve.protocol import (
    MESSAGE_MARKER,
    BodyChunk,
    BodyError,
    EndOfMessage,
    Request,
    Response,
    Role,
)

from .helpers import (
    MediumRequest,
    breezy_decode,
    breezy_read_response,
    receive_all,
    receiver,
    send_all,
    sender,
)

BREEZY_HEADERS = {b"Software version": breezy.__version__.encode()}


class _StreamFailed(Exception):
    """Raised by a body stream to make Breezy abort it."""


def _failing_stream(*chunks):
    yield from chunks
    raise _StreamFailed("stream broke")


def _missing_file_stream():
    yield b"one"
    raise NoSuchFile("gone")


def _breezy_request(method: str, *args, headers=None) -> bytes:
    medium_request = MediumRequest()
    requester = breezy_protocol.ProtocolThreeRequester(medium_request)
    if headers is not None:
        requester.set_headers(headers)
    args = [arg() if callable(arg) else arg for arg in args]
    try:
        getattr(requester, method)(*args)
    except _StreamFailed:
        pass
    return medium_request.written


def _breezy_response(make_response) -> bytes:
    response = make_response()
    written = []
    responder = breezy_protocol.ProtocolThreeResponder(written.append)
    if isinstance(response, Exception):
        responder.send_error(response)
    else:
        responder.send_response(response)
    return b"".join(written)


Ok = breezy_request.SuccessfulSmartServerResponse
Failed = breezy_request.FailedSmartServerResponse

# (what Breezy is asked to write, the events that say the same); streams and
# responses are built afresh for each test, as Breezy consumes them.
REQUESTS = [
    (("call", b"hello"), [Request((b"hello",)), EndOfMessage()]),
    (
        ("call", b"get", b"a/b"),
        [Request((b"get", b"a/b")), EndOfMessage()],
    ),
    (
        ("call_with_body_bytes", (b"put", b"f", b""), b"data\x00\xff"),
        [Request((b"put", b"f", b"")), BodyChunk(b"data\x00\xff"), EndOfMessage()],
    ),
    (
        ("call_with_body_readv_array", (b"readv", b"f"), [(0, 10), (20, 5)]),
        [Request((b"readv", b"f")), BodyChunk(b"0,10\n20,5"), EndOfMessage()],
    ),
    (
        ("call_with_body_stream", (b"Repository.insert_stream", b"r/", b""), lambda: iter([b"a", b"bb", b"ccc"])),
        [
            Request((b"Repository.insert_stream", b"r/", b"")),
            BodyChunk(b"a"),
            BodyChunk(b"bb"),
            BodyChunk(b"ccc"),
            EndOfMessage(),
        ],
    ),
    (
        ("call_with_body_stream", (b"Repository.insert_stream", b"r/", b""), lambda: _failing_stream(b"a", b"b")),
        [
            Request((b"Repository.insert_stream", b"r/", b"")),
            BodyChunk(b"a"),
            BodyChunk(b"b"),
            BodyError((b"error",)),
            EndOfMessage(),
        ],
    ),
]

RESPONSES = [
    (lambda: Ok((b"ok", b"2")), [Response((b"ok", b"2"), True, BREEZY_HEADERS), EndOfMessage()]),
    (
        lambda: Failed((b"NoSuchFile", b"a/b")),
        [Response((b"NoSuchFile", b"a/b"), False, BREEZY_HEADERS), EndOfMessage()],
    ),
    (
        lambda: Ok((b"ok", 7, (b"x", b"y")), body=b"the body"),
        [
            Response((b"ok", 7, (b"x", b"y")), True, BREEZY_HEADERS),
            BodyChunk(b"the body"),
            EndOfMessage(),
        ],
    ),
    (
        lambda: Ok((b"ok",), body_stream=iter([b"one", b"two", b"three"])),
        [
            Response((b"ok",), True, BREEZY_HEADERS),
            BodyChunk(b"one"),
            BodyChunk(b"two"),
            BodyChunk(b"three"),
            EndOfMessage(),
        ],
    ),
    (
        lambda: Ok((b"ok",), body_stream=iter([b"one", Failed((b"NoSuchRevision", b"rev-1"))])),
        [
            Response((b"ok",), True, BREEZY_HEADERS),
            BodyChunk(b"one"),
            BodyError((b"NoSuchRevision", b"rev-1")),
            EndOfMessage(),
        ],
    ),
    (
        lambda: Ok((b"ok",), body_stream=_missing_file_stream()),
        [
            Response((b"ok",), True, BREEZY_HEADERS),
            BodyChunk(b"one"),
            BodyError((b"NoSuchFile", b"gone")),
            EndOfMessage(),
        ],
    ),
    (
        lambda: errors.BzrError("something broke"),
        [Response((b"error", b"something broke"), False, BREEZY_HEADERS), EndOfMessage()],
    ),
]


def _ids(cases):
    return [str(index) for index in range(len(cases))]


@pytest.mark.parametrize("call, events", REQUESTS, ids=_ids(REQUESTS))
def test_breezy_request_decodes_to_events(call, events):
    """What Breezy's requester writes, our server reads as the same request."""
    data = _breezy_request(*call)
    assert receive_all(receiver(Role.CLIENT), data) == events


@pytest.mark.parametrize("call, events", REQUESTS, ids=_ids(REQUESTS))
def test_request_bytes_equal_breezy(call, events):
    """Our client writes a request byte for byte as Breezy's requester does."""
    assert send_all(sender(Role.CLIENT), events) == _breezy_request(*call)


@pytest.mark.parametrize("call, events", REQUESTS, ids=_ids(REQUESTS))
def test_breezy_decodes_our_request(call, events):
    """Breezy's decoder, fed our request in pieces, finds the same content."""
    data = send_all(sender(Role.CLIENT), events)
    assert breezy_decode(Role.CLIENT, data, pieces=3) == events


@pytest.mark.parametrize("response, events", RESPONSES, ids=_ids(RESPONSES))
def test_breezy_response_decodes_to_events(response, events):
    """What Breezy's responder writes, our client reads as the same response."""
    data = _breezy_response(response)
    assert receive_all(receiver(Role.SERVER), data) == events


@pytest.mark.parametrize("response, events", RESPONSES, ids=_ids(RESPONSES))
def test_response_bytes_equal_breezy(response, events):
    """Given Breezy's headers, our server writes a response byte for byte as Breezy."""
    assert send_all(sender(Role.SERVER), events) == _breezy_response(response)


@pytest.mark.parametrize("response, events", RESPONSES, ids=_ids(RESPONSES))
def test_breezy_decodes_our_response(response, events):
    """Breezy's decoder, fed our response in pieces, finds the same content."""
    data = send_all(sender(Role.SERVER), events)
    assert breezy_decode(Role.SERVER, data, pieces=4) == events


def test_breezy_client_reads_our_streamed_response():
    """Breezy's client handler reads our streamed body and raises its mid-stream error."""
    data = send_all(
        sender(Role.SERVER),
        [Response((b"ok",)), BodyChunk(b"one"), BodyChunk(b"two"), BodyError((b"NoSuchRevision", b"r1")), EndOfMessage()],
    )
    handler = breezy_read_response(data)
    assert handler.read_response_tuple(expect_body=True) == (b"ok",)
    chunks = []
    with pytest.raises(errors.ErrorFromSmartServer) as caught:
        for chunk in handler.read_streamed_body():
            chunks.append(chunk)
    assert chunks == [b"one", b"two"]
    assert caught.value.error_tuple == (b"NoSuchRevision", b"r1")


def test_breezy_client_reads_our_error_response():
    """Breezy's client handler raises our error response as the server's error."""
    data = send_all(sender(Role.SERVER), [Response((b"NoSuchFile", b"x"), success=False), EndOfMessage()])
    with pytest.raises(errors.ErrorFromSmartServer) as caught:
        breezy_read_response(data).read_response_tuple()
    assert caught.value.error_tuple == (b"NoSuchFile", b"x")


def test_breezy_client_reads_our_body():
    """Breezy's client handler reads our one-part body."""
    data = send_all(sender(Role.SERVER), [Response((b"ok",)), BodyChunk(b"contents"), EndOfMessage()])
    handler = breezy_read_response(data)
    assert handler.read_response_tuple(expect_body=True) == (b"ok",)
    assert handler.read_body_bytes() == b"contents"


def _breezy_server(transport):
    """Breezy's real v3 server protocol over ``transport``, and what it writes."""
    written = []
    decoder = breezy_protocol.build_server_protocol_three(transport, written.append, "/")
    assert isinstance(decoder.message_handler, ConventionalRequestHandler)
    return decoder, written


def test_breezy_server_answers_our_client():
    """Breezy's own server runs requests our client encodes, and we read its replies."""
    transport = MemoryTransport()
    transport.put_bytes("file", b"file contents")
    client = sender(Role.CLIENT)
    for events, expected in [
        ([Request((b"hello",)), EndOfMessage()], [Response((b"ok", b"2"), True, BREEZY_HEADERS), EndOfMessage()]),
        (
            [Request((b"get", b"file")), EndOfMessage()],
            [Response((b"ok",), True, BREEZY_HEADERS), BodyChunk(b"file contents"), EndOfMessage()],
        ),
        (
            [Request((b"put", b"new", b"")), BodyChunk(b"new contents"), EndOfMessage()],
            [Response((b"ok",), True, BREEZY_HEADERS), EndOfMessage()],
        ),
        (
            [Request((b"get", b"missing")), EndOfMessage()],
            [Response((b"NoSuchFile", b"./missing"), False, BREEZY_HEADERS), EndOfMessage()],
        ),
    ]:
        data = send_all(client, events)
        assert data.startswith(MESSAGE_MARKER)
        decoder, written = _breezy_server(transport)
        # Breezy's server medium reads the marker itself before the decoder runs.
        decoder.accept_bytes(data[len(MESSAGE_MARKER) :])
        assert receive_all(client, b"".join(written)) == expected
        client.start_next_cycle()
    assert transport.get_bytes("new") == b"new contents"


def test_our_server_answers_breezy_client():
    """Our server reads what Breezy's client sends and Breezy reads our reply."""
    server = sender(Role.SERVER)
    server.send(Response((b"ok", b"2")))
    server.send(EndOfMessage())
    server.start_next_cycle()
    request_bytes = _breezy_request("call_with_body_bytes", (b"put", b"f", b""), b"body")
    assert receive_all(server, request_bytes) == [
        Request((b"put", b"f", b"")),
        BodyChunk(b"body"),
        EndOfMessage(),
    ]
    reply = send_all(server, [Response((b"ok",), headers=BREEZY_HEADERS), EndOfMessage()])
    handler = breezy_read_response(reply)
    assert handler.read_response_tuple() == (b"ok",)
    assert handler.headers == BREEZY_HEADERS

"""Protocol versions 1 and 2 get a clear error in their own format."""

import pytest
from breezy import errors
from breezy.bzr.smart import protocol as breezy_protocol

from smartserve.protocol import (
    NEED_DATA,
    Connection,
    RemoteProtocolError,
    Role,
    State,
    UnsupportedProtocolVersion,
)

from .helpers import MediumRequest, receiver

V1_HELLO = b"hello\n"
V2_HELLO = b"bzr request 2\nhello\n"


def _breezy_v1_request() -> bytes:
    medium_request = MediumRequest()
    breezy_protocol.SmartClientRequestProtocolOne(medium_request).call(b"hello")
    return medium_request.written


def _breezy_v2_request() -> bytes:
    medium_request = MediumRequest()
    breezy_protocol.SmartClientRequestProtocolTwo(medium_request).call(b"hello")
    return medium_request.written


def _refuse(data: bytes) -> tuple[UnsupportedProtocolVersion, bytes]:
    server = Connection(Role.SERVER)
    server.receive_data(data)
    with pytest.raises(UnsupportedProtocolVersion) as caught:
        server.next_event()
    assert server.their_state is State.ERROR
    return caught.value, server.data_to_send()


def test_legacy_requests_are_what_breezy_sends():
    """The v1 and v2 requests used here are the ones Breezy's old clients write."""
    assert _breezy_v1_request() == V1_HELLO
    assert _breezy_v2_request() == V2_HELLO


def test_v1_request_gets_v1_error_reply():
    """A v1 request is refused with a reply Breezy's v1 client reads as an error."""
    exc, reply = _refuse(V1_HELLO)
    assert exc.version == 1
    assert reply == exc.reply
    client = breezy_protocol.SmartClientRequestProtocolOne(MediumRequest(reply))
    client.call(b"hello")
    result = client.read_response_tuple()
    # Version 1 has no status flag: Breezy's v1 server reports every failure
    # as an ("error", message) tuple, and that is what we send.
    assert result[0] == b"error"
    assert b"version 3" in result[1]
    with pytest.raises(errors.SmartProtocolError):
        breezy_protocol.SmartClientRequestProtocolOne(MediumRequest(reply)).query_version()


def test_v2_request_gets_v2_error_reply():
    """A v2 request is refused with a reply Breezy's v2 client raises as an error."""
    exc, reply = _refuse(V2_HELLO)
    assert exc.version == 2
    assert reply == exc.reply
    client = breezy_protocol.SmartClientRequestProtocolTwo(MediumRequest(reply))
    client.call(b"hello")
    with pytest.raises(errors.ErrorFromSmartServer) as caught:
        client.read_response_tuple()
    assert caught.value.error_tuple[0] == b"error"
    assert b"version 3" in caught.value.error_tuple[1]


@pytest.mark.parametrize("data, version", [(V1_HELLO, 1), (V2_HELLO, 2), (b"bzr x\n", 1)])
def test_legacy_request_fed_byte_by_byte_is_refused(data, version):
    """Fed one byte at a time, a legacy request is refused by the end of its line."""
    server = Connection(Role.SERVER)
    for index, byte in enumerate(data):
        server.receive_data(bytes([byte]))
        try:
            assert server.next_event() is NEED_DATA
        except UnsupportedProtocolVersion as exc:
            assert exc.version == version
            assert server.data_to_send() == exc.reply
            return
    pytest.fail(f"still waiting after all {len(data)} bytes")


def test_legacy_request_refused_on_first_byte_when_v1():
    """A line that cannot start any v2 or v3 marker is refused at its first byte."""
    server = Connection(Role.SERVER)
    server.receive_data(b"h")
    with pytest.raises(UnsupportedProtocolVersion):
        server.next_event()


def test_client_rejects_v2_response():
    """A client answered in version 2 raises a remote protocol error, no reply queued."""
    client = receiver(Role.SERVER)
    client.receive_data(b"bzr response 2\nsuccess\nok\x012\n")
    with pytest.raises(RemoteProtocolError) as caught:
        client.next_event()
    assert not isinstance(caught.value, UnsupportedProtocolVersion)
    assert client.data_to_send() == b""

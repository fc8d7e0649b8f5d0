"""Streamed responses: the next slice is made while the transport sends the last, and never more than one ahead.

The start of a streamed response (up to ``hold_response_bytes``) is held
until its stream ends; the tests of sending as made turn holding off.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from smartserve.protocol import NEED_DATA, BodyChunk, BodyError, Connection, EndOfMessage, Request, Role
from smartserve.server.caller import Caller
from smartserve.server.dispatcher import Dispatcher
from smartserve.server.interfaces import IBackend, IBodyStream, IRequestRun
from smartserve.server.jail import Writable
from smartserve.server.protocol import SmartServerFactory
from smartserve.server.reply import Reply, StreamFailure
from smartserve.testing import encode_request, response_args
from support import logged_events


@implementer(IBodyStream)
class _SlowStream:
    """A stream whose slices are made only when the test says so."""

    description = "test stream"

    def __init__(self, slices):
        self.slices = list(slices)
        self.pulls = []
        self.closed = False

    def pull(self, max_bytes):
        d = defer.Deferred()
        self.pulls.append(d)
        return d

    def make_next(self):
        """Finish the oldest pull in flight with the next slice (or the end)."""
        d = self.pulls.pop(0)
        d.callback([self.slices.pop(0)] if self.slices else [])

    def close(self):
        self.closed = True


@implementer(IBackend)
class _StreamingBackend:
    def __init__(self, stream):
        self.stream = stream

    def knows(self, verb):
        return True

    def start(self, caller, args):
        return _Run(self.stream)


@implementer(IRequestRun)
class _Run:
    held_body_bytes = 0

    def __init__(self, stream):
        self.stream = stream

    def advance(self, chunks, finished):
        return defer.succeed(Reply((b"ok",), stream=self.stream) if finished else None)

    def abort(self):
        pass


def _body(data: bytes) -> bytes:
    """The body of one whole response to a bodyless request."""
    events = _events(data)
    assert isinstance(events[-1], EndOfMessage), "the response did not end"
    return b"".join(event.data for event in events if isinstance(event, BodyChunk))


def test_stream_slice_is_made_while_the_transport_is_paused_and_written_on_resume():
    stream = _SlowStream([b"one", b"two", b"three"])
    factory = SmartServerFactory(Dispatcher(_StreamingBackend(stream)), clock=Clock(), hold_response_bytes=0)
    protocol = factory.build_protocol(Caller(None, "memory", Writable.nowhere()))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(encode_request([b"get"]))
    assert len(stream.pulls) == 1
    stream.make_next()  # "one" is written, "two" asked for at once
    assert b"one" in transport.value() and len(stream.pulls) == 1

    protocol.pauseProducing()  # the transport's buffer is full
    stream.make_next()  # "two" is made meanwhile, and held
    assert b"two" not in transport.value()
    assert stream.pulls == [], "more than one slice ahead of a paused transport"

    protocol.resumeProducing()  # "two" goes out, "three" is asked for
    assert b"two" in transport.value() and len(stream.pulls) == 1
    stream.make_next()
    stream.make_next()  # the end
    assert _body(transport.value()) == b"onetwothree"
    assert stream.closed
    assert protocol.requests_served == 1


def test_stream_is_not_pulled_twice_at_once_while_paused():
    stream = _SlowStream([b"a" * 10, b"b" * 10])
    factory = SmartServerFactory(Dispatcher(_StreamingBackend(stream)), clock=Clock(), hold_response_bytes=0)
    protocol = factory.build_protocol(Caller(None, "memory", Writable.nowhere()))
    protocol.makeConnection(StringTransport())
    protocol.dataReceived(encode_request([b"get"]))
    protocol.pauseProducing()
    protocol.resumeProducing()
    protocol.pauseProducing()
    assert len(stream.pulls) == 1


def _events(data: bytes) -> list:
    """The client-side events of one response to a bodyless request."""
    codec = Connection(Role.CLIENT)
    codec.send(Request((b"get",)))
    codec.send(EndOfMessage())
    codec.receive_data(data)
    events = []
    while (event := codec.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, EndOfMessage):
            break
    return events


def _serving(stream, hold_response_bytes=0):
    factory = SmartServerFactory(
        Dispatcher(_StreamingBackend(stream)), clock=Clock(), hold_response_bytes=hold_response_bytes
    )
    access_lines = []
    factory.access_log = Logger(observer=lambda event: access_lines.append(event["access_line"]))
    protocol = factory.build_protocol(Caller(None, "memory", Writable.nowhere()))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(encode_request([b"get"]))
    return protocol, transport, access_lines


def test_stream_failure_mid_body_ends_the_response_with_its_error():
    """A stream that fails after a part has gone ends the body with that error; the connection stays usable."""
    stream = _SlowStream([b"one", StreamFailure((b"error", b"NoSuchRevision", b"r1"))])
    protocol, transport, access_lines = _serving(stream)
    stream.make_next()
    stream.make_next()
    events = _events(transport.value())
    assert events[1:] == [BodyChunk(b"one"), BodyError((b"error", b"NoSuchRevision", b"r1")), EndOfMessage()]
    assert stream.closed and protocol.requests_served == 1
    assert " stream-error " in access_lines[-1]
    assert not transport.disconnecting


def test_stream_pull_that_raises_ends_the_response_with_an_internal_error():
    """A stream whose slice could not be made ends the body with InternalError, not a hang or a cut connection."""
    stream = _SlowStream([b"one"])
    protocol, transport, access_lines = _serving(stream)
    stream.make_next()
    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        stream.pulls.pop(0).errback(RuntimeError("disk on fire"))
    finally:
        globalLogPublisher.removeObserver(logged.append)
    failures = [event["log_failure"] for event in logged if "log_failure" in event]
    assert [str(failure.value) for failure in failures] == ["disk on fire"], "the operator never hears why"
    events = _events(transport.value())
    assert events[1:] == [
        BodyChunk(b"one"),
        BodyError((b"error", b"InternalError", b"the server failed")),
        EndOfMessage(),
    ]
    assert stream.closed and protocol.requests_served == 1
    assert " stream-error " in access_lines[-1]
    assert not transport.disconnecting


def test_stream_error_that_cannot_be_encoded_ends_the_response_with_an_internal_error():
    """A stream error whose arguments bencode cannot carry still ends the response, with InternalError; logged once."""
    stream = _SlowStream([b"one", StreamFailure((b"TokenMismatch", b"tok", None))])
    protocol, transport, access_lines = _serving(stream)
    stream.make_next()
    with logged_events(lambda event: "could not be encoded" in event.get("log_format", "")) as warnings:
        stream.make_next()
    events = _events(transport.value())
    assert events[1:] == [
        BodyChunk(b"one"),
        BodyError((b"error", b"InternalError", b"the server could not encode its TokenMismatch error")),
        EndOfMessage(),
    ]
    assert len(warnings) == 1
    assert stream.closed and protocol.requests_served == 1
    assert " stream-error " in access_lines[-1]
    protocol.dataReceived(encode_request([b"get"]))  # the connection serves on
    assert len(stream.pulls) == 1
    assert not transport.disconnecting


def test_reply_that_cannot_be_encoded_is_answered_with_an_internal_error():
    """A reply whose arguments bencode cannot carry becomes an InternalError reply; its stream is closed unsent."""
    stream = _SlowStream([b"one"])
    factory = SmartServerFactory(Dispatcher(_UnencodableBackend(stream)), clock=Clock())
    protocol = factory.build_protocol(Caller(None, "memory", Writable.nowhere()))
    transport = StringTransport()
    protocol.makeConnection(transport)
    with logged_events(lambda event: "could not be encoded" in event.get("log_format", "")) as warnings:
        protocol.dataReceived(encode_request([b"get"]))
    assert response_args(transport.value()) == [
        (b"error", b"InternalError", b"the server could not encode its TokenMismatch reply")
    ]
    assert len(warnings) == 1 and stream.closed and stream.pulls == []
    assert protocol.requests_served == 1 and not protocol.busy
    assert not transport.disconnecting


@implementer(IBackend)
class _UnencodableBackend(_StreamingBackend):
    def start(self, caller, args):
        return _UnencodableRun(self.stream)


@implementer(IRequestRun)
class _UnencodableRun(_Run):
    def advance(self, chunks, finished):
        return defer.succeed(Reply((b"TokenMismatch", b"tok", None), success=False, stream=self.stream))


def test_held_response_is_written_whole_once_its_stream_ends():
    """Nothing of a response under the hold size, not even its tuple, is written before the stream ends."""
    stream = _SlowStream([b"one", b"two"])
    protocol, transport, access_lines = _serving(stream, hold_response_bytes=1024)
    stream.make_next()
    stream.make_next()
    assert transport.value() == b"", "a server dying now would leave the client a response it cannot resend"
    assert len(stream.pulls) == 1, "holding stops the stream being made"
    stream.make_next()  # the end
    events = _events(transport.value())
    assert events[1:] == [BodyChunk(b"one"), BodyChunk(b"two"), EndOfMessage()]
    assert stream.closed and protocol.requests_served == 1
    assert " out=%d " % len(transport.value()) in access_lines[-1]


def test_held_response_goes_out_once_the_hold_size_is_made_then_streams():
    """A response larger than the hold size is written once that much is made, and streamed from there on."""
    stream = _SlowStream([b"a" * 600, b"b" * 600, b"c" * 600])
    protocol, transport, _ = _serving(stream, hold_response_bytes=1000)
    stream.make_next()
    assert transport.value() == b""
    stream.make_next()  # 1,200 bytes made: over the hold size
    assert b"b" * 600 in transport.value() and b"c" not in transport.value()
    written = len(transport.value())
    stream.make_next()
    assert len(transport.value()) > written, "after the hold, slices go out as they are made"
    stream.make_next()
    assert _body(transport.value()) == b"a" * 600 + b"b" * 600 + b"c" * 600


def test_connection_lost_while_holding_writes_nothing_and_closes_the_stream():
    stream = _SlowStream([b"one", b"two"])
    protocol, transport, _ = _serving(stream, hold_response_bytes=1024)
    stream.make_next()
    protocol.connectionLost(Failure(ConnectionDone()))
    assert transport.value() == b""
    assert stream.closed


def test_stream_error_of_a_held_response_goes_out_with_what_was_held():
    stream = _SlowStream([b"one", StreamFailure((b"error", b"NoSuchRevision", b"r1"))])
    protocol, transport, access_lines = _serving(stream, hold_response_bytes=1024)
    stream.make_next()
    assert transport.value() == b""
    stream.make_next()
    events = _events(transport.value())
    assert events[1:] == [BodyChunk(b"one"), BodyError((b"error", b"NoSuchRevision", b"r1")), EndOfMessage()]
    assert " stream-error " in access_lines[-1]

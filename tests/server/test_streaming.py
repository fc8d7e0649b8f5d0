"""Streamed responses: the next slice is made while the transport sends the last, and never more than one ahead."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from smartserve.protocol import NEED_DATA, BodyChunk, Connection, EndOfMessage, Request, Role
from smartserve.server.caller import Caller
from smartserve.server.dispatcher import Dispatcher
from smartserve.server.interfaces import IBackend, IBodyStream, IRequestRun
from smartserve.server.jail import Writable
from smartserve.server.protocol import SmartServerFactory
from smartserve.server.reply import Reply
from smartserve.testing import encode_request


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
    def __init__(self, stream):
        self.stream = stream

    def advance(self, chunks, finished):
        return defer.succeed(Reply((b"ok",), stream=self.stream) if finished else None)

    def abort(self):
        pass


def _body(data: bytes) -> bytes:
    codec = Connection(Role.CLIENT)
    codec.send(Request((b"get",)))
    codec.send(EndOfMessage())
    codec.receive_data(data)
    parts = []
    while (event := codec.next_event()) is not NEED_DATA and not isinstance(event, EndOfMessage):
        if isinstance(event, BodyChunk):
            parts.append(event.data)
    assert isinstance(event, EndOfMessage), "the response did not end"
    return b"".join(parts)


def test_stream_slice_is_made_while_the_transport_is_paused_and_written_on_resume():
    stream = _SlowStream([b"one", b"two", b"three"])
    factory = SmartServerFactory(Dispatcher(_StreamingBackend(stream)), clock=Clock())
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
    factory = SmartServerFactory(Dispatcher(_StreamingBackend(stream)), clock=Clock())
    protocol = factory.build_protocol(Caller(None, "memory", Writable.nowhere()))
    protocol.makeConnection(StringTransport())
    protocol.dataReceived(encode_request([b"get"]))
    protocol.pauseProducing()
    protocol.resumeProducing()
    protocol.pauseProducing()
    assert len(stream.pulls) == 1

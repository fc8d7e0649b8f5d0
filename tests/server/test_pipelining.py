"""Requests a client sends back to back are all answered, in order, each response sent as soon as it is whole."""

from __future__ import annotations

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from smartserve.protocol import NEED_DATA, BodyChunk, Connection, EndOfMessage, Request, Role
from smartserve.server.caller import Caller
from smartserve.server.dispatcher import Dispatcher
from smartserve.server.jail import Writable
from smartserve.server.protocol import SmartServerFactory
from smartserve.testing import MemoryBackend, encode_request, response_args, serve_in_memory


def response_bodies(data: bytes) -> list:
    """The body of every response in ``data``, in order."""
    codec = Connection(Role.CLIENT)
    codec.receive_data(data)
    bodies = []
    while True:
        codec.send(Request((b"get",)))
        codec.send(EndOfMessage())
        parts = []
        while (event := codec.next_event()) is not NEED_DATA and not isinstance(event, EndOfMessage):
            if isinstance(event, BodyChunk):
                parts.append(event.data)
        if event is NEED_DATA:
            return bodies
        bodies.append(b"".join(parts))
        codec.start_next_cycle()


def test_protocol_answers_thousands_of_pipelined_requests_answered_at_once():
    """5,000 requests in one read, each answered synchronously by the backend, get 5,000 responses in order (no recursion limit)."""
    files = {f"f{index}".encode(): str(index).encode() for index in range(5000)}
    factory, protocol, transport = serve_in_memory(MemoryBackend(files), clock=Clock())
    protocol.dataReceived(b"".join(encode_request([b"get", name]) for name in files))
    replies = response_args(transport.value())
    assert replies == [(b"ok",)] * 5000
    assert response_bodies(transport.value()) == list(files.values())
    assert not transport.disconnecting
    assert protocol.requests_served == 5000


class _TCPLikeTransport(StringTransport):
    """A StringTransport that, like a TCP transport, sends its buffer when ``doWrite`` is called."""

    def __init__(self):
        super().__init__()
        self.sent_at_once = []

    def doWrite(self):
        self.sent_at_once.append(len(self.value()))

    def setTcpNoDelay(self, enabled):
        self.no_delay = enabled


def test_protocol_sends_each_whole_response_at_once_over_tcp():
    """Over a TCP-like transport each complete response is handed to the socket as it is written, with Nagle off."""
    factory = SmartServerFactory(Dispatcher(MemoryBackend({b"f": b"data"})), clock=Clock())
    protocol = factory.build_protocol(Caller(None, "memory", Writable.nowhere()))
    transport = _TCPLikeTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(encode_request([b"get", b"f"]))
    first = len(transport.value())
    protocol.dataReceived(encode_request([b"get", b"f"]))
    assert transport.no_delay is True
    assert transport.sent_at_once == [first, len(transport.value())]


def test_protocol_stops_reading_while_a_received_request_runs_and_answers_pipelined_ones_after():
    """Once a request has wholly arrived, the transport is not read until its answer is written;
    requests received with it are then answered in order, and reading resumes when none is left."""
    backend = MemoryBackend({b"a": b"1", b"b": b"2"})
    backend.hold(b"get")
    factory, protocol, transport = serve_in_memory(backend, clock=Clock())
    protocol.dataReceived(encode_request([b"get", b"a"]) + encode_request([b"get", b"b"]))
    assert transport.producerState == "paused"
    assert response_args(transport.value()) == []
    backend.release()
    assert response_bodies(transport.value()) == [b"1", b"2"]
    assert transport.producerState == "producing"
    protocol.dataReceived(encode_request([b"hello"]))
    assert response_args(transport.value())[-1] == (b"ok", b"2")
    assert transport.producerState == "producing"


def test_protocol_keeps_reading_a_request_body_and_a_refused_request():
    """A request still arriving is read on (between backend steps), and so is one refused before it ran."""
    backend = MemoryBackend()
    factory, protocol, transport = serve_in_memory(backend, clock=Clock())
    client = Connection(Role.CLIENT)
    protocol.dataReceived(client.send(Request((b"put", b"f", b""))) + client.send(BodyChunk(b"part")))
    assert transport.producerState == "producing"
    protocol.dataReceived(client.send(EndOfMessage()))
    assert backend.files == {b"f": b"part"}
    client = Connection(Role.CLIENT)
    protocol.dataReceived(client.send(Request((b"No.such_verb",))) + client.send(BodyChunk(b"x")))
    assert transport.producerState == "producing"


def test_protocol_refuses_data_sent_ahead_of_an_answer_beyond_the_limit():
    """A transport that delivers bytes while reading is paused cannot make the server hold more than
    max_pipelined_size: the client gets an error reply naming the limit and the connection closes."""
    backend = MemoryBackend({b"a": b"1"})
    backend.hold(b"get")
    factory, protocol, transport = serve_in_memory(backend, clock=Clock())
    protocol.dataReceived(encode_request([b"get", b"a"]))
    junk = b"j" * 65536
    for _ in range(factory.limits.max_pipelined_size // len(junk)):
        protocol.dataReceived(junk)
    assert not transport.disconnecting
    protocol.dataReceived(junk)
    [error] = response_args(transport.value())
    assert error[0] == b"error" and b"pipelined data" in error[1]
    assert transport.disconnecting


def test_protocol_answers_requests_received_before_a_tcp_half_close_then_closes():
    """When the peer shuts down its sending side (a TCP half-close), the request running and those already
    received are answered in order, as brz serve answers them, and then the connection closes."""
    backend = MemoryBackend({b"a": b"1", b"b": b"2"})
    backend.hold(b"get")
    factory, protocol, transport = serve_in_memory(backend, clock=Clock())
    assert IHalfCloseableProtocol.providedBy(protocol)
    protocol.dataReceived(encode_request([b"get", b"a"]) + encode_request([b"get", b"b"]))
    protocol.readConnectionLost()
    assert not transport.disconnecting
    backend.release()
    assert response_bodies(transport.value()) == [b"1", b"2"]
    assert protocol.requests_served == 2
    assert transport.disconnecting
    assert backend.aborted == []


class _SmallBufferTransport(StringTransport):
    """A StringTransport that, like a TCP transport, pauses its producer once it holds more than ``limit`` bytes."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def write(self, data):
        super().write(data)
        if len(self.value()) > self.limit and self.producer is not None:
            self.producer.pauseProducing()

    def send(self) -> bytes:
        """What the client reads: everything held, after which the producer is resumed."""
        data = self.value()
        self.clear()
        if self.producer is not None:
            self.producer.resumeProducing()
        return data


def test_protocol_answers_no_pipelined_request_while_the_last_answer_waits_in_the_transport():
    """A client that pipelines requests and reads no answer does not make the server pile up answers:
    the next request begins once the transport has sent the last answer, and reading waits until then."""
    content = b"x" * 60000
    factory = SmartServerFactory(Dispatcher(MemoryBackend({b"f": content})), clock=Clock())
    protocol = factory.build_protocol(Caller(None, "memory", Writable.nowhere()))
    transport = _SmallBufferTransport(limit=65536)
    protocol.makeConnection(transport)
    protocol.dataReceived(encode_request([b"get", b"f"]) * 100)
    assert protocol.requests_served == 2  # the second answer filled the buffer
    assert len(transport.value()) < 3 * len(content)
    assert transport.producerState == "paused"
    received = b""
    while protocol.requests_served < 100:
        received += transport.send()
    received += transport.send()
    assert response_bodies(received) == [content] * 100
    assert transport.producerState == "producing"

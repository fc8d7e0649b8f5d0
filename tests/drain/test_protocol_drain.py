"""SmartServerProtocol under drain, over a StringTransport and an in-memory backend."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface.verify import verifyObject

from smartserve.server.interfaces import IBackend, IDrainable
from smartserve.server.protocol import CLOSE_LINGER, Phase
from smartserve.testing import MemoryBackend, encode_request, response_args, serve_in_memory


def test_memory_backend_provides_ibackend():
    """The shipped in-memory backend implements IBackend."""
    assert verifyObject(IBackend, MemoryBackend())


def test_factory_provides_idrainable():
    """The smart server factory implements IDrainable."""
    factory, _, _ = serve_in_memory(MemoryBackend())
    assert verifyObject(IDrainable, factory)


def test_protocol_idle_closes_at_once_on_drain():
    """An idle connection is closed as soon as the drain starts, marked as closed for the drain."""
    factory, protocol, transport = serve_in_memory(MemoryBackend())
    protocol.dataReceived(encode_request([b"hello"]))
    assert response_args(transport.value()) == [(b"ok", b"2")]
    assert not transport.disconnecting
    factory.drain()
    assert transport.disconnecting
    assert protocol.closing_for_drain is True


def test_protocol_busy_finishes_response_then_closes():
    """A busy connection writes its whole response, then closes, marked as closed for the drain."""
    backend = MemoryBackend({b"file": b"x" * 1000})
    backend.hold(b"get")
    factory, protocol, transport = serve_in_memory(backend)
    protocol.dataReceived(encode_request([b"get", b"file"]))
    assert protocol.busy
    factory.drain()
    assert not transport.disconnecting
    assert factory.busy_connections == 1
    backend.release()
    assert response_args(transport.value()) == [(b"ok",)]
    assert transport.value().endswith(b"x" * 1000 + b"e")
    assert transport.disconnecting
    assert protocol.closing_for_drain is True


def test_protocol_request_after_busy_one_never_runs():
    """Bytes of a next request that arrived while busy and draining are never executed."""
    backend = MemoryBackend({b"file": b"before"})
    backend.hold(b"get")
    factory, protocol, transport = serve_in_memory(backend)
    protocol.dataReceived(encode_request([b"get", b"file"]))
    factory.drain()
    protocol.dataReceived(encode_request([b"append", b"file", b""], b"after"))
    backend.release()
    assert backend.ran == [(b"get", b"file")]
    assert backend.files[b"file"] == b"before"
    assert response_args(transport.value()) == [(b"ok",)]
    assert transport.disconnecting


def test_protocol_bytes_after_idle_close_never_run():
    """A request written to a connection already closed for the drain is never executed."""
    backend = MemoryBackend({b"file": b"before"})
    factory, protocol, transport = serve_in_memory(backend)
    factory.drain()
    protocol.dataReceived(encode_request([b"append", b"file", b""], b"after"))
    assert backend.ran == []
    assert backend.files[b"file"] == b"before"
    assert transport.value() == b""


class _TcpLikeTransport(StringTransport):
    """A StringTransport that can shut down its sending side alone, as a TCP transport can."""

    write_closed = False

    def loseWriteConnection(self):
        self.write_closed = True


_DRAINING = (b"ServerDraining", b"the server is draining: connect again")


def test_tcp_connection_closed_by_a_drain_says_server_draining_and_runs_nothing_after():
    """Over TCP the drain's close writes ServerDraining and shuts down the sending side; what comes later is dropped."""
    backend = MemoryBackend({b"file": b"before"})
    factory, protocol, transport = serve_in_memory(backend, transport=_TcpLikeTransport())
    protocol.dataReceived(encode_request([b"hello"]))
    factory.drain()
    assert response_args(transport.value()) == [(b"ok", b"2"), _DRAINING]
    assert transport.write_closed and not transport.disconnecting
    protocol.dataReceived(encode_request([b"append", b"file", b""], b"after"))
    assert backend.files[b"file"] == b"before" and not any(verb == b"append" for verb, *_ in backend.ran)
    protocol.readConnectionLost()  # the client read the message and closed
    assert transport.disconnecting


def test_tcp_connection_closed_by_a_drain_is_closed_after_the_linger_if_the_client_says_nothing():
    clock = Clock()
    factory, protocol, transport = serve_in_memory(MemoryBackend(), clock=clock, transport=_TcpLikeTransport())
    factory.drain()
    clock.advance(CLOSE_LINGER - 0.1)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnecting


def test_tcp_connection_busy_at_the_drain_says_server_draining_after_its_response():
    """The response in progress goes out whole, then ServerDraining answers whatever the client sends next."""
    backend = MemoryBackend({b"file": b"x" * 1000})
    backend.hold(b"get")
    factory, protocol, transport = serve_in_memory(backend, transport=_TcpLikeTransport())
    protocol.dataReceived(encode_request([b"get", b"file"]))
    factory.drain()
    protocol.dataReceived(encode_request([b"append", b"file", b""], b"after"))
    backend.release()
    assert response_args(transport.value()) == [(b"ok",), _DRAINING]
    assert backend.files[b"file"] == b"x" * 1000
    assert transport.write_closed


def test_protocol_new_connection_while_draining_closes():
    """A connection made after the drain started is closed as soon as it is made."""
    factory, _, _ = serve_in_memory(MemoryBackend())
    factory.drain()
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert transport.disconnecting
    assert protocol.closing_for_drain is True


def test_protocol_request_body_still_arriving_completes():
    """A request whose body is still arriving when the drain starts runs and answers, then closes."""
    backend = MemoryBackend({b"file": b""})
    factory, protocol, transport = serve_in_memory(backend)
    data = encode_request([b"append", b"file", b""], b"0123456789" * 100)
    protocol.dataReceived(data[:60])
    assert protocol.phase is Phase.REQUEST
    factory.drain()
    protocol.dataReceived(data[60:])
    assert backend.files[b"file"] == b"0123456789" * 100
    assert response_args(transport.value()) == [(b"appended", b"0")]
    assert transport.disconnecting


def test_factory_wait_closed_fires_after_last_connection():
    """The factory's drain Deferred fires only once its busy connection is gone."""
    backend = MemoryBackend({b"file": b"data"})
    backend.hold(b"get")
    factory, protocol, transport = serve_in_memory(backend)
    protocol.dataReceived(encode_request([b"get", b"file"]))
    fired = []
    factory.drain().addCallback(fired.append)
    backend.release()
    assert fired == []
    protocol.connectionLost(None)
    assert fired == [None]
    assert factory.open_connections == 0


def test_factory_abort_counts_and_aborts_running_request():
    """abort() drops every open connection, returns how many, and the backend is told."""
    backend = MemoryBackend({b"file": b"data"})
    backend.hold(b"get")
    factory, protocol, transport = serve_in_memory(backend, clock=Clock())
    protocol.dataReceived(encode_request([b"get", b"file"]))
    assert factory.abort() == 1
    protocol.connectionLost(None)
    assert backend.aborted == [(b"get", b"file")]

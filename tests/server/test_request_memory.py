"""Request bodies of all connections together are held to --max-request-memory: a request whose body arrives
past it is refused unrun with ServerBusy, and what it held is given back at once."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent

from smartserve.protocol import BodyChunk, Connection, EndOfMessage, Request, Role
from smartserve.server.caller import Caller
from smartserve.server.dispatcher import Dispatcher
from smartserve.server.jail import Writable
from smartserve.server.protocol import SmartServerFactory
from smartserve.testing import MemoryBackend, response_args
from support import logged_events

LIMIT = 10_000


def _factory(
    backend: MemoryBackend,
    limit: int = LIMIT,
    writable: Writable = Writable.everywhere(),
    metrics=None,
    per_caller: int = 0,
):
    return SmartServerFactory(
        Dispatcher(backend),
        clock=Clock(),
        tcp_writable=writable,
        max_request_memory=limit,
        metrics=metrics,
        max_request_memory_per_caller=per_caller,
    )


class _Client:
    """One connection to ``factory``, writing a request piece by piece, as ``user`` from ``peer``."""

    def __init__(self, factory: SmartServerFactory, user=None, peer="memory"):
        self.protocol = factory.build_protocol(Caller(user, peer, factory.tcp_writable))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.codec = Connection(Role.CLIENT)

    def begin(self, *args: bytes) -> None:
        self.protocol.dataReceived(self.codec.send(Request(args)))

    def part(self, data: bytes) -> None:
        self.protocol.dataReceived(self.codec.send(BodyChunk(data)))

    def end(self) -> list:
        """End the request; the arguments of every response written so far."""
        self.protocol.dataReceived(self.codec.send(EndOfMessage()))
        answers = response_args(self.transport.value())
        self.transport.clear()
        self.codec = Connection(Role.CLIENT)
        return answers


def test_request_whose_body_grows_past_the_shared_limit_is_refused_unrun_and_given_back():
    """Two connections' bodies add up past the limit: the one whose body arrives last is told ServerBusy and not
    run; the other runs; every byte counted is given back once the requests are over."""
    backend = MemoryBackend()
    factory = _factory(backend)
    first, second = _Client(factory), _Client(factory)
    first.begin(b"put", b"/first", b"")
    first.part(b"a" * 7_000)
    assert factory.body_memory.held == 7_000
    second.begin(b"put", b"/second", b"")
    second.part(b"b" * 2_000)
    assert factory.body_memory.held == 9_000, "within the limit, both bodies are held"
    with logged_events(lambda event: "max-request-memory" in event.get("log_format", "")) as warnings:
        second.part(b"c" * 2_000)
    assert factory.body_memory.held == 7_000, "the refused request's body is given back at once"
    second.part(b"d" * 50_000)
    assert factory.body_memory.held == 7_000, "and the rest of it is dropped as it arrives"
    [refused] = second.end()
    assert refused[0] == b"ServerBusy" and b"10000 bytes" in refused[1]
    assert b"/second" not in backend.files
    assert [formatEvent(event) for event in warnings] == [
        "put from - at memory refused: request bodies held by the server are at its limit of 10000 bytes "
        "(--max-request-memory)"
    ]
    assert first.end() == [(b"ok",)]
    assert backend.files[b"/first"] == b"a" * 7_000
    assert factory.body_memory.held == 0
    second.begin(b"put", b"/second", b"")
    second.part(b"e" * 9_000)
    assert second.end() == [(b"ok",)], "with the memory given back, the same request runs"
    assert backend.files[b"/second"] == b"e" * 9_000
    assert factory.body_memory.held == 0


def test_part_half_received_counts_and_a_lost_connection_gives_its_share_back():
    """Bytes of a part still arriving count (the codec holds them); a connection lost mid-body gives back all."""
    backend = MemoryBackend()
    factory = _factory(backend)
    client = _Client(factory)
    client.begin(b"put", b"/file", b"")
    client.protocol.dataReceived(client.codec.send(BodyChunk(b"x" * 6_000))[:4_005])
    assert factory.body_memory.held == 4_005
    other = _Client(factory)
    other.begin(b"append", b"/log", b"")
    wire = other.codec.send(BodyChunk(b"y" * 7_000))
    other.protocol.dataReceived(wire[:3_000])
    assert factory.body_memory.held == 4_005 + 3_000
    other.protocol.dataReceived(wire[3_000:6_100])
    assert factory.body_memory.held == 4_005, "refused once the part's bytes took the sum past the limit"
    other.protocol.dataReceived(wire[6_100:])
    assert other.end()[0][0] == b"ServerBusy"
    client.protocol.connectionLost(None)
    assert factory.body_memory.held == 0
    assert backend.files == {}


def test_request_that_arrived_whole_runs_even_over_the_limit():
    """A request already received in full is not refused: refusing it would free nothing."""
    backend = MemoryBackend()
    factory = _factory(backend)
    hog = _Client(factory)
    hog.begin(b"put", b"/hog", b"")
    hog.part(b"h" * 9_999)
    client = _Client(factory)
    client.protocol.dataReceived(
        client.codec.send(Request((b"put", b"/small", b""))) + client.codec.send(BodyChunk(b"s" * 10))
        + client.codec.send(EndOfMessage())
    )
    assert response_args(client.transport.value()) == [(b"ok",)]
    assert backend.files[b"/small"] == b"s" * 10


def test_no_limit_counts_without_refusing():
    backend = MemoryBackend()
    factory = _factory(backend, limit=0)
    client = _Client(factory)
    client.begin(b"put", b"/file", b"")
    client.part(b"z" * 50_000)
    assert factory.body_memory.held == 50_000
    assert client.end() == [(b"ok",)]
    assert factory.body_memory.held == 0


def test_body_of_a_request_refused_at_once_is_never_held_whole():
    """A read-only caller's put is refused before its body: a part of it is dropped as its bytes arrive rather
    than held until it is whole, whatever its size."""
    backend = MemoryBackend()
    factory = _factory(backend, limit=0, writable=Writable.nowhere())
    client = _Client(factory)
    client.begin(b"put", b"/file", b"")
    wire = client.codec.send(BodyChunk(b"r" * 1_000_000))
    for start in range(0, len(wire), 65_536):
        client.protocol.dataReceived(wire[start : start + 65_536])
        assert client.protocol._codec.buffered_size == 0
        assert factory.body_memory.held == 0
    [refused] = client.end()
    assert refused == (b"ReadOnlyError",)
    assert backend.ran == []


def test_metrics_show_the_bytes_held_and_the_requests_refused():
    from smartserve.metrics import ServerMetrics

    backend = MemoryBackend()
    metrics = ServerMetrics()
    factory = _factory(backend, metrics=metrics)
    metrics.watch_bzr_refusals(factory)
    hog, client = _Client(factory), _Client(factory)
    hog.begin(b"put", b"/hog", b"")
    hog.part(b"h" * 8_000)
    assert "smartserve_request_body_bytes 8000.0" in metrics.render().decode()
    client.begin(b"put", b"/file", b"")
    client.part(b"f" * 3_000)
    client.end()
    text = metrics.render().decode()
    assert "smartserve_request_body_bytes 8000.0" in text
    assert 'smartserve_requests_total{outcome="ServerBusy",verb_class="idem"} 1.0' in text


def test_one_callers_bodies_are_held_to_the_per_caller_limit_while_others_go_on():
    """An SSH user's bodies over all their sessions are held to --max-request-memory-per-caller: their request
    whose body grows past it is refused ServerBusy, while another user's runs, the server's limit far off."""
    backend = MemoryBackend()
    factory = _factory(backend, limit=100_000, per_caller=10_000)
    first = _Client(factory, user="alice", peer="192.0.2.7:50318")
    second = _Client(factory, user="alice", peer="192.0.2.8:40000")
    other = _Client(factory, user="bob", peer="192.0.2.7:50319")
    first.begin(b"put", b"/first", b"")
    first.part(b"a" * 7_000)
    other.begin(b"put", b"/other", b"")
    other.part(b"o" * 6_000)
    second.begin(b"put", b"/second", b"")
    second.part(b"b" * 2_000)
    with logged_events(lambda event: "max-request-memory-per-caller" in event.get("log_format", "")) as warnings:
        second.part(b"c" * 2_000)
    assert factory.body_memory.held_by(("user", "alice")) == 7_000, "the refused request's body is given back"
    other.part(b"p" * 2_000)
    assert other.end() == [(b"ok",)], "another caller is not held to alice's share"
    [refused] = second.end()
    assert refused == (
        b"ServerBusy",
        b"the server holds its limit of 10000 bytes of request bodies for one caller; nothing of this request ran, "
        b"send it again later",
    )
    assert [formatEvent(event) for event in warnings] == [
        "put from alice at 192.0.2.8:40000 refused: request bodies held for this caller are at the limit of "
        "10000 bytes per caller (--max-request-memory-per-caller)"
    ]
    assert first.end() == [(b"ok",)]
    assert sorted(backend.files) == [b"/first", b"/other"]
    assert factory.body_memory.held == 0 and factory.body_memory.held_by(("user", "alice")) == 0


def test_bzr_callers_are_counted_by_address_and_a_lost_connection_gives_their_share_back():
    """Over bzr:// there is no user: connections from one address share a caller's limit, whatever their port."""
    backend = MemoryBackend()
    factory = _factory(backend, limit=0, per_caller=10_000)
    first = _Client(factory, peer="[2001:db8::1]:1000")
    second = _Client(factory, peer="[2001:db8::1]:1001")
    elsewhere = _Client(factory, peer="192.0.2.9:1000")
    for client, data in ((first, b"a" * 6_000), (elsewhere, b"e" * 9_000), (second, b"b" * 3_000)):
        client.begin(b"put", b"/file", b"")
        client.part(data)
    assert factory.body_memory.held_by(("address", "2001:db8::1")) == 9_000
    second.part(b"c" * 2_000)
    assert second.end()[0][0] == b"ServerBusy"
    assert elsewhere.end() == [(b"ok",)]
    first.protocol.connectionLost(None)
    assert factory.body_memory.held == 0 and factory.body_memory.held_by(("address", "2001:db8::1")) == 0


def test_caller_is_the_user_or_else_the_host_of_the_address():
    for user, peer, who in [
        ("alice", "192.0.2.7:50318", ("user", "alice")),
        (None, "192.0.2.7:50318", ("address", "192.0.2.7")),
        (None, "[::1]:4155", ("address", "::1")),
        (None, "memory", ("address", "memory")),
    ]:
        assert Caller(user, peer, Writable.nowhere()).who == who

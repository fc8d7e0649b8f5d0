"""The resend engine, backoff, budget, deadline and pool, driven by a fake clock.

A ``FakeServer`` hands the client connections over in-memory transports and
decodes what the client writes with the server side of the codec, so each
test decides exactly when bytes arrive and when a connection dies.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionRefusedError, ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from smartserve.client import (
    ClientClosed,
    DeadlineExceeded,
    OutcomeUnknown,
    Reply,
    RequestNotSent,
    ResponseNeverReceived,
    RetryPolicy,
    SmartClient,
    SmartClientProtocol,
    backoff_delay,
    RetryBudget,
)
from smartserve.protocol import (
    NEED_DATA,
    SERVER_BUSY,
    SERVER_DRAINING,
    TOO_MANY_CONNECTIONS,
    BodyChunk,
    Connection,
    EndOfMessage,
    Request,
    Response,
    Role,
    error_response,
)


class FakeTransport(StringTransport):
    """A StringTransport whose close reaches the protocol at once."""

    def loseConnection(self):
        if not self.disconnecting:
            super().loseConnection()
            self.protocol.connectionLost(Failure(ConnectionAborted()))

    abortConnection = loseConnection


class FakeConnection:
    """The server's view of one client connection."""

    def __init__(self, clock):
        self.clock = clock
        self.transport = FakeTransport()
        self.protocol = SmartClientProtocol(clock)
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)
        self.codec = Connection(Role.SERVER)
        self._read = 0
        self.events = []

    def received(self) -> list:
        """Every event the client has sent on this connection so far."""
        data = self.transport.value()[self._read :]
        self._read += len(data)
        if data:
            self.codec.receive_data(data)
        while True:
            event = self.codec.next_event()
            if event is NEED_DATA or not isinstance(event, (Request, BodyChunk, EndOfMessage)):
                break
            self.events.append(event)
        return self.events

    def requests(self) -> list:
        """The verbs of the complete requests received."""
        events = self.received()
        return [event.verb for event in events if isinstance(event, Request)]

    def respond(self, *args, body: bytes = None, success: bool = True, cut_after: int = None) -> None:
        """Send a whole response, or only its first ``cut_after`` bytes."""
        self.received()
        data = self.codec.send(Response(args, success))
        if body is not None:
            data += self.codec.send(BodyChunk(body))
        data += self.codec.send(EndOfMessage())
        self.codec.start_next_cycle()
        self.protocol.dataReceived(data if cut_after is None else data[:cut_after])

    def turn_away(self) -> None:
        """Answer TooManyConnections and close, as smartserve over its connection limit, having read nothing."""
        self.protocol.dataReceived(error_response((TOO_MANY_CONNECTIONS, b"too many")))
        self.lose()

    def lose(self, exit_status: int = None) -> None:
        """Close the connection, optionally as an SSH command exiting with ``exit_status``.

        Timers due now (a zero backoff) run afterwards.
        """
        reason = ConnectionDone() if exit_status is None else ProcessTerminated(exitCode=exit_status)
        self.transport.disconnecting = True
        self.protocol.connectionLost(Failure(reason))
        self.clock.advance(0)


class FakeServer:
    """Makes FakeConnections; ``refuse`` and ``hang`` script the next attempts."""

    def __init__(self, clock):
        self.clock = clock
        self.connections = []
        self.attempt_times = []
        self.script = []

    def connect(self) -> Deferred:
        self.attempt_times.append(self.clock.seconds())
        action = self.script.pop(0) if self.script else "accept"
        if action == "refuse":
            return fail(ConnectionRefusedError())
        if action == "hang":
            return Deferred()
        connection = FakeConnection(self.clock)
        self.connections.append(connection)
        if action == "turn away":
            connection.turn_away()
        return succeed(connection.protocol)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def server(clock):
    return FakeServer(clock)


def make_client(server, clock, **policy):
    policy.setdefault("backoff_initial", 0.0)
    return SmartClient(server.connect, policy=RetryPolicy(**policy), clock=clock, jitter=lambda: 1.0)


def outcome(deferred: Deferred) -> list:
    """A list that receives the Deferred's result or Failure."""
    results = []
    deferred.addBoth(results.append)
    return results


def test_call_returns_reply_with_args_and_body(server, clock):
    """A response's arguments and body come back as a Reply."""
    client = make_client(server, clock)
    result = outcome(client.call(b"get", b"/file"))
    connection = server.connections[0]
    assert connection.requests() == [b"get"]
    connection.respond(b"ok", body=b"data")
    assert result == [Reply((b"ok",), b"data")]


VERBS = {
    "read": b"get",
    "idem": b"put",
    "semi": b"Branch.lock_write",
    "semivfs": b"mkdir",
    "mutate": b"append",
    "stream": b"Repository.insert_stream_1.19",
}

# DESIGN.md's table, written out: which classes are resent at each point.
RESENT_AFTER_WRITE = {"read", "idem", "semi"}
RESENT_DURING_RESPONSE = {"read", "idem"}


def fail_at(connection, point):
    if point == "after write":
        connection.lose()
    elif point == "during response":
        connection.respond(b"ok", body=b"x" * 100, cut_after=40)
        connection.lose()
    elif point == "after write, drain signal":
        connection.lose(exit_status=75)


@pytest.mark.parametrize("verb_class", sorted(VERBS))
@pytest.mark.parametrize("point", ["after write", "during response", "after write, drain signal"])
def test_engine_resends_exactly_what_the_table_allows(server, clock, verb_class, point):
    """Each verb class is resent, or fails with OutcomeUnknown naming the verb, as DESIGN.md's table says."""
    verb = VERBS[verb_class]
    client = make_client(server, clock)
    result = outcome(client.call(verb, b"/path", body=b"body"))
    first = server.connections[0]
    assert first.requests() == [verb]
    fail_at(first, point)
    allowed = {
        "after write": RESENT_AFTER_WRITE,
        "during response": RESENT_DURING_RESPONSE,
        "after write, drain signal": set(VERBS),
    }[point]
    if verb_class in allowed:
        assert len(server.connections) == 2
        second = server.connections[1]
        assert second.requests() == [verb]
        second.respond(b"ok")
        assert result == [Reply((b"ok",), b"")]
        assert client.stats.resends == 1
    else:
        assert len(server.connections) == 1
        [failure] = result
        assert failure.check(OutcomeUnknown)
        assert failure.value.verb == verb
        assert verb.decode() in str(failure.value)
        assert client.stats.resends == 0


async def _stalled_parts(release: Deferred):
    yield b"first part"
    await release
    yield b"second part"


@pytest.mark.parametrize("verb_class", sorted(VERBS))
def test_engine_resends_any_verb_cut_during_write(server, clock, verb_class):
    """A request lost while its body was still being written is resent whatever its verb."""
    verb = VERBS[verb_class]
    client = make_client(server, clock)
    stalls = [Deferred(), succeed(None)]
    result = outcome(client.call(verb, b"/path", body_stream=lambda: _stalled_parts(stalls.pop(0))))
    first = server.connections[0]
    assert [type(event) for event in first.received()] == [Request, BodyChunk]
    first.lose()
    second = server.connections[1]
    assert second.requests() == [verb]
    assert [event.data for event in second.received() if isinstance(event, BodyChunk)] == [b"first part", b"second part"]
    second.respond(b"ok")
    assert result == [Reply((b"ok",), b"")]


def test_engine_does_not_resend_a_consumed_one_shot_stream(server, clock):
    """A one-shot body stream cut during writing fails without a resend: the server ran nothing."""
    from smartserve.client import RequestTransmissionFailed

    client = make_client(server, clock)
    result = outcome(client.call(b"put", b"/path", body_stream=_stalled_parts(Deferred())))
    server.connections[0].received()
    server.connections[0].lose()
    [failure] = result
    assert failure.check(RequestTransmissionFailed)
    assert len(server.connections) == 1


def test_engine_reconnects_after_idle_close_without_resend(server, clock):
    """A connection the server closed between requests is replaced, costing no resend."""
    client = make_client(server, clock)
    outcome(client.call(b"hello"))
    server.connections[0].respond(b"ok", b"2")
    server.connections[0].lose()
    result = outcome(client.call(b"append", b"/log", b"", body=b"x"))
    assert server.connections[1].requests() == [b"append"]
    server.connections[1].respond(b"appended", b"0")
    assert result == [Reply((b"appended", b"0"), b"")]
    assert client.stats.resends == 0


def test_engine_probe_sees_eof_already_in_codec(server, clock):
    """An EOF the codec has but the protocol did not act on yet makes the client reconnect first."""
    client = make_client(server, clock)
    outcome(client.call(b"hello"))
    first = server.connections[0]
    first.respond(b"ok", b"2")
    first.protocol._codec.receive_data(b"")
    result = outcome(client.call(b"append", b"/log", b"", body=b"x"))
    assert first.requests() == [b"hello"]
    assert server.connections[1].requests() == [b"append"]
    server.connections[1].respond(b"appended", b"0")
    assert result and result[0].args[0] == b"appended"
    assert client.stats.probe_reconnects == 1
    assert client.stats.resends == 0


def test_engine_backs_off_with_growing_delays_between_connect_attempts(server, clock):
    """Refused connections are retried after exponentially growing delays, then succeed."""
    server.script = ["refuse", "refuse", "refuse"]
    client = make_client(server, clock, backoff_initial=1.0, backoff_factor=2.0, backoff_max=3.0)
    result = outcome(client.call(b"hello"))
    clock.advance(1.0)
    clock.advance(2.0)
    clock.advance(3.0)
    assert server.attempt_times == [0.0, 1.0, 3.0, 6.0]
    server.connections[0].respond(b"ok", b"2")
    assert result == [Reply((b"ok", b"2"), b"")]


def test_engine_gives_up_after_max_connect_attempts(server, clock):
    """A server that refuses every connection fails the call with RequestNotSent after the limit."""
    server.script = ["refuse"] * 10
    client = make_client(server, clock, max_connect_attempts=3, backoff_initial=0.5)
    result = outcome(client.call(b"append", b"/log", b"", body=b"x"))
    clock.pump([0.5, 1.0, 2.0])
    [failure] = result
    assert failure.check(RequestNotSent)
    assert len(server.attempt_times) == 3


def test_engine_deadline_bounds_a_hanging_connect(server, clock):
    """A connection attempt that never completes fails the call at its deadline."""
    server.script = ["hang"]
    client = make_client(server, clock, deadline=5.0, connect_timeout=100.0)
    result = outcome(client.call(b"get", b"/x"))
    clock.advance(4.9)
    assert result == []
    clock.advance(0.2)
    [failure] = result
    assert failure.check(DeadlineExceeded)


def test_engine_request_timeout_aborts_and_resends_a_read(server, clock):
    """A request with no answer within request_timeout is abandoned and, being a read, resent."""
    client = make_client(server, clock, request_timeout=2.0)
    result = outcome(client.call(b"get", b"/x"))
    clock.advance(2.0)
    assert len(server.connections) == 2
    server.connections[1].requests()
    server.connections[1].respond(b"ok", body=b"x")
    assert result == [Reply((b"ok",), b"x")]


def test_engine_request_timeout_counts_from_each_request(server, clock):
    """A request is given its whole request_timeout even when an earlier request on the connection started sooner."""
    client = make_client(server, clock, request_timeout=2.0)
    outcome(client.call(b"hello"))
    connection = server.connections[0]
    connection.respond(b"ok", b"2")
    clock.advance(1.5)
    result = outcome(client.call(b"get", b"/x"))
    clock.advance(1.75)
    assert result == [] and len(server.connections) == 1
    connection.respond(b"ok", body=b"in time")
    assert result == [Reply((b"ok",), b"in time")]
    late = outcome(client.call(b"get", b"/y"))
    clock.advance(1.75)
    assert late == [] and len(server.connections) == 1
    clock.advance(0.25)
    assert len(server.connections) == 2
    server.connections[1].respond(b"ok", body=b"resent")
    assert late == [Reply((b"ok",), b"resent")]


@pytest.mark.parametrize("while_resending", [False, True], ids=["in flight", "while resent"])
def test_engine_cancelled_call_gives_its_slot_back(server, clock, while_resending):
    """Cancelling a call in flight, or while it is being resent, fails it with CancelledError; the next call gets the slot."""
    from twisted.internet.defer import CancelledError

    client = make_client(server, clock)
    outcome(client.call(b"hello"))
    server.connections[0].respond(b"ok", b"2")
    cancelled = client.call(b"get", b"/x")
    result = outcome(cancelled)
    if while_resending:
        server.connections[0].lose()
        assert server.connections[1].requests() == [b"get"]
    cancelled.cancel()
    assert result[0].check(CancelledError)
    later = outcome(client.call(b"get", b"/y"))
    assert server.connections[-1].requests() == [b"get"]
    server.connections[-1].respond(b"ok", body=b"y")
    assert later == [Reply((b"ok",), b"y")]


def test_engine_retry_budget_stops_resends_across_calls(server, clock):
    """Once failures have used half the shared budget, failed calls are no longer resent."""
    client = make_client(server, clock, budget_tokens=4.0, max_resends=10)
    result = outcome(client.call(b"get", b"/x"))
    server.connections[0].lose()
    server.connections[1].lose()
    [failure] = result
    assert failure.check(ResponseNeverReceived)
    assert failure.value.why_not_resent == "the retry budget is exhausted"
    assert client.stats.resends == 1


def test_connection_attempts_stopped_by_the_retry_budget_say_so(server, clock):
    """A call that stops connecting because the shared budget ran out, before its own attempts did, says which."""
    client = make_client(server, clock, budget_tokens=4.0, max_connect_attempts=5)
    server.script = ["refuse"] * 5
    result = outcome(client.call(b"hello"))
    clock.pump([1.0] * 60)
    [failure] = result
    assert failure.check(RequestNotSent)
    assert "could not connect (2 attempts; the retry budget is exhausted)" in str(failure.value)
    server.script = ["refuse"] * 5
    client = make_client(server, clock, max_connect_attempts=2)
    result = outcome(client.call(b"hello"))
    clock.pump([1.0] * 60)
    [failure] = result
    assert "could not connect (2 attempts): " in str(failure.value)


def test_engine_max_resends_bounds_one_call(server, clock):
    """A call is resent at most max_resends times."""
    client = make_client(server, clock, max_resends=2)
    result = outcome(client.call(b"get", b"/x"))
    for index in range(3):
        server.connections[index].lose()
    [failure] = result
    assert failure.value.why_not_resent == "already resent 2 time(s)"
    assert len(server.connections) == 3


def test_engine_streamed_response_not_resent_after_chunks_delivered(server, clock):
    """A read whose streamed body already reached on_chunk is not resent, so no chunk arrives twice."""
    from smartserve.client import ResponseFailed

    client = make_client(server, clock)
    chunks = []
    result = outcome(client.call(b"Repository.get_stream_1.19", b"/b/", b"fmt", on_chunk=chunks.append))
    connection = server.connections[0]
    connection.requests()
    connection.protocol.dataReceived(
        connection.codec.send(Response((b"ok",))) + connection.codec.send(BodyChunk(b"part"))
    )
    connection.lose()
    [failure] = result
    assert failure.check(ResponseFailed)
    assert chunks == [b"part"]
    assert len(server.connections) == 1


def test_pool_runs_concurrent_calls_on_up_to_n_connections(server, clock):
    """Three concurrent calls on a pool of two use two connections; the third waits its turn."""
    client = SmartClient(server.connect, pool_size=2, clock=clock)
    results = [outcome(client.call(b"get", f"/{index}".encode())) for index in range(3)]
    assert len(server.connections) == 2
    assert [connection.requests() for connection in server.connections] == [[b"get"], [b"get"]]
    server.connections[0].respond(b"ok", body=b"0")
    assert server.connections[0].requests() == [b"get", b"get"]
    server.connections[1].respond(b"ok", body=b"1")
    server.connections[0].respond(b"ok", body=b"2")
    assert [result[0].body for result in results] == [b"0", b"1", b"2"]
    assert len(server.connections) == 2


def test_backoff_delay_is_full_jitter_under_a_capped_ceiling():
    """The delay is the jitter fraction of an exponential ceiling capped at backoff_max."""
    policy = RetryPolicy(backoff_initial=0.5, backoff_factor=2.0, backoff_max=3.0)
    assert backoff_delay(0, policy) == 0.0
    assert [backoff_delay(n, policy, lambda: 1.0) for n in (1, 2, 3, 4, 50)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff_delay(3, policy, lambda: 0.25) == 0.5


def test_retry_budget_refills_with_successes():
    """Successes give tokens back until retries are allowed again."""
    budget = RetryBudget(max_tokens=4, ratio=0.5)
    budget.record_failure()
    budget.record_failure()
    assert not budget.allows_retry()
    budget.record_success()
    assert budget.allows_retry()


def test_engine_reports_reconnects_resends_and_unknown_outcomes_to_metrics(server, clock):
    """ClientMetrics counts the probe reconnect, the resend and the unknown outcome the engine saw."""
    from smartserve.metrics import ClientMetrics

    metrics = ClientMetrics()
    client = SmartClient(server.connect, policy=RetryPolicy(backoff_initial=0.0), clock=clock, metrics=metrics)
    outcome(client.call(b"hello"))
    server.connections[0].respond(b"ok", b"2")
    server.connections[0].protocol._codec.receive_data(b"")
    read = outcome(client.call(b"get", b"/x"))
    server.connections[1].lose()
    server.connections[2].respond(b"ok", body=b"x")
    assert read == [Reply((b"ok",), b"x")]
    appended = outcome(client.call(b"append", b"/x", b"", body=b"y"))
    server.connections[2].lose()
    assert appended[0].check(OutcomeUnknown)
    text = metrics.render().decode()
    assert 'smartserve_client_reconnects_total{reason="probe"} 1.0' in text
    assert 'smartserve_client_resends_total{reason="after write",verb_class="read"} 1.0' in text
    assert 'smartserve_client_outcome_unknown_total{verb_class="mutate"} 1.0' in text


def test_engine_makes_no_connection_attempts_when_no_call_waits(server, clock):
    """After a call gave up on a dead server, time passing makes no further connection attempts."""
    server.script = ["refuse"] * 20
    client = make_client(server, clock, max_connect_attempts=2, backoff_initial=1.0)
    result = outcome(client.call(b"hello"))
    clock.advance(1.0)
    assert result[0].check(RequestNotSent)
    attempts = len(server.attempt_times)
    for _ in range(10):
        clock.advance(10.0)
    assert len(server.attempt_times) == attempts == 2


def test_engine_close_fails_waiting_calls_and_later_calls(server, clock):
    """close() fails a call waiting to reconnect and every later call with ClientClosed."""
    from smartserve.client import ClientClosed

    server.script = ["refuse"]
    client = make_client(server, clock, backoff_initial=5.0)
    waiting = outcome(client.call(b"hello"))
    closed = outcome(client.close())
    assert waiting[0].check(ClientClosed)
    assert closed == [None]
    later = outcome(client.call(b"hello"))
    assert later[0].check(ClientClosed)


def test_protocol_body_error_in_stream_raises_remote_error(server, clock):
    """An error in the middle of a response body raises RemoteError with the error's tuple."""
    from smartserve.client import RemoteError
    from smartserve.protocol import BodyError

    client = make_client(server, clock)
    result = outcome(client.call(b"Repository.get_stream_1.19", b"/b/", b"fmt"))
    connection = server.connections[0]
    connection.received()
    codec = connection.codec
    data = codec.send(Response((b"ok",))) + codec.send(BodyChunk(b"part"))
    data += codec.send(BodyError((b"error", b"disk on fire"))) + codec.send(EndOfMessage())
    connection.protocol.dataReceived(data)
    [failure] = result
    assert failure.check(RemoteError)
    assert failure.value.error_args == (b"error", b"disk on fire")


def test_protocol_garbage_from_server_fails_the_read_and_resends(server, clock):
    """Bytes that break the protocol drop the connection; a read is then resent on a new one."""
    client = make_client(server, clock)
    result = outcome(client.call(b"get", b"/x"))
    server.connections[0].received()
    server.connections[0].protocol.dataReceived(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    clock.advance(0)
    server.connections[1].respond(b"ok", body=b"fine")
    assert result == [Reply((b"ok",), b"fine")]
    assert client.stats.resends == 1


def test_protocol_unsolicited_bytes_make_the_probe_reconnect(server, clock):
    """A server that sends bytes between requests has its connection replaced before the next write."""
    client = make_client(server, clock)
    outcome(client.call(b"hello"))
    first = server.connections[0]
    first.respond(b"ok", b"2")
    first.protocol.dataReceived(b"bzr message 3 (bzr 1.6)\n")
    clock.advance(0)
    result = outcome(client.call(b"get", b"/x"))
    assert len(server.connections) == 2
    server.connections[1].respond(b"ok", body=b"y")
    assert result == [Reply((b"ok",), b"y")]
    assert client.stats.resends == 0


def test_ssh_endpoint_provides_the_endpoint_interface(tmp_path):
    """The bzr+ssh:// endpoint is a real IStreamClientEndpoint."""
    from twisted.internet.interfaces import IStreamClientEndpoint
    from twisted.internet.testing import MemoryReactorClock
    from zope.interface.verify import verifyObject

    from smartserve.client import SSHOptions, parse_url
    from smartserve.client._ssh import ssh_endpoint

    known = tmp_path / "known_hosts"
    known.write_text("")
    endpoint = ssh_endpoint(
        MemoryReactorClock(), parse_url("bzr+ssh://me@example.com/x"), SSHOptions(known_hosts=str(known), use_agent=False)
    )
    assert verifyObject(IStreamClientEndpoint, endpoint)


def test_parse_url_reads_scheme_user_host_port_and_path():
    """URLs give their parts, with the default ports of each scheme."""
    from smartserve.client import parse_url

    target = parse_url("bzr+ssh://joe@host.example:2222/srv/my%20branch")
    assert (target.scheme, target.user, target.host, target.port, target.path) == (
        "bzr+ssh", "joe", "host.example", 2222, "/srv/my branch",
    )
    assert parse_url("bzr://host/").port == 4155
    assert parse_url("bzr+ssh://host/").port == 22
    assert target.remote_path(".bzr/branch-format") == b"/srv/my%20branch/.bzr/branch-format"
    with pytest.raises(ValueError):
        parse_url("http://host/")
    with pytest.raises(ValueError, match="port 0 in 'bzr://host:0/'"):
        parse_url("bzr://host:0/")  # found wrong: it meant the default port
    with pytest.raises(ValueError, match="bad port in 'bzr://host:99999/'"):
        parse_url("bzr://host:99999/")


def test_text_from_the_server_in_error_messages_has_its_control_characters_escaped():
    """An error's text from the server cannot drive the terminal it is printed on (ESC, BEL); other text stays."""
    from smartserve.client import RemoteError

    message = str(RemoteError(b"get", (b"Oops\x1b[31m", "caf\u00e9 \x07\x9b".encode())))
    assert message == "get: Oops\\x1b[31m (caf\u00e9 \\x07\\x9b)"
    assert not any(ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0 for char in message)


def test_engine_retries_after_a_connect_timeout(server, clock):
    """A connection attempt that times out counts as a failed attempt and is retried, not a deadline."""
    server.script = ["hang"]
    client = make_client(server, clock, connect_timeout=2.0, deadline=60.0)
    result = outcome(client.call(b"hello"))
    clock.advance(2.0)
    clock.advance(0)
    assert len(server.attempt_times) == 2
    server.connections[0].respond(b"ok", b"2")
    assert result == [Reply((b"ok", b"2"), b"")]
    assert client.stats.connect_failures == 1


@pytest.fixture(params=["low", "above FD_SETSIZE"])
def channel_socket_pair(request):
    """A connected socket pair; in the second case our end's descriptor is above 1024, which select() cannot watch."""
    import os
    import resource
    import socket

    ours, theirs = socket.socketpair()
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    if request.param != "low":
        soft, hard = limits
        if hard != resource.RLIM_INFINITY and hard <= 1500:
            pytest.skip(f"the open-file hard limit ({hard}) leaves no descriptor above 1500")
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1600), hard))
        low, ours = ours, socket.socket(fileno=os.dup2(ours.fileno(), 1500))
        low.close()
    try:
        yield ours, theirs
    finally:
        ours.close()
        theirs.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)


def test_protocol_sees_unread_bytes_under_an_ssh_channel(clock, channel_socket_pair):
    """Bytes waiting in the socket under an SSH channel are noticed before the reactor reads them."""
    from types import SimpleNamespace

    ours, theirs = channel_socket_pair
    tcp = SimpleNamespace(getHandle=lambda: ours)
    channel = StringTransport()
    channel.conn = SimpleNamespace(transport=SimpleNamespace(transport=tcp))
    protocol = SmartClientProtocol(clock)
    protocol.makeConnection(channel)
    assert not protocol.has_unread_input()
    theirs.sendall(b"channel close")
    assert protocol.has_unread_input()
    channel.remoteClosed = True
    assert protocol.closed_reason() == "server closed the channel"


def test_protocol_channel_over_a_dead_ssh_connection_is_closed(clock):
    """A channel whose SSH connection died (a killed server) is reported closed, and probing it does not raise."""
    from types import SimpleNamespace

    def socket_already_closed():
        raise AttributeError("'Client' object has no attribute 'socket'")

    tcp = SimpleNamespace(getHandle=socket_already_closed, connected=0, disconnected=1)
    channel = StringTransport()
    channel.conn = SimpleNamespace(transport=SimpleNamespace(transport=tcp))
    protocol = SmartClientProtocol(clock)
    protocol.makeConnection(channel)
    assert not protocol.has_unread_input()
    assert protocol.closed_reason() == "the SSH connection under the channel is gone"


def test_engine_backs_off_from_a_server_that_hangs_up_at_once(server, clock):
    """Connections closed before carrying any request count as failures with backoff, not free reconnects."""
    original = server.connect

    def connect_and_hang_up():
        connected = original()
        server.connections[-1].transport.disconnecting = True
        server.connections[-1].protocol.connectionLost(Failure(ConnectionDone()))
        return connected

    server.connect = connect_and_hang_up
    client = make_client(server, clock, backoff_initial=1.0, max_connect_attempts=3)
    result = outcome(client.call(b"hello"))
    assert len(server.attempt_times) == 1
    clock.pump([1.0, 2.0])
    [failure] = result
    assert failure.check(RequestNotSent)
    assert server.attempt_times == [0.0, 1.0, 3.0]
    assert client.stats.probe_reconnects == 0


def test_engine_logs_each_resend_with_verb_and_reason(server, clock):
    """A resend is logged as a structured event naming the verb, its class, the point and the reason."""
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        client = make_client(server, clock)
        outcome(client.call(b"get", b"/x"))
        server.connections[0].lose()
    finally:
        globalLogPublisher.removeObserver(events.append)
    [resend] = [event for event in events if event.get("event_kind") == "resend"]
    assert resend["verb"] == "get"
    assert resend["verb_class"] == "read"
    assert resend["point"] == "after write"
    assert resend["reason"]


def test_protocol_garbage_inside_a_response_to_an_append_is_outcome_unknown(server, clock):
    """A response that breaks the protocol after it began: an append may have run, so it is not resent."""
    client = make_client(server, clock)
    result = outcome(client.call(b"append", b"/journal", b"", body=b"line\n"))
    connection = server.connections[0]
    connection.received()
    codec = connection.codec
    connection.protocol.dataReceived(codec.send(Response((b"appended", b"0"))) + b"Z\x00garbage")
    clock.advance(0)
    [failure] = result
    assert failure.check(OutcomeUnknown)
    assert "protocol error" in str(failure.value)
    assert len(server.connections) == 1 and connection.transport.disconnecting
    assert client.stats.resends == 0


def test_on_chunk_that_raises_fails_the_call_with_its_error_and_drops_the_connection(server, clock):
    """The caller's chunk handler failing ends the call with that exception; the half-read connection is not reused."""
    client = make_client(server, clock)

    def on_chunk(data):
        raise ValueError(f"cannot take {data!r}")

    result = outcome(client.call(b"Repository.get_stream_1.19", b"/b/", b"fmt", on_chunk=on_chunk))
    first = server.connections[0]
    first.respond(b"ok", body=b"chunk")
    [failure] = result
    assert failure.check(ValueError) and "cannot take b'chunk'" in str(failure.value)
    assert first.transport.disconnecting
    assert client.stats.resends == 0
    later = outcome(client.call(b"hello"))
    server.connections[1].respond(b"ok", b"2")
    assert later == [Reply((b"ok", b"2"), b"")]


def test_server_answering_before_the_request_body_ends_closes_that_connection(server, clock):
    """An early answer (say, an error at once) ends the call; the connection, its request unfinished, is not reused."""
    client = make_client(server, clock)
    release = Deferred()
    result = outcome(client.call(b"put", b"/path", body_stream=lambda: _stalled_parts(release)))
    first = server.connections[0]
    first.received()
    error = first.codec.send(Response((b"PermissionDenied", b"/path"), False)) + first.codec.send(EndOfMessage())
    first.protocol.dataReceived(error)
    [failure] = result
    assert failure.value.error_args == (b"PermissionDenied", b"/path")
    assert first.transport.disconnecting
    release.callback(None)
    later = outcome(client.call(b"hello"))
    assert len(server.connections) == 2
    server.connections[1].respond(b"ok", b"2")
    assert later == [Reply((b"ok", b"2"), b"")]


def test_arguments_that_cannot_be_encoded_fail_the_call_and_keep_the_connection(server, clock):
    """A request the codec refuses fails with ProtocolError before any byte is written; the connection serves on."""
    from smartserve.protocol import ProtocolError

    client = make_client(server, clock)
    outcome(client.call(b"hello"))
    first = server.connections[0]
    first.respond(b"ok", b"2")
    written = len(first.transport.value())
    result = outcome(client.call(b"get", 1.5))
    [failure] = result
    assert failure.check(ProtocolError) and "cannot bencode" in str(failure.value)
    assert len(first.transport.value()) == written and not first.transport.disconnecting
    later = outcome(client.call(b"get", b"/x"))
    first.respond(b"ok", body=b"y")
    assert later == [Reply((b"ok",), b"y")]
    assert len(server.connections) == 1 and client.stats.resends == 0


@pytest.mark.parametrize("body", ["text", 42])
def test_a_body_that_is_not_bytes_fails_the_call_and_keeps_the_pool_whole(server, clock, body):
    """A ``str`` or number body fails that call with ProtocolError, unsent and never resent; the one connection serves on.

    Found wrong: such a body failed after the codec marked the request
    sent, and the dropped request was later resent in the background
    while its pool slot was listed free twice.
    """
    from smartserve.protocol import ProtocolError

    client = make_client(server, clock)  # one connection at most
    outcome(client.call(b"hello"))
    first = server.connections[0]
    first.respond(b"ok", b"2")
    written = len(first.transport.value())
    [failure] = outcome(client.call(b"put", b"/f", body=body))
    assert failure.check(ProtocolError) and "a body part is bytes" in str(failure.value)
    assert len(first.transport.value()) == written and not first.transport.disconnecting
    calls = [outcome(client.call(b"hello")), outcome(client.call(b"hello"))]
    first.respond(b"ok", b"2")
    assert calls[0] == [Reply((b"ok", b"2"), b"")] and calls[1] == []
    first.respond(b"ok", b"2")
    assert calls[1] == [Reply((b"ok", b"2"), b"")]
    assert len(server.connections) == 1 and client.stats.resends == 0


def test_a_body_stream_item_that_is_not_bytes_fails_the_call_and_drops_its_connection(server, clock):
    """Part of the request is out when a ``str`` item comes: the call fails with ProtocolError, unresent, on a dropped connection."""
    from smartserve.protocol import ProtocolError

    client = make_client(server, clock)
    [failure] = outcome(client.call(b"put", b"/f", body_stream=lambda: [b"bytes", "text"]))
    assert failure.check(ProtocolError) and "a body part is bytes, not str" in str(failure.value)
    first = server.connections[0]
    assert first.transport.disconnecting and client.stats.resends == 0
    later = outcome(client.call(b"hello"))
    server.connections[1].respond(b"ok", b"2")
    assert later == [Reply((b"ok", b"2"), b"")]


@pytest.mark.parametrize("verb", [b"put", b"append"])
def test_close_while_a_write_awaits_its_answer_says_the_outcome_is_unknown(server, clock, verb):
    """A write wholly sent when ``close`` cuts its connection may have run: OutcomeUnknown, never resent.

    Found wrong: a ``put`` (idem) was counted as resent and failed with a
    bare ClientClosed, hiding that the server had it.
    """
    client = make_client(server, clock)
    result = outcome(client.call(verb, b"/f", b"", body=b"data"))
    assert server.connections[0].requests() == [verb]
    closed = outcome(client.close())
    [failure] = result
    assert failure.check(OutcomeUnknown), failure
    assert failure.value.why_not_resent == "the client is closed"
    assert failure.value.cause.reason == "the client closed the connection"
    assert client.stats.resends == 0 and len(server.connections) == 1
    assert closed == [None]


def test_close_while_a_read_awaits_its_answer_fails_it_as_closed(server, clock):
    """A read cut by ``close`` is not sent again: ClientClosed, caused by the lost attempt."""
    client = make_client(server, clock)
    result = outcome(client.call(b"get", b"/f"))
    assert server.connections[0].requests() == [b"get"]
    outcome(client.close())
    [failure] = result
    assert failure.check(ClientClosed), failure
    assert isinstance(failure.value.__cause__, ResponseNeverReceived)
    assert client.stats.resends == 0 and len(server.connections) == 1


def test_close_drops_connections_still_open_after_its_timeout(server, clock):
    """A connection whose close goes unanswered (an SSH server ignoring the channel close) is aborted at the timeout."""
    client = make_client(server, clock)
    outcome(client.call(b"hello"))
    first = server.connections[0]
    first.respond(b"ok", b"2")
    first.transport.loseConnection = lambda: None  # the close is sent, and never answered
    closed = outcome(client.close(timeout=5))
    clock.advance(4.9)
    assert closed == [] and not first.transport.disconnecting
    clock.advance(0.1)
    assert closed == [None]
    assert first.transport.disconnecting and first.protocol.is_closed


class ReactorLikeClock(Clock):
    """A Clock whose callLater refuses a negative delay, as the reactor's does."""

    def callLater(self, delay, *args, **kwargs):
        assert delay >= 0, f"negative delay {delay}"
        return super().callLater(delay, *args, **kwargs)


class LaterLossTransport(FakeTransport):
    """Reports an abort in a later turn, as a TCP transport does."""

    def __init__(self, clock):
        super().__init__()
        self.clock = clock

    def abortConnection(self):
        if not self.disconnecting:
            self.disconnecting = True
            self.clock.callLater(0, self.protocol.connectionLost, Failure(ConnectionAborted()))


def test_on_chunk_that_raises_fails_the_call_even_with_the_rest_of_the_response_in_the_same_read(server, clock):
    """After on_chunk raised, it gets no more parts and the call fails with its error, though the response ended."""
    client = make_client(server, clock)
    parts = []

    def on_chunk(data):
        parts.append(data)
        raise ValueError("disk full")

    result = outcome(client.call(b"Repository.get_stream_1.19", b"/b/", b"fmt", on_chunk=on_chunk))
    connection = server.connections[0]
    connection.received()
    connection.transport = LaterLossTransport(clock)
    connection.transport.protocol = connection.protocol
    connection.protocol.transport = connection.transport
    codec = connection.codec
    data = codec.send(Response((b"ok",))) + codec.send(BodyChunk(b"one")) + codec.send(BodyChunk(b"two"))
    connection.protocol.dataReceived(data + codec.send(EndOfMessage()))
    clock.advance(0)
    assert parts == [b"one"]
    assert result[0].check(ValueError)


def test_a_connection_made_as_the_deadline_passes_sends_nothing_and_stays_usable():
    """A connection that arrives in the turn the deadline passed fails that call unsent; the next call uses it."""
    clock = ReactorLikeClock()
    server = FakeServer(clock)
    made = Deferred()
    server.connect = lambda: made
    client = make_client(server, clock, deadline=5.0)
    first = outcome(client.call(b"hello"))
    connection = FakeConnection(clock)
    clock.callLater(4.0, made.callback, connection.protocol)  # due before the deadline's timer, run in one turn
    clock.advance(6.0)
    assert first[0].check(DeadlineExceeded)
    assert connection.requests() == []
    later = outcome(client.call(b"hello"))
    connection.respond(b"ok", b"2")
    assert later == [Reply((b"ok", b"2"), b"")]


def test_connection_is_closed_between_calls_once_it_reaches_max_connection_age(server, clock):
    """An old connection carries its call to the end, then is closed politely; the next call makes a new one."""
    client = make_client(server, clock, max_connection_age=100.0)  # jitter 1.0: retired after 90 s
    result = outcome(client.call(b"get", b"/a"))
    first = server.connections[0]
    first.respond(b"ok", body=b"a")
    clock.advance(89.0)
    outcome(client.call(b"get", b"/a"))
    first.respond(b"ok", body=b"a")
    assert not first.transport.disconnecting
    in_flight = outcome(client.call(b"get", b"/b"))
    clock.advance(2.0)  # the age passes while the call waits for its answer
    assert not first.transport.disconnecting
    first.respond(b"ok", body=b"b")
    assert in_flight == [Reply((b"ok",), b"b")]
    assert first.transport.disconnecting
    assert client.stats.retired_connections == 1
    later = outcome(client.call(b"get", b"/c"))
    assert len(server.connections) == 2
    second = server.connections[1]
    assert second.requests() == [b"get"]
    second.respond(b"ok", body=b"c")
    assert result + later == [Reply((b"ok",), b"a"), Reply((b"ok",), b"c")]
    assert client.stats.resends == 0 and client.stats.probe_reconnects == 0


def test_connection_lives_on_without_max_connection_age(server, clock):
    """By default a connection is kept however old it gets."""
    client = make_client(server, clock)
    for _ in range(3):
        outcome(client.call(b"get", b"/a"))
        server.connections[0].respond(b"ok", body=b"a")
        clock.advance(10_000.0)
    assert len(server.connections) == 1
    assert not server.connections[0].transport.disconnecting
    assert client.stats.retired_connections == 0


@pytest.mark.parametrize("while_resending", [False, True], ids=["in flight", "while resent"])
def test_engine_cancelled_call_drops_its_connection_and_sends_no_more_of_its_body(server, clock, while_resending):
    """Cancelling a call whose body is still being streamed drops its connection at once: the server discards the
    incomplete request, and no further part of the body is read or sent."""
    from twisted.internet.defer import CancelledError

    gates = []
    pulled = []

    async def parts():
        for index in range(3):
            gate = Deferred()
            gates.append(gate)
            await gate
            pulled.append(index)
            yield b"part %d" % index

    client = make_client(server, clock)
    cancelled = client.call(b"put", b"/x", b"", body_stream=parts)
    result = outcome(cancelled)
    if while_resending:
        server.connections[0].lose()
        assert len(server.connections) == 2
    connection = server.connections[-1]
    gates[-1].callback(None)
    assert pulled == [0]
    cancelled.cancel()
    assert result[0].check(CancelledError)
    assert connection.transport.disconnecting
    sent, asked = connection.transport.value(), len(gates)
    gates[-1].callback(None)  # the part being read when the call was cancelled comes
    assert connection.transport.value() == sent
    assert len(gates) == asked and pulled == [0, 1]


def _assert_resent_once_on_a_new_connection(server, clock, client, verb, result) -> None:
    """The call's request goes out once more, on a second connection, and its answer there settles the call."""
    clock.advance(0)
    second = server.connections[1]
    assert second.requests() == [verb]
    second.respond(b"ok")
    assert result == [Reply((b"ok",), b"")]
    assert client.stats.outcome_unknown == 0 and client.stats.resends == 1


@pytest.mark.parametrize("verb_class", sorted(VERBS))
def test_request_turned_away_after_write_is_resent_whatever_its_class(server, clock, verb_class):
    """TooManyConnections as a connection's first answer means the request did not run: every class goes out again."""
    verb = VERBS[verb_class]
    client = make_client(server, clock)
    result = outcome(client.call(verb, b"/path", body=b"body"))
    first = server.connections[0]
    assert first.requests() == [verb]
    first.turn_away()
    _assert_resent_once_on_a_new_connection(server, clock, client, verb, result)


def test_connections_turned_away_before_any_write_are_bounded_by_max_resends(server, clock):
    """Refusals that arrive before the request is written end the call after max_resends, as never sent."""
    server.script = ["turn away"] * 10
    client = make_client(server, clock, max_resends=2)
    result = outcome(client.call(b"append", b"/journal", b"", body=b"line"))
    clock.advance(10)
    assert len(result) == 1 and result[0].check(RequestNotSent)
    assert "turned the connection away" in str(result[0].value)
    assert len(server.connections) == 3
    assert all(connection.requests() == [] for connection in server.connections)


def test_call_turned_away_waits_for_a_live_pooled_connection_instead_of_another(server, clock):
    """With one connection of the pool serving, a call turned away on a second waits for the first, asking for no third."""
    client = SmartClient(server.connect, pool_size=2, clock=clock, policy=RetryPolicy(backoff_initial=0.0))
    first_call = outcome(client.call(b"get", b"/a"))
    second_call = outcome(client.call(b"append", b"/journal", b"", body=b"line"))
    live, refused = server.connections
    refused.turn_away()
    clock.advance(1)
    assert len(server.connections) == 2, "the turned-away call connected again instead of waiting"
    live.respond(b"ok", body=b"a")
    assert first_call == [Reply((b"ok",), b"a")]
    assert live.requests() == [b"get", b"append"]
    live.respond(b"appended", b"0")
    assert second_call == [Reply((b"appended", b"0"), b"")]


@pytest.mark.parametrize("verb_class", sorted(VERBS))
def test_request_answered_server_draining_is_resent_at_once_whatever_its_class(server, clock, verb_class):
    """A bzr:// drain's ServerDraining answers a request the server did not read: it goes out again on a new connection, no backoff."""
    verb = VERBS[verb_class]
    client = make_client(server, clock, backoff_initial=10.0)
    warm = outcome(client.call(b"hello"))
    first = server.connections[0]
    first.respond(b"ok", b"2")
    assert warm == [Reply((b"ok", b"2"), b"")]
    result = outcome(client.call(verb, b"/path", body=b"body"))
    assert first.requests() == [b"hello", verb]
    first.protocol.dataReceived(error_response((SERVER_DRAINING, b"the server is draining")))
    _assert_resent_once_on_a_new_connection(server, clock, client, verb, result)


@pytest.mark.parametrize("verb_class", sorted(VERBS))
def test_request_refused_server_busy_is_sent_again_on_the_same_connection_after_a_backoff(server, clock, verb_class):
    """ServerBusy says the server ran nothing of the request: whatever its class, it goes out again on the same
    connection once the backoff has passed, never before."""
    verb = VERBS[verb_class]
    client = make_client(server, clock, backoff_initial=0.5)
    result = outcome(client.call(verb, b"/path", body=b"body"))
    connection = server.connections[0]
    connection.respond(SERVER_BUSY, b"the server holds its limit", success=False)
    clock.advance(0.49)
    assert connection.requests() == [verb] and result == []
    clock.advance(0.01)
    assert connection.requests() == [verb, verb]
    connection.respond(b"ok")
    assert result == [Reply((b"ok",), b"")]
    assert len(server.connections) == 1
    assert client.stats.resends == 1 and client.stats.outcome_unknown == 0


def test_server_busy_resends_are_bounded_and_the_error_says_why_it_was_not_sent_again(server, clock):
    """A server that stays busy gets max_resends more tries, with growing backoffs, then the call fails with
    ServerBusy; with resending off it fails at once; a one-shot body stream is not sent again."""
    from smartserve.client import ServerBusy

    client = make_client(server, clock, backoff_initial=0.1, max_resends=2)
    result = outcome(client.call(b"append", b"/journal", b"", body=b"line"))
    connection = server.connections[0]
    times = []
    for _ in range(3):
        times.append(clock.seconds())
        connection.respond(SERVER_BUSY, b"busy", success=False)
        clock.advance(1)
    assert times == [0, 1, 2] and connection.requests() == [b"append"] * 3
    [failure] = result
    assert failure.check(ServerBusy) and failure.value.why_not_resent == "already resent 2 time(s)"

    quiet = make_client(server, clock, resend=False)
    result = outcome(quiet.call(b"put", b"/file", b"", body=b"data"))
    server.connections[-1].respond(SERVER_BUSY, b"busy", success=False)
    assert result[0].value.why_not_resent == "resending is switched off"

    def one_shot():
        yield b"part"

    result = outcome(make_client(server, clock).call(b"put", b"/file", b"", body_stream=one_shot()))
    server.connections[-1].respond(SERVER_BUSY, b"busy", success=False)
    assert result[0].value.why_not_resent == "its one-shot body stream was already read"


def test_server_busy_resend_is_counted_in_metrics(server, clock):
    from smartserve.metrics import ClientMetrics

    metrics = ClientMetrics()
    client = SmartClient(server.connect, policy=RetryPolicy(backoff_initial=0.0), clock=clock, metrics=metrics)
    result = outcome(client.call(b"append", b"/journal", b"", body=b"line"))
    server.connections[0].respond(SERVER_BUSY, b"busy", success=False)
    clock.advance(0)
    server.connections[0].respond(b"appended", b"0")
    assert result == [Reply((b"appended", b"0"), b"")]
    text = metrics.render().decode()
    assert 'smartserve_client_resends_total{reason="server busy",verb_class="mutate"} 1.0' in text

"""The errors by which smartserve says it read nothing of a request: the request did not run.

``TooManyConnections`` answers a connection over the server's limit; the
client takes it so only as the first thing a connection says, and sends
the request again (on a connection the pool already has, if any).
``ServerDraining`` answers whatever came after the last answer on a bzr://
connection a drain closes; the client sends the request again on a new
connection at once, as after SSH exit status 75. Either way, whatever the
verb, the call is never reported with its outcome unknown.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from smartserve.client import RemoteError, RetryPolicy, SmartClient, SmartClientProtocol, TransportFailure
from smartserve.client._protocol import Outgoing
from smartserve.protocol import SERVER_DRAINING, TOO_MANY_CONNECTIONS, error_response
from smartserve.verbs import FailurePoint

_TURNED_AWAY = error_response((TOO_MANY_CONNECTIONS, b"the server has 2 bzr:// connections open"))


def _success(*args) -> bytes:
    """A whole bodyless success response."""
    return error_response(args).replace(b"oE", b"oS", 1)


def _connected() -> SmartClientProtocol:
    protocol = SmartClientProtocol(Clock())
    protocol.makeConnection(StringTransport())
    return protocol


def _append_after_a_hello():
    """A connection whose ``hello`` was answered, and the Deferred of an ``append`` sent after it."""
    protocol = _connected()
    first = protocol.send_request(Outgoing(b"hello", ()))
    protocol.dataReceived(_success(b"ok", b"2"))
    assert _outcome(first).args == (b"ok", b"2")
    return protocol, protocol.send_request(Outgoing(b"append", (b"/journal", b""), body=b"line\n"))


def _outcome(deferred):
    outcomes = []
    deferred.addBoth(outcomes.append)
    [outcome] = outcomes
    return outcome


def test_first_answer_too_many_connections_fails_the_request_as_not_run():
    """The first request's answer TooManyConnections is a TransportFailure the server did not run, and the connection closes."""
    protocol = _connected()
    sent = protocol.send_request(Outgoing(b"append", (b"/journal", b""), body=b"line\n"))
    protocol.dataReceived(_TURNED_AWAY)
    failure = _outcome(sent)
    assert isinstance(failure.value, TransportFailure)
    assert failure.value.server_busy and failure.value.not_run
    assert failure.value.point is FailurePoint.AFTER_WRITE
    assert "turned the connection away" in str(failure.value)
    assert protocol.turned_away and not protocol.reusable
    assert protocol.transport.disconnecting


def test_too_many_connections_later_on_a_connection_is_an_ordinary_remote_error():
    """Only a connection's first answer can be the refusal: later, the same error is the server's answer to that request."""
    protocol, second = _append_after_a_hello()
    protocol.dataReceived(_TURNED_AWAY)
    failure = _outcome(second)
    assert isinstance(failure.value, RemoteError) and not protocol.turned_away


def test_refusal_read_before_any_request_marks_the_connection_turned_away():
    """The refusal arriving before the first request is written: the connection is closed, known as turned away."""
    protocol = _connected()
    protocol.dataReceived(_TURNED_AWAY)
    assert protocol.turned_away
    protocol.connectionLost(Failure(ConnectionDone()))
    assert protocol.closed_reason() is not None


class _AlwaysTurnsAway(Protocol):
    def connectionMade(self):
        self.factory.connections += 1
        self.transport.write(_TURNED_AWAY)
        self.transport.loseConnection()


@pytest.fixture
def turning_away_server():
    factory = Factory.forProtocol(_AlwaysTurnsAway)
    factory.noisy = False
    factory.connections = 0
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield factory, port.getHost().port
    pytest_twisted.blockon(port.stopListening())


@pytest_twisted.ensureDeferred
async def test_a_server_that_always_turns_away_costs_bounded_attempts_and_no_outcome_unknown(turning_away_server):
    """An append to a server that is always full fails after max_resends, never as "outcome unknown"."""
    factory, port = turning_away_server
    policy = RetryPolicy(max_resends=3, max_connect_attempts=3, backoff_initial=0.01, backoff_max=0.05, deadline=20)
    client = SmartClient.from_url(f"bzr://127.0.0.1:{port}/", policy=policy)
    try:
        with pytest.raises(TransportFailure) as raised:
            await client.call(b"append", b"/journal", b"", body=b"line\n")
    finally:
        await client.close()
    assert raised.value.not_run
    assert client.stats.outcome_unknown == 0
    assert 1 < factory.connections <= 1 + policy.max_resends + policy.max_connect_attempts


@pytest_twisted.ensureDeferred
async def test_one_shot_body_refused_is_not_resent_and_not_outcome_unknown(turning_away_server):
    """A one-shot body stream already read cannot go out again: the call fails saying the server did not run it."""
    _, port = turning_away_server
    client = SmartClient.from_url(f"bzr://127.0.0.1:{port}/", policy=RetryPolicy(backoff_initial=0.01, deadline=20))
    try:
        with pytest.raises(TransportFailure) as raised:
            await client.call(b"append", b"/journal", b"", body_stream=iter([b"one ", b"shot\n"]))
    finally:
        await client.close()
    assert raised.value.not_run and "one-shot" in raised.value.why_not_resent
    assert client.stats.outcome_unknown == 0


def test_server_draining_answer_fails_any_request_as_not_run_with_the_drain_signal():
    """ServerDraining, even on a connection that carried requests before, is a drain signal: not run, connection closed."""
    protocol, second = _append_after_a_hello()
    protocol.dataReceived(error_response((SERVER_DRAINING, b"the server is draining: connect again")))
    failure = _outcome(second)
    assert isinstance(failure.value, TransportFailure)
    assert failure.value.drain_signal and failure.value.not_run and not failure.value.server_busy
    assert "draining" in str(failure.value)
    assert not protocol.reusable and protocol.transport.disconnecting

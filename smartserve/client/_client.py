"""The client: calls, the probe before each write, and the resend rule.

Theory of operation
-------------------

A call takes a slot from the pool and asks it for a connection. Before
writing, it probes that connection (``SmartClientProtocol.closed_reason``):
if the server has already closed it, even if the EOF is still unread in the
socket, the connection is dropped and a new one made. That costs nothing:
no byte was written, so it is neither a failure nor a resend.

If the connection fails while the request is on it, the protocol reports
how far the request got (a ``TransportFailure`` subclass). Whether to send
it again is asked in exactly one place, ``smartserve.verbs.may_resend``,
from the verb's class, that failure point, the SSH drain signal and whether
the body can be sent again. Only then do the limits apply: resending
switched off, ``max_resends``, the call's deadline and the retry budget
shared by all calls. A request that is not resent although it may have run
(sent in full, verb not ``read``, no drain signal) fails with
``OutcomeUnknown`` naming the verb; otherwise the phase exception itself is
raised, since the server did not apply the request.

A request smartserve answers ``ServerBusy`` (its memory for request bodies
is full) was read and dropped unrun on a connection that stays usable: it
goes out again on that connection after a backoff, within the same limits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.task import deferLater
from twisted.logger import Logger

from ..protocol import DEFAULT_LIMITS, Limits
from ..verbs import FailurePoint, VerbClass, classify, may_resend
from ._endpoints import Target, connector_for_endpoint, parse_url, tcp_endpoint
from ._exceptions import (
    ClientClosed,
    ClientError,
    DeadlineExceeded,
    OutcomeUnknown,
    RemoteError,
    RequestNotSent,
    ServerBusy,
    TransportFailure,
)
from ._policy import RetryBudget, RetryPolicy, backoff_delay
from ._pool import Pool
from ._protocol import Outgoing, Reply

__all__ = ["SmartClient", "ClientStats"]

_PROBE_TURNS = 2  # reactor turns to let unread input arrive before writing


_CLOSED = "the client is closed"
"""Why a call cut by ``close`` is not sent again."""

_CANCELLED = "call cancelled"
"""Why a cancelled call's connection is dropped: a request half sent or unanswered leaves it unusable, and
dropping it makes the server discard a request not wholly sent."""


@dataclass
class ClientStats:
    """Counters over a client's life, for logs, metrics and tests."""

    calls: int = 0
    probe_reconnects: int = 0
    connect_failures: int = 0
    resends: int = 0
    outcome_unknown: int = 0
    keepalive_drops: int = 0
    retired_connections: int = 0


class _TurnedAway(Exception):
    """Inside the engine: the server turned the attempt's connection away; the call goes on on another slot."""

    def __init__(self, resends: int):
        super().__init__(resends)
        self.resends = resends


class _FirstAttempt:
    """What the engine does with the outcome of a call's first attempt on a connected slot.

    The protocol tells it before the caller's callbacks run (see
    ``SmartClientProtocol.send_request``): an answer gives the slot back;
    a lost attempt goes on in the engine's loop, whose Deferred the call
    then follows; cancelling the call gives the slot back, or cancels
    that loop.
    """

    __slots__ = ("_client", "_outgoing", "_entry", "_deadline_at", "_resend", "_over")

    def __init__(self, client: "SmartClient", outgoing: Outgoing, entry, deadline_at: float):
        self._client = client
        self._outgoing = outgoing
        self._entry = entry
        self._deadline_at = deadline_at
        self._resend: Optional[Deferred] = None
        self._over = False

    def answered(self, reply: Reply) -> None:
        if not self._over:
            self._over = True
            self._client._answered(self._entry)

    def failed(self, error: BaseException) -> Optional[Deferred]:
        if self._over:
            return None
        self._over = True
        client, entry = self._client, self._entry
        if isinstance(error, ServerBusy):
            entry.slot.request_succeeded()
            self._resend = Deferred.fromCoroutine(client._run_after_busy(self._outgoing, entry, self._deadline_at, error))
            return self._resend
        if isinstance(error, TransportFailure):
            try:
                client._attempt_lost(self._outgoing, entry, error, 0, self._deadline_at)
            except BaseException:
                client._pool.release(entry)
                raise
            self._resend = Deferred.fromCoroutine(
                client._run(self._outgoing, entry, self._deadline_at, resends=1, turned_away=error.server_busy)
            )
            return self._resend
        if isinstance(error, RemoteError):
            client._answered(entry)
        else:
            client._pool.release(entry)
        return None

    def cancel(self, deferred: Deferred) -> None:
        if self._resend is not None:
            self._resend.cancel()
        elif not self._over:
            self._over = True
            self._entry.protocol.abandon(_CANCELLED)
            self._client._pool.release(self._entry)


class SmartClient:
    """A smart protocol client that reconnects and resends only what is safe.

    ``connect`` is a function returning a Deferred that fires with a
    connected ``SmartClientProtocol`` (``SmartClient.from_url`` builds it
    from a URL). ``pool_size`` connections at most are used at once.
    ``clock`` defaults to the reactor; ``jitter`` returns a float in [0, 1)
    for the backoff. ``metrics``, such as ``smartserve.metrics.ClientMetrics``,
    is told of each reconnect (reason ``probe``, ``failure``, ``drain`` or ``age``),
    resend (verb class, failure point) and unknown outcome (verb class).
    """

    _log = Logger()

    def __init__(
        self,
        connect: Callable[[], Deferred],
        *,
        policy: RetryPolicy = RetryPolicy(),
        pool_size: int = 1,
        clock=None,
        jitter: Callable[[], float] = random.random,
        target: Optional[Target] = None,
        name: str = "smartserve",
        metrics=None,
    ):
        if clock is None:
            from twisted.internet import reactor as clock
        self.policy = policy
        self.target = target
        self.stats = ClientStats()
        self.metrics = metrics
        self.budget = RetryBudget(policy.budget_tokens, policy.budget_ratio)
        self._clock = clock
        self._jitter = jitter
        self._pool = Pool(connect, clock, policy, jitter, pool_size, name, self.stats, metrics)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        reactor=None,
        policy: RetryPolicy = RetryPolicy(),
        pool_size: int = 1,
        limits: Limits = DEFAULT_LIMITS,
        ssh=None,
        **kwargs,
    ) -> "SmartClient":
        """A client for ``bzr://host[:port]/path`` or ``bzr+ssh://[user@]host[:port]/path``.

        ``ssh`` is an ``SSHOptions`` for ``bzr+ssh://`` URLs (keys, agent,
        known_hosts, remote command). Raises ``ValueError`` for an
        unsupported URL.
        """
        if reactor is None:
            from twisted.internet import reactor
        target = parse_url(url)
        if target.scheme == "bzr":
            endpoint = tcp_endpoint(reactor, target, policy.connect_timeout)
        else:
            from ._ssh import SSHOptions, ssh_endpoint

            endpoint = ssh_endpoint(reactor, target, ssh or SSHOptions(), policy.connect_timeout)
        connect = connector_for_endpoint(endpoint, kwargs.get("clock", reactor), limits)
        kwargs.setdefault("clock", reactor)
        return cls(connect, policy=policy, pool_size=pool_size, target=target, name=url, **kwargs)

    def remote_path(self, relpath: str = "") -> bytes:
        """The VFS path argument for ``relpath`` below the URL's path."""
        if self.target is None:
            return ("/" + relpath.lstrip("/")).encode("utf-8")
        return self.target.remote_path(relpath)

    def call(
        self,
        verb: bytes,
        *args: Any,
        body: Optional[bytes] = None,
        body_stream: Optional[Iterable[bytes]] = None,
        on_chunk: Optional[Callable[[bytes], object]] = None,
        headers: Optional[Mapping[bytes, Any]] = None,
    ) -> Deferred:
        """Call ``verb`` with ``args``; the Deferred fires with a ``Reply``.

        ``body`` sends bytes as the request body, ``body_stream`` sends one
        part per item (see ``Outgoing`` for replayable streams), and
        ``on_chunk`` receives the response body part by part (the reply's
        ``body`` is then None). A streamed response is resent after a loss
        only if no part reached ``on_chunk`` yet.

        A request the server refused unrun for lack of memory
        (``ServerBusy``) is sent again after a backoff, whatever its verb.
        Fails with a ``RemoteError`` subclass when the server answers with
        an error, ``OutcomeUnknown`` when the request may have run and may
        not be resent, a ``TransportFailure`` subclass when the request
        surely did not run and could not be sent again, ``DeadlineExceeded``
        when the deadline passed before any attempt was on the wire,
        ``ClientClosed`` after ``close``, and ``ProtocolError`` for
        arguments, or a body that is not bytes, the codec cannot encode
        (nothing is sent).
        """
        outgoing = Outgoing(verb, args, body=body, body_stream=body_stream, on_chunk=on_chunk, headers=headers)
        self.stats.calls += 1
        deadline_at = self._clock.seconds() + self.policy.deadline
        entry = self._pool.take_free()
        if entry is None:
            return Deferred.fromCoroutine(self._call(outgoing, deadline_at))
        protocol = entry.slot.ready_connection()
        if protocol is None or protocol.closed_reason() is not None or protocol.has_unread_input():
            return Deferred.fromCoroutine(self._run(outgoing, entry, deadline_at))
        return self._send_first(outgoing, entry, protocol, deadline_at)

    def close(self, timeout: float = 5.0) -> Deferred:
        """Close all connections; later calls fail with ``ClientClosed``.

        The Deferred fires once every connection is closed; connections
        still open after ``timeout`` seconds (an SSH server that does not
        answer the channel close) are dropped.
        """
        closed = self._pool.stop()
        if closed.called:
            return closed
        timer = self._clock.callLater(timeout, self._pool.abort_all, "client closed")

        def done(result):
            if timer.active():
                timer.cancel()
            return result

        return closed.addBoth(done)

    def _remaining(self, deadline_at: float) -> float:
        return deadline_at - self._clock.seconds()

    async def _bounded(self, waiting: Deferred, seconds: float, verb: bytes, last_error) -> Any:
        """Wait for ``waiting``, raising ``DeadlineExceeded`` after ``seconds``."""
        if waiting.called:
            return await waiting
        expired = []

        def expire() -> None:
            expired.append(True)
            waiting.cancel()

        timer = self._clock.callLater(max(0.0, seconds), expire)
        try:
            return await waiting
        except CancelledError:
            if expired:
                raise DeadlineExceeded(verb, self.policy.deadline, last_error) from None
            raise
        finally:
            if timer.active():
                timer.cancel()

    def _attempt_timeout(self, deadline_at: float) -> float:
        timeout = self.policy.request_timeout
        remaining = max(0.0, self._remaining(deadline_at))
        return remaining if timeout is None else min(timeout, remaining)

    def _send_first(self, outgoing: Outgoing, entry, protocol, deadline_at: float) -> Deferred:
        """The first attempt on a connected slot that passed the probe, spared the coroutines.

        The caller gets the protocol's own Deferred; ``_FirstAttempt``
        hears the outcome first. This is the common case; a lost attempt
        goes on in ``_attempts`` exactly as if it had been made there.
        """
        entry.protocol = protocol
        attempt = _FirstAttempt(self, outgoing, entry, deadline_at)
        try:
            return protocol.send_request(outgoing, timeout=self._attempt_timeout(deadline_at), listener=attempt)
        except Exception:
            self._pool.release(entry)
            return fail()

    def _answered(self, entry) -> None:
        """The request on ``entry``'s slot got its answer: count it and give the slot back."""
        entry.slot.request_succeeded()
        self.budget.record_success()
        self._pool.release(entry)

    async def _call(self, outgoing: Outgoing, deadline_at: float) -> Reply:
        entry = await self._bounded(self._pool.acquire(), self._remaining(deadline_at), outgoing.verb, None)
        return await self._run(outgoing, entry, deadline_at)

    async def _run(self, outgoing: Outgoing, entry, deadline_at: float, resends: int = 0, turned_away: bool = False) -> Reply:
        """The attempts on ``entry``'s slot, which goes back to the pool at the end.

        A server that turned a connection away (``turned_away``) has too
        many open: the call gives its slot back and waits for one of the
        pool's live connections, if it has any, rather than ask the server
        for another.
        """
        try:
            while True:
                if turned_away:
                    self._pool.release(entry)
                    entry = None
                    live = self._pool.acquire_live()
                    entry = await self._bounded(live, self._remaining(deadline_at), outgoing.verb, None)
                try:
                    return await self._attempts(outgoing, entry, deadline_at, resends)
                except _TurnedAway as turned:
                    resends, turned_away = turned.resends, True
        finally:
            if entry is not None:
                self._pool.release(entry)

    async def _attempts(self, outgoing: Outgoing, entry, deadline_at: float, resends: int) -> Reply:
        verb = outgoing.verb
        connect_failures = 0
        last_error: Optional[Exception] = None
        while True:
            try:
                protocol = await self._bounded(
                    entry.slot.connection(), self._remaining(deadline_at), verb, last_error
                )
            except (ClientError, CancelledError):
                raise
            except Exception as exc:
                connect_failures += 1
                self.stats.connect_failures += 1
                self.budget.record_failure()
                last_error = exc
                self._log.info(
                    "connection attempt {attempt} for {verb} failed: {reason}",
                    verb=verb.decode("utf-8", "replace"),
                    attempt=connect_failures,
                    reason=str(exc) or type(exc).__name__,
                    event_kind="connect_failed",
                )
                if self._stop_connecting(connect_failures):
                    raise RequestNotSent(verb, self._could_not_connect(connect_failures, exc)) from exc
                continue
            entry.protocol = protocol
            reason = await self._probe(protocol)
            if reason is not None and protocol.turned_away:
                # Before anything was written: counted as a resend, which bounds how often.
                entry.slot.request_failed(reason)
                if self.metrics is not None:
                    self.metrics.reconnected("busy")
                if resends >= self.policy.max_resends or self._remaining(deadline_at) <= 0:
                    raise RequestNotSent(verb, f"{reason} ({resends + 1} times)")
                raise _TurnedAway(resends + 1)
            if reason is not None and protocol.requests_sent == 0:
                # Closed before it carried anything: a server that accepts
                # and hangs up is failing, and gets the backoff.
                connect_failures += 1
                self.stats.connect_failures += 1
                self.budget.record_failure()
                last_error = ConnectionError(reason)
                entry.slot.request_failed(reason)
                if self._stop_connecting(connect_failures):
                    raise RequestNotSent(verb, self._could_not_connect(connect_failures, reason))
                continue
            if reason is not None:
                self.stats.probe_reconnects += 1
                self._log.info(
                    "reconnecting before {verb}: {reason}",
                    verb=verb.decode("utf-8", "replace"),
                    reason=reason,
                    event_kind="reconnect",
                )
                entry.slot.discard(reason)
                if self.metrics is not None:
                    self.metrics.reconnected("probe")
                continue
            if self._remaining(deadline_at) <= 0:
                # The connection came in the turn the deadline passed: nothing was sent.
                raise DeadlineExceeded(verb, self.policy.deadline, last_error)
            try:
                reply = await protocol.send_request(outgoing, timeout=self._attempt_timeout(deadline_at))
            except CancelledError:
                protocol.abandon(_CANCELLED)
                raise
            except ServerBusy as busy:
                entry.slot.request_succeeded()
                await self._wait_out_busy(outgoing, busy, resends, deadline_at)
                resends += 1
                continue
            except RemoteError:
                entry.slot.request_succeeded()
                self.budget.record_success()
                raise
            except TransportFailure as failure:
                self._attempt_lost(outgoing, entry, failure, resends, deadline_at)
                resends += 1
                if failure.server_busy:
                    raise _TurnedAway(resends)
                continue
            entry.slot.request_succeeded()
            self.budget.record_success()
            return reply

    def _stop_connecting(self, failures: int) -> bool:
        return failures >= self.policy.max_connect_attempts or not self.budget.allows_retry()

    def _could_not_connect(self, failures: int, reason) -> str:
        """Why a call gave up connecting, naming the retry budget when it, not the attempts, ran out."""
        budget = "" if failures >= self.policy.max_connect_attempts else "; the retry budget is exhausted"
        return f"could not connect ({failures} attempts{budget}): {reason}"

    def _attempt_lost(self, outgoing: Outgoing, entry, failure: TransportFailure, resends: int, deadline_at: float) -> None:
        """Account for an attempt lost with ``failure``; raise the call's error unless it goes out again."""
        if failure.drain_signal:
            entry.slot.discard(failure.reason)
        else:
            entry.slot.request_failed(failure.reason)
            if not failure.server_busy:
                # A refusal that ran nothing cost the server little: its slot
                # waits before connecting again, but the budget is for failures.
                self.budget.record_failure()
        if self.metrics is not None:
            self.metrics.reconnected("drain" if failure.drain_signal else "busy" if failure.server_busy else "failure")
        why_not = self._why_not_resend(outgoing, failure, resends, deadline_at)
        if why_not is not None:
            raise self._final_error(outgoing, failure, why_not) from failure
        verb = outgoing.verb
        self.stats.resends += 1
        if self.metrics is not None:
            self.metrics.resent(classify(verb), failure.point.value)
        self._log.info(
            "resending {verb} ({verb_class}), lost {point}: {reason}",
            verb=verb.decode("utf-8", "replace"),
            verb_class=classify(verb).value,
            point=failure.point.value,
            reason=failure.reason,
            drain_signal=failure.drain_signal,
            resend=resends + 1,
            event_kind="resend",
        )

    async def _run_after_busy(self, outgoing: Outgoing, entry, deadline_at: float, busy: ServerBusy) -> Reply:
        """Go on with a call whose first attempt the server refused unrun (``ServerBusy``): wait, then send again."""
        try:
            await self._wait_out_busy(outgoing, busy, 0, deadline_at)
        except BaseException:
            self._pool.release(entry)
            raise
        return await self._run(outgoing, entry, deadline_at, resends=1)

    async def _wait_out_busy(self, outgoing: Outgoing, busy: ServerBusy, resends: int, deadline_at: float) -> None:
        """Wait a backoff before sending again a request the server refused unrun for lack of memory.

        Raises ``busy`` instead, with ``why_not_resent``, when the request
        may not go again. A busy server is a failure for the retry budget,
        so clients that all hear it back off rather than storm it.
        """
        self.budget.record_failure()
        delay = backoff_delay(resends + 1, self.policy, self._jitter)
        if not self.policy.resend:
            why_not = "resending is switched off"
        elif not outgoing.body_replayable:
            why_not = "its one-shot body stream was already read"
        else:
            why_not = self._past_limits(resends, deadline_at, wait=delay)
        if why_not is not None:
            busy.why_not_resent = why_not
            raise busy
        verb = outgoing.verb
        self.stats.resends += 1
        if self.metrics is not None:
            self.metrics.resent(classify(verb), "server busy")
        self._log.info(
            "resending {verb} in {delay:.2f} s: the server is busy, and ran nothing of it",
            verb=verb.decode("utf-8", "replace"),
            delay=delay,
            resend=resends + 1,
            event_kind="resend",
        )
        await deferLater(self._clock, delay)

    async def _probe(self, protocol) -> Optional[str]:
        reason = protocol.closed_reason()
        turns = 0
        while reason is None and turns < _PROBE_TURNS and protocol.has_unread_input():
            # An SSH channel close may be waiting in the socket; let the
            # reactor read it before deciding.
            await deferLater(self._clock, 0)
            turns += 1
            reason = protocol.closed_reason()
        return reason

    def _why_not_resend(self, outgoing: Outgoing, failure: TransportFailure, resends: int, deadline_at: float) -> Optional[str]:
        """None if the failed request may go out again, else why not."""
        if self._pool.stopped:
            return _CLOSED
        verb_class = classify(outgoing.verb)
        point = failure.point
        if not may_resend(verb_class, point, not_run=failure.not_run, body_replayable=outgoing.body_replayable):
            if not outgoing.body_replayable:
                return "its one-shot body stream was already read"
            return f"a {verb_class.value} verb is not resent {point.value}"
        if point is FailurePoint.DURING_RESPONSE and not outgoing.response_replayable:
            return "part of the response body already went to on_chunk"
        if not self.policy.resend and point is not FailurePoint.BEFORE_WRITE:
            return "resending is switched off"
        return self._past_limits(resends, deadline_at)

    def _past_limits(self, resends: int, deadline_at: float, wait: float = 0.0) -> Optional[str]:
        """Why sending a request again, after ``wait`` seconds, would break ``max_resends``, the call's
        deadline or the retry budget; None if it would not."""
        if resends >= self.policy.max_resends:
            return f"already resent {resends} time(s)"
        if self._remaining(deadline_at) <= wait:
            return "the call's deadline would pass first" if wait else "the call's deadline passed"
        if not self.budget.allows_retry():
            return "the retry budget is exhausted"
        return None

    def _final_error(self, outgoing: Outgoing, failure: TransportFailure, why_not: str) -> Exception:
        may_have_run = failure.point in (FailurePoint.AFTER_WRITE, FailurePoint.DURING_RESPONSE) and not failure.not_run
        if may_have_run and classify(outgoing.verb) is not VerbClass.READ:
            self.stats.outcome_unknown += 1
            if self.metrics is not None:
                self.metrics.outcome_unknown(classify(outgoing.verb))
            self._log.warn(
                "outcome of {verb} unknown: {reason} {point}; not resent: {why_not}",
                verb=outgoing.verb.decode("utf-8", "replace"),
                reason=failure.reason,
                point=failure.point.value,
                why_not=why_not,
                event_kind="outcome_unknown",
            )
            return OutcomeUnknown(outgoing.verb, failure, why_not)
        if why_not is _CLOSED:
            return ClientClosed(_CLOSED)
        failure.why_not_resent = why_not
        return failure

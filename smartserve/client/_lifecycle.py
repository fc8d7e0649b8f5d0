"""The lifecycle of one pooled connection, as an Automat state machine.

A ``ConnectionSlot`` holds at most one connection and knows how to make
another. Its states::

    Idle --connection()--> Connecting --made--> Connected
                              |                   |  \\
                           failed          request_failed  discard() / lost
                              v                   v      \\
                           Waiting <--------------+       -> Idle
                              |  backoff timer, if someone waits
                              +--> Connecting

    any state --stop()--> Stopped

A connection the server closed while idle (or that the probe found closed)
goes back to Idle with no penalty, unless it closed before carrying any
request: a server that accepts and hangs up is failing. That, a failed
connection attempt and a failed request move to Waiting, which reconnects after ``backoff_delay`` for the
number of failures in a row, and only if a call is waiting for it. Callers
waiting for a connection see each failed attempt, so that the engine can
count it against its limits. Time comes from the injected clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Protocol

from automat import TypeMachineBuilder, pep614
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._exceptions import ClientClosed
from ._policy import RetryPolicy, backoff_delay
from ._protocol import SmartClientProtocol

__all__ = ["ConnectionSlot", "make_slot"]


class ConnectionSlot(Protocol):
    """The inputs of one connection's lifecycle."""

    def connection(self) -> Deferred[SmartClientProtocol]:
        """A connection: the current one, or the next one made.

        Fails with the connection attempt's error if that attempt fails,
        and with ``ClientClosed`` once stopped.
        """

    def request_succeeded(self) -> None:
        """A request on the current connection got its answer."""

    def request_failed(self, reason: str) -> None:
        """A request on the current connection failed; back off before reconnecting."""

    def discard(self, reason: str) -> None:
        """Drop the current connection without penalty (the server closed it)."""

    def retire(self) -> None:
        """Close the current connection politely; the next ``connection()`` makes a new one."""

    def stop(self) -> None:
        """Close the connection and make no more."""

    def _connection_made(self, protocol: SmartClientProtocol) -> None:
        """A connection attempt succeeded."""

    def _connection_failed(self, failure: Failure) -> None:
        """A connection attempt failed."""

    def _connection_lost(self) -> None:
        """The current connection closed."""

    def _connection_refused(self) -> None:
        """The current connection closed before it carried a request."""

    def _backoff_elapsed(self) -> None:
        """The wait after a failure is over and a call waits for a connection."""

    def _backoff_unneeded(self) -> None:
        """The wait after a failure is over and nobody waits."""


@dataclass
class _Core:
    connect: Callable[[], Deferred]
    clock: IReactorTime
    policy: RetryPolicy
    jitter: Callable[[], float]
    name: str
    waiters: List[Deferred] = field(default_factory=list)
    ready: List[tuple] = field(default_factory=list)
    failures: int = 0
    current: Optional[SmartClientProtocol] = None
    retire_at: Optional[float] = None
    log: Logger = field(default_factory=Logger)

    def wait(self) -> Deferred:
        waiter: Deferred = Deferred(lambda d: self.waiters.remove(d) if d in self.waiters else None)
        self.waiters.append(waiter)
        return waiter

    def release(self, result) -> None:
        # Waiters fire in flush(), once the transition is over, so that
        # their callbacks may call the machine's inputs again.
        waiters, self.waiters = self.waiters, []
        self.ready.extend((waiter, result) for waiter in waiters)

    def flush(self) -> None:
        while self.ready:
            waiter, result = self.ready.pop(0)
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


def _build():
    machine = TypeMachineBuilder(ConnectionSlot, _Core)

    def attempt(c: ConnectionSlot, s: _Core, *args) -> Deferred:
        attempt = s.connect()
        attempt.addTimeout(s.policy.connect_timeout, s.clock)
        attempt.addCallbacks(c._connection_made, c._connection_failed)
        attempt.addBoth(lambda _: s.flush())
        return attempt

    def remember(c: ConnectionSlot, s: _Core, protocol: SmartClientProtocol) -> SmartClientProtocol:
        s.current = protocol
        age = s.policy.max_connection_age
        s.retire_at = None if age is None else s.clock.seconds() + age * (1.0 - 0.1 * s.jitter())

        def lost(reason):
            if s.current is protocol:
                s.current = None
                if protocol.requests_sent:
                    c._connection_lost()
                else:
                    c._connection_refused()

        protocol.when_closed().addCallback(lost)
        return protocol

    def back_off(c: ConnectionSlot, s: _Core, *args) -> IDelayedCall:
        s.failures += 1
        delay = backoff_delay(s.failures, s.policy, s.jitter)
        s.log.info(
            "{slot}: {failures} failure(s) in a row; no new connection for {delay:.3f} s",
            slot=s.name,
            delay=delay,
            failures=s.failures,
        )

        def elapsed() -> None:
            if s.waiters:
                c._backoff_elapsed()
            else:
                c._backoff_unneeded()
            s.flush()

        return s.clock.callLater(delay, elapsed)

    Idle = machine.state("Idle")
    Connecting = machine.state("Connecting", attempt)
    Connected = machine.state("Connected", remember)
    Waiting = machine.state("Waiting", back_off)
    Stopped = machine.state("Stopped")

    Waiting.upon(ConnectionSlot._backoff_elapsed).to(Connecting).returns(None)
    Waiting.upon(ConnectionSlot._backoff_unneeded).to(Idle).returns(None)
    for state in (Idle, Waiting, Stopped):
        state.upon(ConnectionSlot.request_succeeded).loop().returns(None)
        state.upon(ConnectionSlot.request_failed).loop().returns(None)
        state.upon(ConnectionSlot.discard).loop().returns(None)
        state.upon(ConnectionSlot.retire).loop().returns(None)
        state.upon(ConnectionSlot._connection_lost).loop().returns(None)
    Connecting.upon(ConnectionSlot.request_succeeded).loop().returns(None)
    Connecting.upon(ConnectionSlot.request_failed).loop().returns(None)
    Connecting.upon(ConnectionSlot.discard).loop().returns(None)
    Connecting.upon(ConnectionSlot.retire).loop().returns(None)
    Connecting.upon(ConnectionSlot._connection_lost).loop().returns(None)
    Stopped.upon(ConnectionSlot.stop).loop().returns(None)
    Idle.upon(ConnectionSlot.stop).to(Stopped).returns(None)

    @pep614(Idle.upon(ConnectionSlot.connection).to(Connecting))
    @pep614(Connecting.upon(ConnectionSlot.connection, nodata=True).loop())
    @pep614(Waiting.upon(ConnectionSlot.connection, nodata=True).loop())
    def wait_for_connection(c: ConnectionSlot, s: _Core) -> Deferred:
        return s.wait()

    @pep614(Connected.upon(ConnectionSlot.connection).loop())
    def current_connection(c: ConnectionSlot, s: _Core, protocol: SmartClientProtocol) -> Deferred:
        return succeed(protocol)

    @pep614(Stopped.upon(ConnectionSlot.connection).loop())
    def no_connection(c: ConnectionSlot, s: _Core) -> Deferred:
        return fail(ClientClosed("the client is closed"))

    @pep614(Connecting.upon(ConnectionSlot._connection_made, nodata=True).to(Connected))
    def connected(c: ConnectionSlot, s: _Core, protocol: SmartClientProtocol) -> None:
        s.release(protocol)

    @pep614(Connecting.upon(ConnectionSlot._connection_failed, nodata=True).to(Waiting))
    def attempt_failed(c: ConnectionSlot, s: _Core, failure: Failure) -> None:
        s.log.info("{slot}: connection attempt failed: {reason}", slot=s.name, reason=failure.getErrorMessage())
        s.release(failure)

    @pep614(Connected.upon(ConnectionSlot.request_succeeded).loop())
    def succeeded(c: ConnectionSlot, s: _Core, protocol: SmartClientProtocol) -> None:
        s.failures = 0

    @pep614(Connected.upon(ConnectionSlot.request_failed).to(Waiting))
    @pep614(Connected.upon(ConnectionSlot.discard).to(Idle))
    def drop(c: ConnectionSlot, s: _Core, protocol: SmartClientProtocol, reason: str) -> None:
        s.current = None
        protocol.abort(reason)

    @pep614(Connected.upon(ConnectionSlot.retire).to(Idle))
    def retire(c: ConnectionSlot, s: _Core, protocol: SmartClientProtocol) -> None:
        s.current = None
        protocol.close()

    Connected.upon(ConnectionSlot._connection_lost).to(Idle).returns(None)
    Connected.upon(ConnectionSlot._connection_refused).to(Waiting).returns(None)
    for state in (Idle, Connecting, Waiting, Stopped):
        state.upon(ConnectionSlot._connection_refused).loop().returns(None)

    @pep614(Connecting.upon(ConnectionSlot.stop).to(Stopped))
    def stop_connecting(c: ConnectionSlot, s: _Core, attempt: Deferred) -> None:
        attempt.cancel()
        s.release(Failure(ClientClosed("the client is closed")))

    @pep614(Waiting.upon(ConnectionSlot.stop).to(Stopped))
    def stop_waiting(c: ConnectionSlot, s: _Core, timer: IDelayedCall) -> None:
        if timer.active():
            timer.cancel()
        s.release(Failure(ClientClosed("the client is closed")))

    @pep614(Connected.upon(ConnectionSlot.stop).to(Stopped))
    def stop_connected(c: ConnectionSlot, s: _Core, protocol: SmartClientProtocol) -> None:
        s.current = None
        protocol.close()

    @pep614(Stopped.upon(ConnectionSlot._connection_made).loop())
    def made_too_late(c: ConnectionSlot, s: _Core, protocol: SmartClientProtocol) -> None:
        protocol.close()

    Stopped.upon(ConnectionSlot._connection_failed).loop().returns(None)
    Stopped.upon(ConnectionSlot._backoff_elapsed).loop().returns(None)
    Stopped.upon(ConnectionSlot._backoff_unneeded).loop().returns(None)

    return machine.build()


_MACHINE = _build()


class _Slot:
    """The machine's public inputs (see ``ConnectionSlot``); waiters fire after each transition."""

    def __init__(self, machine: ConnectionSlot, core: _Core):
        self._machine = machine
        self._core = core

    def ready_connection(self) -> Optional[SmartClientProtocol]:
        """The current connection if the slot is Connected with no waiter to fire, else None.

        This is what ``connection()`` answers in that state, without the
        machine or a Deferred: Connected is the only state with a current
        connection, and the input changes nothing there.
        """
        core = self._core
        return None if core.ready else core.current

    def connection(self) -> Deferred[SmartClientProtocol]:
        protocol = self.ready_connection()
        if protocol is not None:
            return succeed(protocol)
        result = self._machine.connection()
        self._core.flush()
        return result

    def request_succeeded(self) -> None:
        if self._core.failures:
            # Otherwise a no-op in every state.
            self._machine.request_succeeded()

    def request_failed(self, reason: str) -> None:
        self._machine.request_failed(reason)

    def discard(self, reason: str) -> None:
        self._machine.discard(reason)

    def retire_if_old(self, now: float) -> bool:
        """Close the current connection if it has reached the policy's ``max_connection_age``; True if it did."""
        core = self._core
        if core.current is None or core.retire_at is None or now < core.retire_at:
            return False
        core.log.info(
            "{slot}: closing a connection open for max_connection_age ({age:g} s); the next call makes a new one",
            slot=core.name,
            age=core.policy.max_connection_age,
        )
        self._machine.retire()
        return True

    def stop(self) -> None:
        self._machine.stop()
        self._core.flush()

    @property
    def failures(self) -> int:
        """Failures in a row, which set the next backoff."""
        return self._core.failures


def make_slot(
    connect: Callable[[], Deferred],
    clock: IReactorTime,
    policy: RetryPolicy,
    jitter: Callable[[], float],
    name: str = "connection",
) -> "_Slot":
    """A new slot in state Idle that makes connections with ``connect()``."""
    core = _Core(connect, clock, policy, jitter, name)
    return _Slot(_MACHINE(core), core)

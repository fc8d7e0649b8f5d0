"""The drain controller: serving, then draining, then drained.

Theory of operation
-------------------
``drain()`` moves the server from SERVING to DRAINING. The health check
turns 503 at once, so a load balancer stops sending new connections; after
the grace delay the listeners stop accepting; every ``IDrainable`` is told
to drain, which closes idle connections at once and busy ones right after
the last byte of their current response. Once none is open the state is
DRAINED. If the deadline passes first, what is left is aborted and counted.

Transitions are data (``TRANSITIONS``); an input that a state does not list
changes nothing.
"""

from __future__ import annotations

import enum
import math
from typing import Callable, List, Optional

from twisted.internet import defer
from twisted.logger import Logger

from .interfaces import IDrainable

__all__ = ["DrainState", "DrainController", "OpenConnections", "TRANSITIONS", "check_timeout"]

log = Logger()


def check_timeout(timeout: float) -> float:
    """Return ``timeout`` if it can be a drain deadline: a finite number of seconds, 0 or more.

    Raises ``ValueError`` otherwise (a negative number, NaN, infinity).
    """
    if not (math.isfinite(timeout) and timeout >= 0):
        raise ValueError(f"the drain timeout must be a finite number of seconds, 0 or more, not {timeout!r}")
    return timeout


class OpenConnections:
    """The connections a factory has open, and the Deferreds waiting for none to be left."""

    def __init__(self):
        self._open: set = set()
        self._waiting: List[defer.Deferred] = []

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self):
        return iter(list(self._open))

    def __contains__(self, connection) -> bool:
        return connection in self._open

    def add(self, connection) -> None:
        """Count ``connection`` as open."""
        self._open.add(connection)

    def discard(self, connection) -> None:
        """Count ``connection`` as gone; fire the waiters if it was the last."""
        self._open.discard(connection)
        if not self._open and self._waiting:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def wait_empty(self) -> defer.Deferred:
        """A Deferred that fires once no connection is open."""
        if not self._open:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiting.append(d)
        return d


class DrainState(enum.Enum):
    """Where the server stands in its drain."""

    SERVING = "serving"
    DRAINING = "draining"
    DRAINED = "drained"


class _Input(enum.Enum):
    DRAIN = "drain"
    ALL_CLOSED = "all closed"
    DEADLINE = "deadline"


TRANSITIONS = {
    (DrainState.SERVING, _Input.DRAIN): DrainState.DRAINING,
    (DrainState.DRAINING, _Input.ALL_CLOSED): DrainState.DRAINED,
    (DrainState.DRAINING, _Input.DEADLINE): DrainState.DRAINED,
}


class DrainController:
    """Drains listeners and connections on request, within a deadline.

    ``stop_listening`` callables are run after the grace delay; each returns
    a Deferred (or None). ``drainables`` provide ``IDrainable``.
    """

    def __init__(self, clock, *, grace: float = 0.0, default_timeout: float = 600.0):
        self.clock = clock
        self.grace = grace
        self.default_timeout = default_timeout
        self.state = DrainState.SERVING
        self.aborted = 0
        self._stoppers: List[Callable[[], Optional[defer.Deferred]]] = []
        self._drainables: List[IDrainable] = []
        self._waiting: List[defer.Deferred] = []
        self._deadline_call = None
        self._drain_started: Optional[float] = None

    def add_listener_stopper(self, stop: Callable[[], Optional[defer.Deferred]]) -> None:
        """Register a callable that stops one listener accepting connections."""
        self._stoppers.append(stop)

    def add_drainable(self, drainable: IDrainable) -> None:
        """Register a set of connections to drain."""
        self._drainables.append(drainable)

    @property
    def open_connections(self) -> int:
        """Client connections open now, over every drainable, each counted once."""
        return sum(d.client_connections for d in self._drainables)

    @property
    def busy_connections(self) -> int:
        """Client connections running a request now."""
        return sum(d.busy_client_connections for d in self._drainables)

    def drain(self, timeout: Optional[float] = None) -> defer.Deferred:
        """Start draining (if not yet) and return a Deferred that fires once DRAINED.

        ``timeout`` is the seconds after which what is left gets aborted,
        the default timeout if None. A later call with a ``timeout`` may
        bring the deadline of a drain in progress forward; one without
        leaves it as it is. Raises ``ValueError``, before anything changes,
        if ``timeout`` is not a finite number of seconds, 0 or more.
        """
        explicit = timeout is not None
        timeout = check_timeout(timeout if explicit else self.default_timeout)
        d = defer.Deferred()
        if self.state is DrainState.DRAINED:
            d.callback(self.state)
            return d
        self._waiting.append(d)
        if self.state is DrainState.DRAINING:
            remaining = self._deadline_call.getTime() - self.clock.seconds()
            if explicit and timeout < remaining:
                self._deadline_call.reset(timeout)
            return d
        self._move(_Input.DRAIN)
        self._drain_started = self.clock.seconds()
        log.info(
            "Draining: {connections} connections open, {busy} busy, deadline {timeout} s",
            connections=self.open_connections,
            busy=self.busy_connections,
            timeout=timeout,
        )
        self._deadline_call = self.clock.callLater(timeout, self._deadline_passed)
        if self.grace > 0:
            self.clock.callLater(self.grace, self._close_doors)
        else:
            self._close_doors()
        return d

    def when_drained(self) -> defer.Deferred:
        """A Deferred that fires with the state once DRAINED, without starting a drain."""
        d = defer.Deferred()
        if self.state is DrainState.DRAINED:
            d.callback(self.state)
        else:
            self._waiting.append(d)
        return d

    def _close_doors(self) -> None:
        for stop in self._stoppers:
            d = defer.maybeDeferred(stop)
            d.addErrback(lambda failure: log.failure("Stopping a listener", failure))
        for drainable in self._drainables:
            drainable.drain()
        closed = [drainable.wait_closed() for drainable in self._drainables]
        defer.gatherResults(closed).addCallback(lambda _: self._all_closed())

    def _all_closed(self) -> None:
        if self.state is DrainState.DRAINING:
            self._move(_Input.ALL_CLOSED)
            self._finish(_Input.ALL_CLOSED)

    def _deadline_passed(self) -> None:
        self._deadline_call = None
        if self.state is not DrainState.DRAINING:
            return
        # Move first: an abort may close every connection at once, and that
        # must not count as the drain completing on its own.
        self._move(_Input.DEADLINE)
        self.aborted = sum(drainable.abort() for drainable in self._drainables)
        log.warn("Drain deadline passed: aborted {aborted} connections", aborted=self.aborted)
        self._finish(_Input.DEADLINE)

    def _finish(self, reason: _Input) -> None:
        if self._deadline_call is not None and self._deadline_call.active():
            self._deadline_call.cancel()
        self._deadline_call = None
        log.info(
            "Drained in {seconds:.3f} s ({reason}); {aborted} aborted",
            seconds=self.clock.seconds() - self._drain_started,
            reason=reason.value,
            aborted=self.aborted,
        )
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(self.state)

    def _move(self, event: _Input) -> None:
        self.state = TRANSITIONS[(self.state, event)]

"""The drain controller, driven by a fake clock and fake drainables: no reactor."""

from __future__ import annotations

from typing import List

import pytest

from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smartserve.server.drain import DrainController, DrainState
from smartserve.server.interfaces import IDrainable


@implementer(IDrainable)
class FakeDrainable:
    """A set of connections: ``idle`` close on drain, ``busy`` close on ``finish_one``."""

    def __init__(self, idle: int = 0, busy: int = 0):
        self.idle = idle
        self.busy = busy
        self.drained = False
        self.aborted = 0
        self._closed: List[defer.Deferred] = []

    @property
    def client_connections(self) -> int:
        return self.idle + self.busy

    @property
    def busy_client_connections(self) -> int:
        return self.busy

    def drain(self) -> None:
        self.drained = True
        self.idle = 0
        self._check()

    def wait_closed(self) -> defer.Deferred:
        d = defer.Deferred()
        self._closed.append(d)
        self._check()
        return d

    def abort(self) -> int:
        count = self.client_connections
        self.aborted += count
        self.idle = self.busy = 0
        self._check()
        return count

    def finish_one(self) -> None:
        """One busy connection ends its response and closes."""
        self.busy -= 1
        self._check()

    def _check(self) -> None:
        if self.drained and not self.client_connections:
            closed, self._closed = self._closed, []
            for d in closed:
                d.callback(None)


class FakeListener:
    """Counts how often it was told to stop accepting."""

    def __init__(self):
        self.stopped = 0

    def stop(self) -> None:
        self.stopped += 1


def results(d: defer.Deferred) -> list:
    """Collect what ``d`` fires with into a list, to look at synchronously."""
    fired = []
    d.addBoth(fired.append)
    return fired


def test_fake_drainable_provides_idrainable():
    """The fake used below implements the whole IDrainable interface."""
    assert verifyObject(IDrainable, FakeDrainable())


def test_controller_starts_serving():
    """A new controller is SERVING, with nothing aborted."""
    controller = DrainController(Clock())
    assert controller.state is DrainState.SERVING
    assert controller.aborted == 0


def test_controller_idle_drains_at_once():
    """With only idle connections, drain() goes through DRAINING to DRAINED at once."""
    clock = Clock()
    controller = DrainController(clock)
    drainable = FakeDrainable(idle=3)
    listener = FakeListener()
    controller.add_drainable(drainable)
    controller.add_listener_stopper(listener.stop)
    fired = results(controller.drain())
    assert fired == [DrainState.DRAINED]
    assert controller.state is DrainState.DRAINED
    assert listener.stopped == 1
    assert not clock.getDelayedCalls()


def test_controller_busy_waits_for_last_connection():
    """DRAINED comes only once the last busy connection has closed."""
    controller = DrainController(Clock())
    drainable = FakeDrainable(idle=1, busy=2)
    controller.add_drainable(drainable)
    fired = results(controller.drain())
    assert controller.state is DrainState.DRAINING
    assert (controller.open_connections, controller.busy_connections) == (2, 2)
    drainable.finish_one()
    assert fired == []
    drainable.finish_one()
    assert fired == [DrainState.DRAINED]
    assert controller.aborted == 0


def test_controller_grace_delays_listeners():
    """Listeners stop and connections are drained only after the grace delay."""
    clock = Clock()
    controller = DrainController(clock, grace=2.0)
    drainable = FakeDrainable(idle=1)
    listener = FakeListener()
    controller.add_drainable(drainable)
    controller.add_listener_stopper(listener.stop)
    fired = results(controller.drain())
    assert controller.state is DrainState.DRAINING
    clock.advance(1.9)
    assert (listener.stopped, drainable.drained) == (0, False)
    clock.advance(0.1)
    assert (listener.stopped, drainable.drained) == (1, True)
    assert fired == [DrainState.DRAINED]


def test_controller_deadline_aborts_and_counts():
    """At the deadline what is left is aborted, counted, and the state is DRAINED."""
    clock = Clock()
    controller = DrainController(clock, default_timeout=10.0)
    first, second = FakeDrainable(busy=2), FakeDrainable(busy=1, idle=4)
    controller.add_drainable(first)
    controller.add_drainable(second)
    fired = results(controller.drain())
    clock.advance(9.9)
    assert fired == []
    clock.advance(0.1)
    assert fired == [DrainState.DRAINED]
    assert controller.aborted == 3
    assert (first.aborted, second.aborted) == (2, 1)


def test_controller_explicit_timeout_overrides_default():
    """drain(timeout) uses that deadline instead of the default one."""
    clock = Clock()
    controller = DrainController(clock, default_timeout=600.0)
    controller.add_drainable(FakeDrainable(busy=1))
    fired = results(controller.drain(timeout=5.0))
    clock.advance(5.0)
    assert fired == [DrainState.DRAINED]
    assert controller.aborted == 1


def test_controller_second_drain_shortens_deadline():
    """A second drain() with a shorter timeout brings the deadline forward; both Deferreds fire."""
    clock = Clock()
    controller = DrainController(clock)
    controller.add_drainable(FakeDrainable(busy=1))
    first = results(controller.drain(timeout=100.0))
    clock.advance(10.0)
    second = results(controller.drain(timeout=5.0))
    clock.advance(4.9)
    assert controller.state is DrainState.DRAINING
    clock.advance(0.1)
    assert first == second == [DrainState.DRAINED]
    assert controller.aborted == 1


def test_controller_second_drain_never_extends_deadline():
    """A second drain() with a longer timeout leaves the earlier deadline in place."""
    clock = Clock()
    controller = DrainController(clock)
    controller.add_drainable(FakeDrainable(busy=1))
    fired = results(controller.drain(timeout=5.0))
    controller.drain(timeout=100.0)
    clock.advance(5.0)
    assert fired == [DrainState.DRAINED]


def test_controller_second_drain_without_timeout_keeps_deadline():
    """A second drain() without a timeout (SIGHUP, SIGTERM) joins the drain and leaves its deadline alone."""
    clock = Clock()
    controller = DrainController(clock, default_timeout=10.0)
    controller.add_drainable(FakeDrainable(busy=1))
    fired = results(controller.drain(timeout=100.0))
    clock.advance(50.0)
    again = results(controller.drain())
    clock.advance(49.9)
    assert controller.state is DrainState.DRAINING
    clock.advance(0.1)
    assert fired == again == [DrainState.DRAINED]


def test_controller_drain_when_drained_fires_at_once():
    """drain() after DRAINED fires at once and stops nothing twice."""
    controller = DrainController(Clock())
    listener = FakeListener()
    controller.add_listener_stopper(listener.stop)
    controller.drain()
    assert results(controller.drain()) == [DrainState.DRAINED]
    assert listener.stopped == 1


def test_controller_when_drained_does_not_start_a_drain():
    """when_drained() waits for a drain someone else starts, without starting one."""
    controller = DrainController(Clock())
    drainable = FakeDrainable(idle=1)
    controller.add_drainable(drainable)
    fired = results(controller.when_drained())
    assert controller.state is DrainState.SERVING
    assert not drainable.drained
    controller.drain()
    assert fired == [DrainState.DRAINED]
    assert results(controller.when_drained()) == [DrainState.DRAINED]


def test_controller_finished_drain_cancels_deadline():
    """Once every connection closed, the deadline timer is gone and aborts nothing later."""
    clock = Clock()
    controller = DrainController(clock, default_timeout=10.0)
    drainable = FakeDrainable(busy=1)
    controller.add_drainable(drainable)
    controller.drain()
    drainable.finish_one()
    assert not clock.getDelayedCalls()
    clock.advance(20.0)
    assert controller.aborted == 0


def test_controller_listener_failure_does_not_stop_drain():
    """A listener that fails to stop is logged, and the drain still completes."""
    controller = DrainController(Clock())
    controller.add_drainable(FakeDrainable(idle=1))

    def broken():
        raise OSError("cannot close")

    controller.add_listener_stopper(broken)
    assert results(controller.drain()) == [DrainState.DRAINED]


@pytest.mark.parametrize("timeout", [-1.0, float("nan"), float("inf")])
def test_controller_bad_timeout_raises_and_changes_nothing(timeout):
    """drain() with a negative, NaN or infinite timeout raises ValueError and leaves the server serving; a later drain works."""
    clock = Clock()
    controller = DrainController(clock, default_timeout=10.0)
    drainable = FakeDrainable(busy=1)
    controller.add_drainable(drainable)
    with pytest.raises(ValueError, match="finite number of seconds, 0 or more"):
        controller.drain(timeout=timeout)
    assert controller.state is DrainState.SERVING
    assert not drainable.drained and not clock.getDelayedCalls()
    fired = results(controller.drain())
    clock.advance(10.0)
    assert fired == [DrainState.DRAINED]
    assert controller.aborted == 1

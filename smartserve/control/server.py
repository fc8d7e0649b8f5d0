"""The server side of the control socket: a UNIX socket speaking AMP.

A hand-over (``TakeOver``) ends in one of two ways. The process taking
over sends ``Drain`` once it serves on the listening sockets: this process
drains and exits. Or its connection is lost before that (it failed to
start, could not listen on a port of its own, was killed): this process
takes the sockets back, accepts on them again and listens on the control
socket again, as if nothing had been asked.
"""

from __future__ import annotations

import os
import socket
from typing import List, Optional

from twisted.internet import defer, task
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from ..listeners import ListenerGroup
from ..server.drain import DrainController, DrainState, check_timeout
from .._quiet import QuietFactory
from .commands import (
    BadArguments, BadTimeout, Drain, ListenerDescriptor, NotServing, QuietAMP, Status, TakeOver, WaitDrained,
)

__all__ = ["Control", "ControlProtocol", "ControlFactory"]

log = Logger()

# Seconds a control connection has, once closed for the exit, to take the
# answers still written to it; one that does not read is then cut off.
CLOSE_TIMEOUT = 2.0
# Seconds a control connection may wait between commands; the commands
# themselves (a drain, a hand-over) may take as long as they take.
IDLE_TIMEOUT = 10.0
# How often, and how far apart in seconds, a process taking its sockets back
# looks whether another one still answers on the control socket.
TAKE_BACK_PROBES = 20
TAKE_BACK_PROBE_INTERVAL = 0.1


class Control:
    """The running server as the control socket sees it."""

    def __init__(self, controller: DrainController, listeners: ListenerGroup, factories: List):
        self.controller = controller
        self.listeners = listeners
        self.factories = factories
        self.handed_over = False
        self.socket_listener = None  # the control socket's own Listener, once listening
        self.socket_path: Optional[str] = None  # and its path
        self._socket_released: Optional[defer.Deferred] = None

    def status(self) -> dict:
        """The answer to ``Status``."""
        requests = {}
        for factory in self.factories:
            for verb_class, count in factory.requests_by_class.items():
                requests[verb_class] = requests.get(verb_class, 0) + count
        return {
            "pid": os.getpid(),
            "state": self.controller.state.value,
            "connections": self.controller.open_connections,
            "busy": self.controller.busy_connections,
            "aborted": self.controller.aborted,
            "requests": [{"verb_class": k, "count": v} for k, v in sorted(requests.items())],
        }

    def drain(self, timeout=None) -> defer.Deferred:
        """Start draining; fires once drained."""
        return self.controller.drain(timeout)

    def handover(self) -> list:
        """``(name, descriptor, family)`` of every listener, for a process taking over."""
        if self.controller.state is not DrainState.SERVING:
            raise NotServing("the server is draining and no longer hands over its listeners")
        if self.handed_over:
            raise NotServing("the listeners are being handed over to another process already")
        self.handed_over = True
        return self.listeners.handover()

    def release_socket(self) -> defer.Deferred:
        """Stop listening on the control socket path, so the new process can bind it.

        Connections already open, such as the one of the process taking
        over, stay open. Fires once the path is gone.
        """
        if self.socket_listener is None:
            return defer.succeed(None)
        stopping = self.socket_listener.stop_listening()
        self._socket_released = _when_fired(stopping)
        return stopping

    def take_back(self) -> defer.Deferred:
        """Serve on alone: the process taking over went away before it asked this one to drain.

        Accepts again on every listener handed over, and listens on the
        control socket again once its release has finished, unless another
        process answers there. Fires once done.
        """
        self.handed_over = False
        names = self.listeners.take_back()
        log.warn(
            "The process taking over went away before it asked this one to drain: "
            "accepting again on {names} and listening on the control socket again",
            names=names,
        )
        released, self._socket_released = self._socket_released or defer.succeed(None), None
        return released.addCallback(lambda _: self._listen_on_socket_again())

    def _listen_on_socket_again(self, tries: int = TAKE_BACK_PROBES) -> Optional[defer.Deferred]:
        listener, path = self.socket_listener, self.socket_path
        if listener is None or listener.port is not None or self.controller.state is DrainState.DRAINED:
            return None
        if os.path.exists(path):
            if _answers(path):
                if tries > 1:
                    # The process that went away may still be closing its own
                    # control socket: it answers for a moment after its
                    # connection here is gone.
                    return task.deferLater(
                        self.controller.clock, TAKE_BACK_PROBE_INTERVAL, self._listen_on_socket_again, tries - 1
                    )
                log.warn(
                    "Another process answers on the control socket {path}; this one serves without it "
                    "(SIGTERM drains it)",
                    path=path,
                )
                return None
            os.unlink(path)  # left behind by the process that went away
        return listener.listen().addErrback(
            lambda failure: log.failure("Could not listen on the control socket {path} again", failure, path=path)
        )


def _when_fired(d: defer.Deferred) -> defer.Deferred:
    """A new Deferred that fires with None once ``d`` has fired, leaving ``d``'s own result alone."""
    fired = defer.Deferred()

    def note(result):
        fired.callback(None)
        return result

    d.addBoth(note)
    return fired


def _answers(path: str) -> bool:
    """True if a process accepts connections on the UNIX socket ``path``, not a file left by one that is gone."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except BlockingIOError:
            return True  # listening, with a full accept queue
        except OSError:
            return False
        return True


def _command_name(box) -> str:
    """The command a box names, printable whatever bytes a client sent."""
    return box.get(amp.COMMAND, b"").decode("ascii", "backslashreplace")[:100]


@implementer(IPushProducer)
class ControlProtocol(QuietAMP, TimeoutMixin):
    """Answers the control commands for one connection to the control socket.

    A connection that sends no whole command for the factory's
    ``idle_timeout`` seconds, while none of its commands or hand-over is
    under way, is closed (and cut ``close_timeout`` seconds later if it does
    not take its answers); one that does not read its answers is not read
    from either, so its unsent answers cannot fill the server's memory.
    """

    def __init__(self, control: Control):
        super().__init__()
        self.control = control
        self._handover = None
        self._handover_finished = False  # the process taking over asked this one to drain
        self._commands = 0  # commands received and not yet answered
        self._abort_call = None
        self._lost = False

    def dispatchCommand(self, box):
        self._commands += 1
        self.setTimeout(None)
        return super().dispatchCommand(box).addErrback(self._refused, box).addBoth(self._answered)

    def _refused(self, failure, box):
        if failure.check(BadArguments):
            error = failure.value.description
        elif failure.check(amp.RemoteAmpError) and failure.value.errorCode == amp.UNHANDLED_ERROR_CODE:
            error = f"unknown command {_command_name(box)}"
        else:
            return failure
        log.warn("Refused a control command: {error}", error=error)
        # A command that asks for no answer has no one to tell.
        return failure if amp.ASK in box else None

    def _answered(self, result):
        self._commands -= 1
        self._wait_for_next_command()
        return result

    def _wait_for_next_command(self) -> None:
        handing_over = self._handover is not None and not self._handover_finished
        if not self._commands and not handing_over and not self._lost:
            self.setTimeout(self.factory.idle_timeout)

    def timeoutConnection(self) -> None:
        log.info(
            "Closing a control connection that sent no command for {timeout} s", timeout=self.factory.idle_timeout
        )
        self.transport.loseConnection()
        self._abort_call = self.callLater(self.factory.close_timeout, self.transport.abortConnection)

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass

    @Status.responder
    def status(self):
        return self.control.status()

    @Drain.responder
    def drain(self, timeout=None):
        if timeout is not None:
            try:
                check_timeout(timeout)
            except ValueError as exc:
                log.warn("Refused a drain requested on the control socket: {error}", error=str(exc))
                raise BadTimeout(str(exc)) from None
        log.info("Drain requested on the control socket (timeout {timeout})", timeout=timeout)
        self.control.drain(timeout)
        if self._handover is not None:
            self._handover_finished = True
        return {"state": self.control.controller.state.value}

    @WaitDrained.responder
    def wait_drained(self):
        controller = self.control.controller
        return controller.when_drained().addCallback(
            lambda state: {"state": state.value, "aborted": controller.aborted}
        )

    @TakeOver.responder
    def take_over(self):
        handover = self._handover = self.control.handover()
        log.info("Handing listeners {names} over to another process", names=[name for name, _, _ in handover])
        answer = {
            "names": [name for name, _, _ in handover],
            "families": [family for _, _, family in handover],
        }
        return self.control.release_socket().addCallback(lambda _: answer)

    @ListenerDescriptor.responder
    def listener_descriptor(self, index):
        if self._handover is None or not 0 <= index < len(self._handover):
            raise NotServing("no such listener: send TakeOver first")
        return {"descriptor": self._handover[index][1]}

    def connectionMade(self):
        super().connectionMade()
        self.factory.connections.add(self)
        self.callLater = self.factory.clock.callLater
        self.transport.registerProducer(self, True)
        self._wait_for_next_command()

    def connectionLost(self, reason):
        self._lost = True
        self.setTimeout(None)
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        super().connectionLost(reason)
        if self._handover is not None and not self._handover_finished:
            self.control.take_back()
        self.factory.connection_lost(self)


class ControlFactory(QuietFactory):
    """Builds a ``ControlProtocol`` per connection to the control socket."""

    def __init__(
        self, control: Control, clock=None, close_timeout: float = CLOSE_TIMEOUT, idle_timeout: float = IDLE_TIMEOUT
    ):
        if clock is None:
            from twisted.internet import reactor as clock
        self.control = control
        self.clock = clock
        self.close_timeout = close_timeout
        self.idle_timeout = idle_timeout
        self.connections: set = set()
        self.all_closed: list = []
        self._abort_call = None

    def buildProtocol(self, addr):
        protocol = ControlProtocol(self.control)
        protocol.factory = self
        return protocol

    def connection_lost(self, protocol: ControlProtocol) -> None:
        """Called by a protocol once its connection is gone; fires the waiters if it was the last."""
        self.connections.discard(protocol)
        if self.connections:
            return
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        waiting, self.all_closed = self.all_closed, []
        for d in waiting:
            d.callback(None)

    def close_connections(self) -> defer.Deferred:
        """Close every control connection once its answers are written; fires when all are gone.

        A connection whose client has not taken its answers within
        ``close_timeout`` seconds is aborted: a client that never reads
        must not keep a drained process alive.
        """
        if not self.connections:
            return defer.succeed(None)
        d = defer.Deferred()
        self.all_closed.append(d)
        for protocol in list(self.connections):
            protocol.transport.loseConnection()
        if self._abort_call is None:
            self._abort_call = self.clock.callLater(self.close_timeout, self._abort_unclosed)
        return d

    def _abort_unclosed(self) -> None:
        self._abort_call = None
        left = list(self.connections)
        log.warn(
            "Aborting {count} control connections that did not take their answers within {timeout} s",
            count=len(left),
            timeout=self.close_timeout,
        )
        for protocol in left:
            protocol.transport.abortConnection()

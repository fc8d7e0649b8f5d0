"""The client side of the control socket, used by ``smartserve drain`` and ``--takeover``."""

from __future__ import annotations

import os
import stat
from typing import Dict, Optional, Tuple

from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint

from .._quiet import connect_quietly
from .commands import Drain, ListenerDescriptor, QuietAMP, Status, TakeOver, WaitDrained

__all__ = ["connect", "status", "drain", "wait_drained", "take_over", "ControlClient", "NoServer", "NoAnswer", "NotAControlSocket"]


class NoServer(Exception):
    """No server answers on the control socket."""


class NoAnswer(NoServer):
    """A server accepted the connection but did not answer in time: its process is stopped or stuck."""


class NotAControlSocket(NoServer):
    """What answers on the path is not a smartserve control socket (another program's socket, or no socket)."""


class ControlClient(QuietAMP):
    """The client end of a control connection: AMP, with a bound on the wait for some answers.

    ``ask`` fails with ``NoAnswer`` when the answer takes longer than
    ``answer_timeout`` seconds (None: no bound). A listening UNIX socket
    accepts connections in the kernel even when its process is stopped,
    so without that bound a stopped server would be waited on for good.
    """

    def __init__(self, clock, path: str, answer_timeout: Optional[float] = None):
        super().__init__()
        self.clock = clock
        self.path = path
        self.answer_timeout = answer_timeout

    def ask(self, command, **arguments) -> defer.Deferred:
        """``callRemote(command, **arguments)``, bounded by ``answer_timeout``."""
        d = self.callRemote(command, **arguments).addErrback(self._not_smartserve)
        if self.answer_timeout is None:
            return d

        def no_answer(result, timeout):
            raise NoAnswer(f"no answer from the server on {self.path} within {timeout:g} s")

        return d.addTimeout(self.answer_timeout, self.clock, onTimeoutCancel=no_answer)

    def _not_smartserve(self, failure):
        """A call that failed other than by a timeout: the peer does not speak the control protocol."""
        if failure.check(defer.CancelledError, NoServer):
            return failure
        raise NotAControlSocket(
            f"what answers on {self.path} is not a smartserve control socket ({failure.getErrorMessage() or failure.type.__name__})"
        )


async def connect(reactor, path: str, timeout: float = 5.0, answer_timeout: Optional[float] = None) -> ControlClient:
    """Connect to the control socket at ``path``; raises ``NoServer`` if nothing answers.

    ``answer_timeout`` bounds the wait for the answers to ``status`` and
    ``drain`` on this connection (``NoAnswer``); ``timeout`` the wait for
    the connection itself.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        pass  # connecting says why
    else:
        if not stat.S_ISSOCK(mode):
            raise NotAControlSocket(f"{path} is not a socket")
    endpoint = UNIXClientEndpoint(reactor, path, timeout=timeout)
    try:
        return await connect_quietly(endpoint, ControlClient(reactor, path, answer_timeout))
    except Exception as exc:
        raise NoServer(f"no server answers on {path}: {exc}") from exc


async def status(protocol: ControlClient) -> dict:
    """The server's ``Status`` answer; raises ``NoAnswer`` if it does not come in time."""
    return await protocol.ask(Status)


async def drain(protocol: ControlClient, timeout: float | None = None) -> str:
    """Ask the server to drain; returns its state right after. Raises ``NoAnswer`` if it does not answer in time."""
    kwargs = {} if timeout is None else {"timeout": timeout}
    answer = await protocol.ask(Drain, **kwargs)
    return answer["state"]


async def wait_drained(protocol: ControlClient) -> dict:
    """Wait until the server is drained, however long that takes: ``{"state": ..., "aborted": N}``."""
    return await protocol.callRemote(WaitDrained)


async def take_over(protocol: ControlClient) -> Dict[str, Tuple[int, int]]:
    """Receive every listening socket of the server: ``{name: (descriptor, family)}``."""
    answer = await protocol.callRemote(TakeOver)
    received = {}
    for index, (name, family) in enumerate(zip(answer["names"], answer["families"])):
        reply = await protocol.callRemote(ListenerDescriptor, index=index)
        received[name] = (reply["descriptor"], family)
    return received

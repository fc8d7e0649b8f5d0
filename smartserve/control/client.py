"""The client side of the control socket, used by ``smartserve drain`` and ``--takeover``."""

from __future__ import annotations

from typing import Dict, Tuple

from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.protocols import amp

from .commands import Drain, ListenerDescriptor, Status, TakeOver, WaitDrained

__all__ = ["connect", "status", "drain", "wait_drained", "take_over", "NoServer"]


class NoServer(Exception):
    """No server answers on the control socket."""


async def connect(reactor, path: str, timeout: float = 5.0) -> amp.AMP:
    """Connect to the control socket at ``path``; raises ``NoServer`` if nothing answers."""
    endpoint = UNIXClientEndpoint(reactor, path, timeout=timeout)
    try:
        return await connectProtocol(endpoint, amp.AMP())
    except Exception as exc:
        raise NoServer(f"no server answers on {path}: {exc}") from exc


async def status(protocol: amp.AMP) -> dict:
    """The server's ``Status`` answer."""
    return await protocol.callRemote(Status)


async def drain(protocol: amp.AMP, timeout: float | None = None) -> str:
    """Ask the server to drain; returns its state right after."""
    kwargs = {} if timeout is None else {"timeout": timeout}
    answer = await protocol.callRemote(Drain, **kwargs)
    return answer["state"]


async def wait_drained(protocol: amp.AMP) -> dict:
    """Wait until the server is drained: ``{"state": ..., "aborted": N}``."""
    return await protocol.callRemote(WaitDrained)


async def take_over(protocol: amp.AMP) -> Dict[str, Tuple[int, int]]:
    """Receive every listening socket of the server: ``{name: (descriptor, family)}``."""
    answer = await protocol.callRemote(TakeOver)
    received = {}
    for index, (name, family) in enumerate(zip(answer["names"], answer["families"])):
        reply = await protocol.callRemote(ListenerDescriptor, index=index)
        received[name] = (reply["descriptor"], family)
    return received

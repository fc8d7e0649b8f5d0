"""Sending written bytes at once instead of on the reactor's next turn.

A Twisted TCP transport only buffers what it is given and sends it on the
next reactor iteration (twisted/twisted#5303), after registering the socket
for writing and before unregistering it: for a program that answers one
small request at a time that is a loop turn and two ``epoll_ctl`` calls on
every round trip. Both ends of smartserve send small messages straight to
the socket while the transport holds nothing unsent, which keeps the bytes
in order, and leave everything else to the transport.
"""

from __future__ import annotations

import socket
from typing import Optional

from twisted.internet import tcp

__all__ = ["direct_socket", "write_now", "send_now"]


def direct_socket(transport) -> Optional[socket.socket]:
    """The socket of a plain TCP transport, which bytes may be sent on directly; else None.

    Wrappers such as TLS change the bytes they are given, so only Twisted's
    own TCP connections qualify.
    """
    if not isinstance(transport, tcp.Connection):
        return None
    try:
        handle = transport.getHandle()
    except (AttributeError, OSError):
        return None
    return handle if isinstance(handle, socket.socket) else None


def _holds_nothing(transport) -> bool:
    """True while ``transport`` (a ``tcp.Connection``) has no unsent bytes and is not closing."""
    return (
        transport.connected
        and not transport.disconnecting
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
    )


def write_now(transport, sock: Optional[socket.socket], data: bytes) -> None:
    """Write ``data`` to ``transport``, first sending on ``sock`` (from ``direct_socket``) what it takes now.

    With no ``sock``, or while the transport still holds unsent bytes, this
    is the transport's own ``write``. Whatever the socket does not take,
    and any error it raises, goes to the transport, which reports errors as
    it always does.
    """
    if sock is not None and _holds_nothing(transport):
        try:
            sent = sock.send(data)
        except OSError:
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def send_now(transport) -> None:
    """Hand what was written to ``transport`` to its socket now rather than on the next turn.

    A TCP transport's ``doWrite`` sends what the socket takes and leaves the
    rest, and any error, to the reactor as usual. A transport of our own (an
    SSH channel) may offer ``send_now`` instead; any other keeps its own
    scheduling.
    """
    own = getattr(transport, "send_now", None)
    if own is not None:
        own()
        return
    do_write = getattr(transport, "doWrite", None)
    if do_write is not None and not transport.disconnecting:
        do_write()

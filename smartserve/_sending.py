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
from twisted.protocols.policies import ProtocolWrapper

__all__ = ["direct_socket", "write_now", "send_now", "SendingAtOnce", "sending_at_once"]


def direct_socket(transport) -> Optional[socket.socket]:
    """The socket under a TCP transport, which bytes may be sent on directly; else None.

    Twisted's own TCP connections qualify, and so do protocol wrappers
    that pass writes through unchanged, such as the one that reads a PROXY
    header for ``haproxy:`` endpoints; wrappers that change the bytes they
    are given, such as TLS, do not.
    """
    while isinstance(transport, ProtocolWrapper) and type(transport).write is ProtocolWrapper.write:
        transport = transport.transport
    if not isinstance(transport, tcp.Connection):
        return None
    try:
        handle = transport.getHandle()
    except (AttributeError, OSError):
        return None
    return handle if isinstance(handle, socket.socket) else None


def _holds_nothing(transport) -> bool:
    """True while ``transport`` (one ``direct_socket`` accepts) has no unsent bytes and is not closing."""
    return transport.connected and not transport.disconnecting and _sent_all(transport)


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


class SendingAtOnce:
    """A TCP transport whose every write is sent at once while it holds nothing unsent.

    For a protocol that writes through code it does not own, such as
    Conch's SSH transport writing one packet at a time: the protocol is
    given this instead of the TCP transport, and everything but writing
    is the TCP transport's own.
    """

    def __init__(self, transport, sock: socket.socket):
        self.__dict__["_transport"] = transport
        self.__dict__["_socket"] = sock

    def write(self, data: bytes) -> None:
        if data:
            write_now(self._transport, self._socket, data)

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def send_now(self) -> None:
        """Nothing to do: every write was sent as far as the socket took it."""

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._transport, name, value)


def sending_at_once(transport):
    """``transport`` wrapped in ``SendingAtOnce`` if ``direct_socket`` finds its socket, else ``transport`` itself."""
    sock = direct_socket(transport)
    return transport if sock is None else SendingAtOnce(transport, sock)


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
    if do_write is not None and not transport.disconnecting and not _sent_all(transport):
        do_write()


def _sent_all(transport) -> bool:
    """True when a TCP transport holds nothing unsent; False when it may, or cannot tell."""
    try:
        return not transport._tempDataLen and transport.offset == len(transport.dataBuffer)
    except (AttributeError, TypeError):
        return False

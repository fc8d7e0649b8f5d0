"""The server's listening sockets, which can be handed to another process.

Each ``Listener`` listens on a Twisted endpoint description, or adopts a
socket received from the process it replaces. A ``haproxy:`` description
keeps its PROXY-protocol wrapping when adopted, so the real client address
is still what the logs show.
"""

from __future__ import annotations

import os
import socket
from typing import Dict, List, Optional

from twisted.internet import defer, endpoints, tcp, unix
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols.haproxy import proxyEndpoint
from zope.interface import implementer

__all__ = ["ListenError", "Listener", "ListenerGroup", "SocketPathListener"]

log = Logger()


@implementer(IStreamServerEndpoint)
class _AdoptedEndpoint:
    """An endpoint that listens on an already-bound socket received from elsewhere."""

    def __init__(self, reactor, descriptor: int, family: int):
        self._reactor = reactor
        self._descriptor = descriptor
        self._family = family

    def listen(self, factory):
        try:
            port = self._reactor.adoptStreamPort(self._descriptor, self._family, factory)
        finally:
            os.close(self._descriptor)
        return defer.succeed(port)


def _family_of(port) -> int:
    host = port.getHost()
    if isinstance(host, IPv6Address):
        return socket.AF_INET6
    if isinstance(host, IPv4Address):
        return socket.AF_INET
    if isinstance(host, UNIXAddress):
        return socket.AF_UNIX
    raise ValueError(f"cannot hand over a listener on {host!r}")


class ListenError(Exception):
    """A listener's endpoint description is wrong, or it cannot listen on it; the message names the listener."""


class Listener:
    """One named listening socket serving ``factory``."""

    def __init__(self, name: str, description: str, factory, reactor, *, stops_on_drain: bool = True):
        self.name = name
        self.description = description
        self.factory = factory
        self.stops_on_drain = stops_on_drain
        self._reactor = reactor
        self.port = None
        self._handed_over = False

    def listen(self, adopt: Optional[tuple] = None) -> defer.Deferred:
        """Start listening; ``adopt`` is ``(descriptor, family)`` of a socket to take over."""
        if adopt is None:
            try:
                endpoint = self._endpoint()
            except Exception as exc:
                return defer.fail(self._error(exc))
        else:
            endpoint = _AdoptedEndpoint(self._reactor, *adopt)
            if self.description.startswith("haproxy:"):
                endpoint = proxyEndpoint(endpoint)
        d = endpoint.listen(self.factory)

        def listening(port):
            self.port = port
            log.info(
                "{name} listening on {address}{adopted}",
                name=self.name,
                address=port.getHost(),
                adopted=" (taken over)" if adopt else "",
            )
            return port

        def failed(failure):
            raise self._error(failure.value)

        return d.addCallbacks(listening, failed)

    def _error(self, exc: Exception) -> ListenError:
        """``exc``, from parsing or listening on this listener's endpoint, as a one-line error naming it."""
        if isinstance(exc, ListenError):
            return exc
        error = ListenError(f"{self.name} endpoint {self.description!r}: {exc}")
        error.__cause__ = exc
        return error

    def _endpoint(self):
        try:
            return endpoints.serverFromString(self._reactor, self.description)
        except (IndexError, KeyError) as exc:
            if "systemd:" not in self.description:
                raise
            # Twisted looks the socket up in what systemd passed, and finds nothing.
            raise ListenError(
                f"{self.name} endpoint {self.description!r}: no such socket inherited from systemd "
                "(it sets LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID for the process it starts)"
            ) from exc

    def stop_listening(self) -> defer.Deferred:
        """Stop accepting connections; those already accepted are untouched."""
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)

    def handover(self) -> tuple:
        """``(descriptor, family)`` of the listening socket, for another process.

        From now on this process accepts no more connections on it, so that
        none is accepted here only to be closed by the drain that follows;
        stopping this listener only closes our descriptor: the socket stays
        open and listening in the process it was handed to.
        """
        family = _family_of(self.port)
        # Twisted shuts a listening socket down before closing it, which
        # would stop it in every process that holds it.
        self.port._shouldShutdown = False
        self.port.stopReading()
        self._handed_over = True
        return self.port.fileno(), family

    def take_back(self) -> bool:
        """Accept connections again on a socket handed over to a process that went away; True if it was handed over.

        The socket never closed: connections made meanwhile wait in its
        accept queue and are accepted now.
        """
        if self.port is None or not self._handed_over:
            return False
        self._handed_over = False
        self.port.startReading()
        return True


def _identity(path) -> Optional[tuple]:
    """``(device, inode)`` of what is at ``path`` now, or None if nothing is."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


class _OwnPathPort(unix.Port):
    """A UNIX listening port that, as it closes, removes its path only if that is still its own socket."""

    _identity = None

    def startListening(self):
        super().startListening()
        self._identity = _identity(self._bindPath)

    def connectionLost(self, reason):
        # unix.Port.connectionLost without its unconditional unlink.
        found = _identity(self._bindPath)
        if found is not None and found == self._identity:
            os.unlink(self._bindPath)
        elif found is not None:
            log.warn(
                "Leaving {path} in place: another process has bound its own socket there since this one listened",
                path=os.fsdecode(self._bindPath),
            )
        if self.lockFile is not None:
            self.lockFile.unlock()
        tcp.Port.connectionLost(self, reason)


@implementer(IStreamServerEndpoint)
class _OwnPathEndpoint:
    """Listens on a UNIX socket path with ``_OwnPathPort``."""

    def __init__(self, reactor, path: str, mode: int):
        self._reactor = reactor
        self._path = path
        self._mode = mode

    def listen(self, factory):
        def listen():
            port = _OwnPathPort(self._path, factory, mode=self._mode, reactor=self._reactor)
            port.startListening()
            return port

        return defer.execute(listen)


class SocketPathListener(Listener):
    """A listener on a UNIX socket path that, when it stops, leaves the path alone if another process has bound it since.

    A process that started after this one may have replaced the path with
    its own socket; Twisted's port would remove it, and with it the only way
    to reach that process.
    """

    def __init__(self, name: str, path: str, factory, reactor, *, mode: int = 0o600):
        super().__init__(name, f"unix:{path}:mode={mode:o}", factory, reactor)
        self.path = path
        self.mode = mode

    def _endpoint(self):
        return _OwnPathEndpoint(self._reactor, self.path, self.mode)


def _first_error(failure):
    """The failure of the first listener that failed, rather than ``gatherResults``' wrapper around it."""
    failure.trap(defer.FirstError)
    return failure.value.subFailure


class ListenerGroup:
    """The server's listeners, by name."""

    def __init__(self):
        self.listeners: Dict[str, Listener] = {}

    def add(self, listener: Listener) -> None:
        """Add a listener; names are unique."""
        if listener.name in self.listeners:
            raise ValueError(f"two listeners named {listener.name!r}")
        self.listeners[listener.name] = listener

    def listen_all(self, adopted: Optional[Dict[str, tuple]] = None) -> defer.Deferred:
        """Start every listener, adopting the sockets in ``adopted`` by name."""
        adopted = adopted or {}
        started = [listener.listen(adopted.get(name)) for name, listener in self.listeners.items()]
        for name, (descriptor, _) in adopted.items():
            if name not in self.listeners:
                log.warn("Closing handed-over listener {name}: not configured here", name=name)
                os.close(descriptor)
        return defer.gatherResults(started, consumeErrors=True).addErrback(_first_error)

    def stop(self, *, all_listeners: bool = False) -> defer.Deferred:
        """Stop the listeners that close on a drain, or every one of them."""
        chosen = [l for l in self.listeners.values() if all_listeners or l.stops_on_drain]
        return defer.gatherResults([l.stop_listening() for l in chosen])

    def handover(self) -> List[tuple]:
        """``(name, descriptor, family)`` for every listening socket."""
        return [(name, *listener.handover()) for name, listener in self.listeners.items() if listener.port]

    def take_back(self) -> List[str]:
        """Accept again on every socket handed over; returns their names."""
        return [name for name, listener in self.listeners.items() if listener.take_back()]

"""The server's listening sockets, which can be handed to another process.

Each ``Listener`` listens on a Twisted endpoint description, or adopts a
socket received from the process it replaces. A ``haproxy:`` description
keeps its PROXY-protocol wrapping when adopted, so the real client address
is still what the logs show.
"""

from __future__ import annotations

import ipaddress
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


def _split_description(description: str) -> List[str]:
    """The colon-separated fields of an endpoint description, with Twisted's backslash escapes undone."""
    fields, field, escaped = [], "", False
    for char in description:
        if escaped:
            field, escaped = field + char, False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append(field)
            field = ""
        else:
            field += char
    return [*fields, field]


def _asked_address(description: str) -> Optional[tuple]:
    """What ``description`` binds: ``("tcp", interface, port)`` or ``("unix", path)``; None when it names no address.

    ``interface`` is an ``ipaddress`` address, or the name as written when
    it is not an IP literal; ``port`` is None when it is not a number. A
    ``systemd:`` description names a socket by its index in what systemd
    passed, not by address.
    """
    kind, *fields = _split_description(description)
    if kind == "haproxy":
        return _asked_address(description.split(":", 1)[1])
    positional = [field for field in fields if "=" not in field]
    named = dict(field.split("=", 1) for field in fields if "=" in field)
    if kind in ("tcp", "tcp6", "ssl"):
        port = named.get("port", positional[0] if positional else "")
        interface = named.get("interface", "::" if kind == "tcp6" else "0.0.0.0")
        try:
            interface = ipaddress.ip_address(interface)
        except ValueError:
            pass
        return "tcp", interface, int(port) if port.isdigit() else None
    if kind == "unix":
        path = named.get("address", positional[0] if positional else "")
        return ("unix", path) if path else None
    return None


def _kept_address(descriptor: int) -> tuple:
    """The address of a listening socket received from another process, as ``_asked_address`` gives it."""
    sock = socket.socket(fileno=descriptor)
    try:
        family, name = sock.family, sock.getsockname()
    finally:
        sock.detach()
    if family == socket.AF_UNIX:
        return "unix", os.fsdecode(name)
    return "tcp", ipaddress.ip_address(name[0].split("%", 1)[0]), name[1]


def _show(address: tuple) -> str:
    if address[0] == "unix":
        return address[1]
    _, interface, port = address
    host = f"[{interface}]" if isinstance(interface, ipaddress.IPv6Address) else str(interface)
    return f"{host}:{port}"


def _same_address(asked: tuple, kept: tuple) -> bool:
    """Whether a socket bound to ``kept`` is one ``asked`` would bind; port 0, and what cannot be told, match any."""
    if asked[0] != kept[0]:
        return False
    if asked[0] == "unix":
        return asked[1] == kept[1] or os.path.abspath(asked[1]) == os.path.abspath(kept[1])
    _, interface, port = asked
    same_interface = interface == kept[1] or isinstance(interface, str)
    return same_interface and port in (0, None, kept[2])


def _address_mismatch(description: str, descriptor: int) -> Optional[str]:
    """How the socket ``descriptor`` differs from what ``description`` asks for; None if it does not (or cannot be told)."""
    asked = _asked_address(description)
    if asked is None:
        return None
    kept = _kept_address(descriptor)
    if _same_address(asked, kept):
        return None
    return f"asks for {_show(asked)} but the socket handed over listens on {_show(kept)}"


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
        """Start every listener, adopting the sockets in ``adopted`` by name.

        Fails before anything listens, closing every socket in ``adopted``,
        if one listens elsewhere than its listener's description asks: a
        takeover cannot move a socket, and keeping it unasked would leave
        the operator believing the address changed.
        """
        adopted = adopted or {}
        moved = []
        for name, (descriptor, _) in adopted.items():
            listener = self.listeners.get(name)
            mismatch = listener and _address_mismatch(listener.description, descriptor)
            if mismatch:
                moved.append(f"--{name} {listener.description} {mismatch}")
        if moved:
            for descriptor, _ in adopted.values():
                os.close(descriptor)
            return defer.fail(
                ListenError(
                    f"{'; '.join(moved)}. A takeover keeps the listening sockets of the server it replaces; "
                    "start with their addresses, or stop that server and start afresh to change them"
                )
            )
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

"""Test doubles for code that uses smartserve: an in-memory backend and a raw client.

``MemoryBackend`` serves a dictionary of files through the real server
protocol, records every request it runs, and can hold requests of chosen
verbs until the test releases them, so a test decides exactly when a
connection is busy. ``serve_in_memory`` wires it to a
``SmartServerProtocol`` over a ``StringTransport``. ``RawClient`` speaks the
client side of the codec over a plain blocking socket, for tests that drive
a real server process byte by byte.
"""

from __future__ import annotations

import os
import socket
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from .protocol import (
    NEED_DATA,
    BodyChunk,
    BodyCollector,
    BodyError,
    Connection,
    ConnectionClosed,
    EndOfMessage,
    Request,
    Response,
    Role,
)
from .protocol._wire import LENGTH, PART_BYTES
from .server.caller import Caller
from .server.dispatcher import Dispatcher
from .server.interfaces import IBackend, IRequestRun
from .server.jail import Writable
from .server.protocol import SmartServerFactory, SmartServerProtocol
from .server.reply import Reply

__all__ = [
    "MemoryBackend",
    "serve_in_memory",
    "encode_request",
    "response_args",
    "RawClient",
    "RawReply",
    "with_systemd_socket",
]


@implementer(IBackend)
class MemoryBackend:
    """An ``IBackend`` over a dictionary of files: ``hello``, ``get``, ``put``, ``append``.

    ``ran`` lists the arguments of every request that started running, in
    order; ``aborted`` those whose connection was lost while they ran.
    Requests for a verb passed to ``hold`` wait, once their body is in,
    until ``release`` is called.
    """

    VERBS = (b"hello", b"get", b"put", b"append")

    def __init__(self, files: Optional[Dict[bytes, bytes]] = None):
        self.files: Dict[bytes, bytes] = dict(files or {})
        self.ran: List[Tuple] = []
        self.aborted: List[Tuple] = []
        self._held_verbs: set = set()
        self._waiting: List[defer.Deferred] = []

    def knows(self, verb: bytes) -> bool:
        return verb in self.VERBS

    def start(self, caller: Caller, args) -> "_MemoryRun":
        return _MemoryRun(self, tuple(args))

    def hold(self, verb: bytes) -> None:
        """Make requests for ``verb`` wait for ``release`` before they answer."""
        self._held_verbs.add(verb)

    def release(self) -> None:
        """Stop holding and let every waiting request answer."""
        self._held_verbs.clear()
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    @property
    def waiting(self) -> int:
        """How many requests are held now."""
        return len(self._waiting)

    def _gate(self, verb: bytes) -> defer.Deferred:
        if verb not in self._held_verbs:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiting.append(d)
        return d

    def _execute(self, args: Tuple, body: bytes) -> Reply:
        verb, *rest = args
        if verb == b"hello":
            return Reply((b"ok", b"2"))
        path = rest[0] if rest else b""
        if verb == b"get":
            if path not in self.files:
                return Reply((b"NoSuchFile", path), success=False)
            return Reply((b"ok",), body=self.files[path])
        if verb == b"put":
            self.files[path] = body
            return Reply((b"ok",))
        offset = len(self.files.get(path, b""))
        self.files[path] = self.files.get(path, b"") + body
        return Reply((b"appended", str(offset).encode("ascii")))


@implementer(IRequestRun)
class _MemoryRun:
    """One request on a ``MemoryBackend``: collects its body, then runs it."""

    def __init__(self, backend: MemoryBackend, args: Tuple):
        self._backend = backend
        self._args = args
        self._body = BodyCollector()
        self._started = False

    def advance(self, chunks, finished) -> defer.Deferred:
        if not self._started:
            self._started = True
            self._backend.ran.append(self._args)
        for chunk in chunks:
            self._body.add(chunk)
        if not finished:
            return defer.succeed(None)
        d = self._backend._gate(self._args[0])
        return d.addCallback(lambda _: self._backend._execute(self._args, self._body.take()))

    @property
    def held_body_bytes(self) -> int:
        return self._body.size

    def abort(self) -> None:
        self._backend.aborted.append(self._args)


def serve_in_memory(
    backend: MemoryBackend,
    *,
    clock: Optional[Clock] = None,
    idle_timeout: float = 300.0,
    transport: Optional[StringTransport] = None,
) -> Tuple[SmartServerFactory, SmartServerProtocol, StringTransport]:
    """A connected server protocol over ``backend`` with writes allowed everywhere.

    Returns the factory, the protocol and its transport (a new
    ``StringTransport`` unless one is given); write request bytes with
    ``protocol.dataReceived`` and read the replies from ``transport.value()``.
    """
    factory = SmartServerFactory(
        Dispatcher(backend),
        clock=clock or Clock(),
        idle_timeout=idle_timeout,
        tcp_writable=Writable.everywhere(),
    )
    protocol = factory.build_protocol(Caller(None, "memory", factory.tcp_writable))
    transport = transport if transport is not None else StringTransport()
    protocol.makeConnection(transport)
    return factory, protocol, transport


def encode_request(args: Iterable, body: Optional[bytes] = None) -> bytes:
    """The bytes of one complete request, as a client would write them."""
    codec = Connection(Role.CLIENT)
    data = codec.send(Request(tuple(args)))
    if body is not None:
        data += codec.send(BodyChunk(body))
    return data + codec.send(EndOfMessage())


def response_args(data: bytes) -> List[Tuple]:
    """The arguments of every response in ``data``, bytes a server wrote, in order."""
    codec = Connection(Role.CLIENT)
    found = []
    while True:
        codec.send(Request((b"any",)))
        codec.send(EndOfMessage())
        if data:
            codec.receive_data(data)
            data = b""
        while (event := codec.next_event()) is not NEED_DATA:
            if isinstance(event, Response):
                found.append(event.args)
            elif isinstance(event, EndOfMessage):
                break
        if event is NEED_DATA:
            return found
        codec.start_next_cycle()


class RawReply:
    """A response read by ``RawClient``: arguments, success, and the body bytes."""

    def __init__(self, response: Response, body: bytes):
        self.args = response.args
        self.success = response.success
        self.body = body

    def __repr__(self) -> str:
        return f"RawReply({self.args!r}, success={self.success}, body={len(self.body)} bytes)"


class RawClient:
    """A blocking smart protocol client on one socket (or a pair of pipes), one request at a time.

    ``call`` returns the reply, or raises ``ConnectionError`` if the server
    closed the connection before the response ended.
    """

    def __init__(self, sock: Optional[socket.socket], *, write=None, read=None):
        self.sock = sock
        self._write = write or sock.sendall
        self._read = read or sock.recv
        self._codec = Connection(Role.CLIENT)
        self._sent_one = False

    @classmethod
    def connect(cls, host: str, port: int, timeout: float = 10.0) -> "RawClient":
        """Connect to a server at ``host:port``."""
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock)

    @classmethod
    def over_pipes(cls, stdin, stdout) -> "RawClient":
        """A client writing to the binary file ``stdin`` and reading ``stdout``, such as an ``ssh`` process's."""

        def write(data: bytes) -> None:
            stdin.write(data)
            stdin.flush()

        return cls(None, write=write, read=lambda size: os.read(stdout.fileno(), size))

    def send_request(self, args: Iterable, body: Optional[bytes] = None) -> None:
        """Write one request without waiting for its response."""
        data = self._opening(args)
        if body is not None:
            data += self._codec.send(BodyChunk(body))
        self._write(data + self._codec.send(EndOfMessage()))

    def begin_request(self, args: Iterable) -> None:
        """Write only the opening of a request; ``send_body_part`` and ``end_request`` write the rest."""
        self._write(self._opening(args))

    def send_body_part(self, data: bytes) -> None:
        """Write one body part of the request begun with ``begin_request``."""
        self._write(self._codec.send(BodyChunk(data)))

    def send_repeated_body_part(self, data: bytes, count: int) -> None:
        """Write ``count`` body parts, each ``data``, many to a write: a body cut into more parts than a
        test would write one call at a time."""
        encoded = self._codec.send(BodyChunk(data))
        per_write = max(1, 65536 // len(encoded))
        full, rest = divmod(count, per_write)
        block = encoded * per_write
        for _ in range(full):
            self._write(block)
        if rest:
            self._write(encoded * rest)

    def send_large_body_part(self, length: int, pieces: Iterable[bytes]) -> None:
        """Write one body part of ``length`` bytes made of ``pieces``, each written as it comes: a part
        larger than a test wants to hold, such as one over a server's limit."""
        self._write(bytes((PART_BYTES,)) + LENGTH.pack(length))
        written = 0
        for piece in pieces:
            written += len(piece)
            if written > length:
                raise ValueError(f"the pieces hold more than the {length} bytes announced")
            self._write(piece)
        if written != length:
            raise ValueError(f"the pieces hold {written} bytes, not the {length} announced")

    def end_request(self) -> None:
        """Write the end of the request begun with ``begin_request``."""
        self._write(self._codec.send(EndOfMessage()))

    def _opening(self, args: Iterable) -> bytes:
        if self._sent_one:
            self._codec.start_next_cycle()
        self._sent_one = True
        return self._codec.send(Request(tuple(args)))

    def read_reply(self, on_body_part: Optional[Callable[[bytes], None]] = None) -> RawReply:
        """Read the response to the request written last.

        With ``on_body_part``, each body part is handed to it as it arrives
        instead of being kept, and the reply's body is empty.
        """
        response = None
        body = []
        keep = body.append if on_body_part is None else on_body_part
        while True:
            event = self._codec.next_event()
            if event is NEED_DATA:
                data = self._read(65536)
                self._codec.receive_data(data)
                continue
            if isinstance(event, Response):
                response = event
            elif isinstance(event, BodyChunk):
                keep(event.data)
            elif isinstance(event, BodyError):
                raise ConnectionError(f"error in the response body: {event.args!r}")
            elif isinstance(event, EndOfMessage):
                return RawReply(response, b"".join(body))
            elif isinstance(event, ConnectionClosed):
                raise ConnectionError("the server closed the connection before the response ended")

    def call(self, *args, body: Optional[bytes] = None) -> RawReply:
        """Send one request and return its reply."""
        self.send_request(args, body)
        return self.read_reply()

    def wait_closed(self) -> bytes:
        """Block until the server closes the connection; returns what it sent after the last reply read."""
        received = [self._codec.trailing_data]
        while True:
            data = self._read(65536)
            if not data:
                return b"".join(received)
            received.append(data)

    def close(self) -> None:
        """Close the socket, if there is one."""
        if self.sock is not None:
            self.sock.close()


def with_systemd_socket(argv: List[str], sock: socket.socket) -> Tuple[List[str], Tuple[int, ...]]:
    """``argv`` started the way systemd's socket activation starts a service on ``sock``.

    As systemd (227 or later) does: the socket becomes descriptor 3,
    ``LISTEN_PID`` names the process that then execs ``argv``,
    ``LISTEN_FDS=1``, and ``LISTEN_FDNAMES`` names the socket after its
    ``.socket`` unit. Returns the command to run and the ``pass_fds`` for
    ``subprocess.Popen``; with ``systemd:domain=INET:index=0`` the server
    listens on ``sock``.
    """
    fd = sock.fileno()
    move = "" if fd == 3 else f"exec 3<&{fd} {fd}<&-; "
    script = f'{move}export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=smartserve.socket; exec "$@"'
    return ["bash", "-c", script, "smartserve", *argv], (fd,)

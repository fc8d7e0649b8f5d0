"""One client connection: a Twisted protocol that drives the v3 codec.

``SmartClientProtocol`` carries one request at a time. It only moves bytes
between the transport and ``smartserve.protocol.Connection`` and turns the
codec's events into the call's result; what to do when a connection fails
is decided by the engine in ``_client``.

A failed request is reported as the ``TransportFailure`` subclass for how
far it got, read off the codec: nothing sent (``RequestNotSent``), part of
the request sent (``RequestTransmissionFailed``), all of it sent and no
response byte received (``ResponseNeverReceived``), or part of the response
received (``ResponseFailed``).
"""

from __future__ import annotations

import select
import socket
from dataclasses import replace
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Tuple, Union

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessTerminated
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .._sending import direct_socket, write_now
from ..protocol import (
    MAX_PART_SIZE,
    BodyChunk,
    BodyCollector,
    BodyError,
    Connection,
    EndOfMessage,
    Limits,
    DEFAULT_LIMITS,
    ProtocolError,
    Request,
    Response,
    Role,
    SERVER_DRAINING,
    State,
    TOO_MANY_CONNECTIONS,
)
from ..verbs import FailurePoint
from ._exceptions import CommandRefused, ResponseTooLarge, _text, remote_error, transport_failure

__all__ = ["SmartClientProtocol", "Reply", "Outgoing", "DRAIN_EXIT_STATUS"]

DRAIN_EXIT_STATUS = 75
"""SSH exit status (EX_TEMPFAIL) of a server that closed because it drains."""

# Enough to hold smartserve's TooManyConnections message whole.
_TURNED_AWAY_PEEK = 1024
_TURNED_AWAY_REASON = "the server turned the connection away unread: too many connections"

BodyStream = Union[Iterable[bytes], Callable[[], Iterable[bytes]], Any]

# An int, not the socket.MsgFlag the ``|`` of the members builds on every call.
_PEEK_NOW = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
_END = EndOfMessage()
_MESSAGE_EVENTS = frozenset((Response, BodyChunk, BodyError, EndOfMessage))
_IDLE = State.IDLE
_DONE = State.DONE


class Reply(NamedTuple):
    """A successful response: its arguments and its body.

    ``body`` is the whole body as bytes, or None when the body was handed
    chunk by chunk to the call's ``on_chunk`` callback.
    """

    args: Tuple[Any, ...]
    body: Optional[bytes]


class Outgoing:
    """One request as the caller described it, sendable more than once.

    ``body`` is bytes sent as one part. ``body_stream`` is sent as a part per
    item: a callable returning a fresh iterable (replayable: it is called
    again for each attempt), or an iterable or async iterable (one-shot: once
    an item has been taken, the request cannot be sent again). An async
    iterable must await only Deferreds. ``on_chunk`` receives the response
    body part by part instead of collecting it.
    """

    def __init__(
        self,
        verb: bytes,
        args: Tuple[Any, ...] = (),
        *,
        body: Optional[bytes] = None,
        body_stream: Optional[BodyStream] = None,
        on_chunk: Optional[Callable[[bytes], object]] = None,
        headers: Optional[Mapping[bytes, Any]] = None,
    ):
        if body is not None and body_stream is not None:
            raise TypeError("give body or body_stream, not both")
        self.verb = verb
        self.args = tuple(args)
        self.body = body
        self.body_stream = body_stream
        self.on_chunk = on_chunk
        self.headers = dict(headers or {})
        self.stream_consumed = False
        self.chunks_delivered = 0

    @property
    def body_replayable(self) -> bool:
        """Whether the body can be sent again in full."""
        return self.body_stream is None or callable(self.body_stream) or not self.stream_consumed

    @property
    def response_replayable(self) -> bool:
        """Whether a lost response can be asked for again without the caller seeing it twice."""
        return self.chunks_delivered == 0

    def open_stream(self):
        """The body stream's items for one attempt."""
        self.stream_consumed = True
        stream = self.body_stream
        return stream() if callable(stream) else stream


def _ssh_socket_transport(transport):
    """The TCP transport under an SSH channel, or None."""
    return getattr(getattr(getattr(transport, "conn", None), "transport", None), "transport", None)


def _socket_of(transport) -> Optional[socket.socket]:
    """The socket under a TCP transport or an SSH channel, if there is one still open."""
    for candidate in (transport, _ssh_socket_transport(transport)):
        get_handle = getattr(candidate, "getHandle", None)
        if get_handle is not None:
            try:
                handle = get_handle()
            except (AttributeError, OSError):
                continue  # a transport whose socket is already closed
            if isinstance(handle, socket.socket):
                return handle
    return None


@implementer(IPushProducer)
class SmartClientProtocol(Protocol):
    """The client end of one smart protocol connection.

    ``when_closed()`` fires once the connection is gone. ``drain_signal``
    is True once the server closed it with exit status 75.
    ``requests_sent`` counts the requests started on it.
    """

    _log = Logger()

    def __init__(self, clock, limits: Limits = DEFAULT_LIMITS):
        self._clock = clock
        # A part larger than the limit comes in pieces as its bytes arrive,
        # so ``on_chunk`` can take it; a body collected whole is held to
        # the limit (``ResponseTooLarge``).
        self._max_collected = limits.max_body_part_size
        whole = limits.max_body_part_size
        if limits.max_whole_part_size is not None:
            whole = min(whole, limits.max_whole_part_size)
        self._codec = Connection(Role.CLIENT, replace(limits, max_body_part_size=MAX_PART_SIZE, max_whole_part_size=whole))
        self._pending: Optional[Deferred] = None
        self._listener = None
        self._outgoing: Optional[Outgoing] = None
        self._response: Optional[Response] = None
        self._body = BodyCollector()
        self._body_error: Optional[tuple] = None
        self._received_in_cycle = False
        self._timer = None
        self._timeout: Optional[float] = None
        self._deadline: Optional[float] = None
        self._socket: Optional[socket.socket] = None
        self._readable = None
        self._direct_socket = None
        self._paused: Optional[Deferred] = None
        self._abort_reason: Optional[str] = None
        self._abort_error: Optional[BaseException] = None
        self._lost = False
        self._reusable = True
        self.drain_signal = False
        self.turned_away = False  # the server answered TooManyConnections: it read nothing
        self._command_refused = False
        self._close_waiters: list = []
        self.requests_sent = 0

    def connectionMade(self) -> None:
        if getattr(self.transport, "getHandle", None) is not None:
            self._socket = _socket_of(self.transport)
            if self._socket is not None and hasattr(select, "poll"):
                self._readable = select.poll()
                self._readable.register(self._socket, select.POLLIN)
            self._direct_socket = direct_socket(self.transport)
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        else:
            sock = _socket_of(self.transport)
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @property
    def is_closed(self) -> bool:
        """Whether the connection is gone."""
        return self._lost

    @property
    def reusable(self) -> bool:
        """Whether it may carry another request: open, and not being closed."""
        return self._reusable and not self._lost

    def when_closed(self) -> Deferred:
        """A Deferred that fires with None once the connection is gone."""
        if self._lost:
            return succeed(None)
        waiter: Deferred = Deferred()
        self._close_waiters.append(waiter)
        return waiter

    @property
    def busy(self) -> bool:
        """Whether a request is in progress on this connection."""
        return self._pending is not None

    def closed_reason(self) -> Optional[str]:
        """Why this connection cannot take a new request, or None if it can.

        Looks at what has already been delivered (a lost connection, an EOF
        fed to the codec, the SSH peer's channel close) and at a TCP socket's
        own queue, where a FIN may wait that the reactor has not read yet.
        """
        if self.turned_away:
            return _TURNED_AWAY_REASON
        if self._lost:
            return "connection already closed"
        codec = self._codec
        if codec.their_eof:
            return "server sent EOF"
        sock = self._socket
        if sock is None:
            if getattr(self.transport, "remoteClosed", False):
                return "server closed the channel"
            if getattr(self.transport, "eof_received", False):
                return "server ended the channel's output"
            carrier = _ssh_socket_transport(self.transport)
            if carrier is not None and (getattr(carrier, "disconnected", False) or not getattr(carrier, "connected", True)):
                return "the SSH connection under the channel is gone"
        if not self._reusable or codec.our_state is not _IDLE:
            return "connection not reusable"
        if codec.their_state is not _IDLE or codec.trailing_data:
            return "server sent bytes outside a response"
        if sock is not None:
            # A poll is cheaper than a peek; it reports an EOF, bytes and a
            # socket error alike, and only then does the peek tell which.
            if self._readable is not None and not self._readable.poll(0):
                return None
            try:
                peeked = sock.recv(1, _PEEK_NOW)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as exc:
                return f"socket error: {exc}"
            if peeked == b"":
                return "server sent EOF (not yet read)"
            if self.requests_sent == 0 and _says_turned_away(sock.recv(_TURNED_AWAY_PEEK, _PEEK_NOW)):
                self.turned_away = True
                return _TURNED_AWAY_REASON
            return "server sent bytes outside a response"
        return None

    def has_unread_input(self) -> bool:
        """Whether the socket under an SSH channel has bytes the reactor has not read."""
        if self._socket is not None or getattr(self.transport, "getHandle", None) is not None:
            return False
        sock = _socket_of(self.transport)
        if sock is None:
            return False
        try:
            if hasattr(select, "poll"):  # select() cannot watch a descriptor above FD_SETSIZE (1024)
                poller = select.poll()
                poller.register(sock, select.POLLIN)
                return bool(poller.poll(0))
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return bool(readable)

    def send_request(self, outgoing: Outgoing, timeout: Optional[float] = None, listener=None) -> Deferred:
        """Send ``outgoing`` and return a Deferred that fires with its ``Reply``.

        The Deferred fails with a ``RemoteError`` for an error response,
        a ``TransportFailure`` subclass if the connection is lost first, or
        the exception a body stream or ``on_chunk`` raised. Raises
        ``RuntimeError`` if a request is already in progress.

        A ``listener`` hears the outcome before the Deferred's callbacks
        run, with no callback of its own on it: ``answered(reply)``, or
        ``failed(exception)``, which may return a Deferred whose result the
        request's Deferred then takes (a resend), or raise another error;
        its ``cancel(deferred)`` is the Deferred's canceller.
        """
        if self._pending is not None:
            raise RuntimeError("one request at a time per connection")
        self._listener = listener
        self._pending = Deferred(None if listener is None else listener.cancel)
        self.requests_sent += 1
        result = self._pending
        self._outgoing = outgoing
        self._response = None
        self._body = BodyCollector()
        self._body_error = None
        self._received_in_cycle = False
        self._abort_reason = None
        self._abort_error = None
        if timeout is not None:
            self._arm_timer(timeout)
        if self._lost:
            self._fail_pending(Failure(ConnectionError("connection already closed")))
            return result
        try:
            if outgoing.body_stream is not None:
                self._write(Request((outgoing.verb,) + outgoing.args, outgoing.headers))
                Deferred.fromCoroutine(self._write_stream(outgoing)).addErrback(self._stream_failed)
            else:
                parts = self._codec.send_message(Request((outgoing.verb,) + outgoing.args, outgoing.headers), outgoing.body)
                self._write_now(parts[0] if len(parts) == 1 else b"".join(parts))
        except Exception as exc:
            if self._codec.our_state is _IDLE:
                # Nothing was encoded, let alone sent: the connection stays as good as it was.
                self._clear_request()
                self._settle(result, exc)
            else:
                self.abort(f"cannot encode request: {exc}", exc)
        return result

    def abandon(self, reason: str) -> None:
        """Drop the connection for a request its caller gave up on, without settling the request's Deferred.

        Nothing more of the request is sent, so a server discards it if it
        was not wholly sent.
        """
        self._listener = None
        self._clear_request()
        self.abort(reason)

    def abort(self, reason: str, error: Optional[BaseException] = None) -> None:
        """Drop the connection at once; a request in progress fails with ``reason``.

        ``error``, when given, is what the request fails with instead of a
        ``TransportFailure``.
        """
        if self._abort_reason is None:
            self._abort_reason = reason
            self._abort_error = error
        self._reusable = False
        if self._lost:
            return
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()
            return
        ssh_socket_transport = getattr(getattr(getattr(self.transport, "conn", None), "transport", None), "transport", None)
        if ssh_socket_transport is not None:
            ssh_socket_transport.abortConnection()
        else:
            self.transport.loseConnection()

    def close(self) -> None:
        """Close the connection once what was written has been sent; a request in progress fails."""
        if self._pending is not None and self._abort_reason is None:
            self._abort_reason = "the client closed the connection"
        self._reusable = False
        if not self._lost:
            self.transport.loseConnection()

    def _write(self, event) -> None:
        self.transport.write(self._codec.send(event))

    def _write_now(self, data: bytes) -> None:
        """Write a whole request, sent in this reactor turn (see smartserve._sending)."""
        write_now(self.transport, self._direct_socket, data)

    async def _write_stream(self, outgoing: Outgoing) -> None:
        self.transport.registerProducer(self, True)
        try:
            items = outgoing.open_stream()
            if hasattr(items, "__aiter__"):
                async for item in items:
                    if not await self._ready_to_write():
                        return
                    self._write(BodyChunk(item))
            else:
                for item in items:
                    if not await self._ready_to_write():
                        return
                    self._write(BodyChunk(item))
            if not self._lost and self._pending is not None:
                self._write(_END)
        finally:
            if not self._lost:
                self.transport.unregisterProducer()

    async def _ready_to_write(self) -> bool:
        while self._paused is not None and not self._lost:
            await self._paused
        return not self._lost and self._pending is not None and self._codec.our_state is State.BODY

    def _stream_failed(self, failure: Failure) -> None:
        self.abort(f"request body stream failed: {failure.value!r}", failure.value)

    def pauseProducing(self) -> None:
        if self._paused is None:
            self._paused = Deferred()

    def resumeProducing(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None:
            paused.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()

    def _arm_timer(self, timeout: float) -> None:
        """Abort the request if no response comes within ``timeout`` seconds.

        One timer serves the connection's requests in turn, sparing a
        ``callLater`` and a ``cancel`` per request: it is moved only when
        the new deadline is earlier, and when it fires before the deadline
        (set by an earlier request) it waits out the rest.
        """
        self._timeout = timeout
        self._deadline = deadline = self._clock.seconds() + timeout
        timer = self._timer
        if timer is None:
            self._timer = self._clock.callLater(timeout, self._timer_fired)
        elif timer.getTime() > deadline:
            timer.reset(timeout)

    def _timer_fired(self) -> None:
        self._timer = None
        if self._deadline is None:
            return
        remaining = self._deadline - self._clock.seconds()
        if remaining > 0:
            self._timer = self._clock.callLater(remaining, self._timer_fired)
            return
        self._deadline = None
        self.abort(f"no response within {round(self._timeout, 2):g} s")

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        self._deadline = None
        if timer is not None and timer.active():
            timer.cancel()

    def dataReceived(self, data: bytes) -> None:
        if self._abort_reason is not None:
            return  # aborted; the loss is reported in a later turn
        if self._pending is None:
            if self.requests_sent == 0 and _says_turned_away(data):
                self.turned_away = True
                self.abort(_TURNED_AWAY_REASON)
            else:
                self.abort("server sent bytes outside a response")
            return
        self._received_in_cycle = True
        try:
            self._codec.receive_data(data)
        except ProtocolError as exc:
            self.abort(f"protocol error: {exc}")
            return
        events = self._codec.next_message()
        if events is None:
            self._process_events()
            return
        # A whole response in one read, the common case of a small one.
        self._response = events[0]
        for event in events[1:-1]:
            if not self._take_body_part(event.data):
                return
        self._finish()
        if self._codec.buffered_size:
            self._process_events()

    def _process_events(self) -> None:
        next_event = self._codec.next_event
        while True:
            try:
                event = next_event()
            except ProtocolError as exc:
                self.abort(f"protocol error: {exc}")
                return
            kind = type(event)
            if kind not in _MESSAGE_EVENTS:
                return  # NEED_DATA, PAUSED or ConnectionClosed
            if self._pending is None:
                self.abort("server sent a response to no request")
                return
            if kind is BodyChunk:
                if not self._take_body_part(event.data):
                    return
            elif kind is Response:
                self._response = event
            elif kind is EndOfMessage:
                self._finish()
                if not self._codec.trailing_data:
                    return  # next_event would only say NEED_DATA (or ConnectionClosed)
            else:
                self._body_error = event.args

    def _take_body_part(self, data: bytes) -> bool:
        """Collect a response body part or hand it to ``on_chunk``; False once ``on_chunk`` raised.

        After that nothing more reaches ``on_chunk``, and the call fails with its error.
        """
        if self._outgoing.on_chunk is None:
            return self._collect(data)
        self._take_chunk(data)
        return self._abort_reason is None

    def _collect(self, data: bytes) -> bool:
        """Keep a body part of a body collected whole; False, and the connection dropped, once it is over the limit."""
        body = self._body
        if body.size + len(data) > self._max_collected:
            verb = self._outgoing.verb
            self.abort(f"response body over {self._max_collected} bytes", ResponseTooLarge(verb, self._max_collected))
            return False
        body.add(data)
        return True

    def _take_chunk(self, data: bytes) -> None:
        outgoing = self._outgoing
        if outgoing.on_chunk is not None and self._response.success and self._body_error is None:
            outgoing.chunks_delivered += 1
            try:
                outgoing.on_chunk(data)
            except Exception as exc:
                self.abort(f"on_chunk raised {exc!r}", exc)
        else:
            self._collect(data)

    def _finish(self) -> None:
        answered_early = self._codec.our_state is not _DONE
        if answered_early:
            # The server answered before the whole request was sent: the
            # rest of it is not sent, and the connection is closed once the
            # call is settled (closing may report the loss at once).
            self._reusable = False
        else:
            self._codec.start_next_cycle()
        pending, outgoing, response = self._pending, self._outgoing, self._response
        self._clear_request()
        body = self._body.take()
        if response.success and self._body_error is None:
            has_body = outgoing.on_chunk is None
            self._settle(pending, Reply(tuple(response.args), body if has_body else None))
        elif self._said_not_run(response):
            draining = response.args[0] == SERVER_DRAINING
            self.turned_away = not draining
            self._reusable = False
            point = FailurePoint.DURING_WRITE if answered_early else FailurePoint.AFTER_WRITE
            detail = _text(response.args[1]) if len(response.args) > 1 else ""
            why = f"the server {'is draining' if draining else 'turned the connection away unread'}: {detail}"
            failure = transport_failure(outgoing.verb, point, why, drain_signal=draining, server_busy=not draining)
            self._settle(pending, failure)
            self.close()
            return
        else:
            self._settle(pending, remote_error(outgoing.verb, tuple(self._body_error or response.args), body))
        if answered_early:
            self.close()

    def _said_not_run(self, response) -> bool:
        """Whether ``response`` is smartserve saying it read nothing of the request: ``ServerDraining``, or
        ``TooManyConnections`` as a connection's first answer."""
        if response.success or self._body_error is not None or not response.args:
            return False
        name = response.args[0]
        return name == SERVER_DRAINING or (name == TOO_MANY_CONNECTIONS and self.requests_sent == 1)

    def _settle(self, pending: Deferred, outcome) -> None:
        """Fire ``pending`` with ``outcome``, a Reply or an exception, once the listener has heard it."""
        listener, self._listener = self._listener, None
        if pending.called:
            return  # the caller cancelled it and no longer listens
        if not isinstance(outcome, BaseException):
            if listener is not None:
                try:
                    listener.answered(outcome)
                except BaseException:
                    pending.errback()
                    return
            pending.callback(outcome)
            return
        if listener is not None:
            try:
                instead = listener.failed(outcome)
            except BaseException:
                pending.errback()
                return
            if instead is not None:
                instead.chainDeferred(pending)
                return
        pending.errback(outcome)

    def _clear_request(self) -> None:
        self._pending = None
        self._outgoing = None
        self._deadline = None

    def failure_point(self) -> FailurePoint:
        """How far the request in progress got, from what the codec sent and received."""
        if self._received_in_cycle:
            return FailurePoint.DURING_RESPONSE
        state = self._codec.our_state
        if state is State.IDLE or self._command_refused:
            return FailurePoint.BEFORE_WRITE
        if state is State.DONE:
            return FailurePoint.AFTER_WRITE
        return FailurePoint.DURING_WRITE

    def _fail_pending(self, reason: Failure) -> None:
        pending, outgoing = self._pending, self._outgoing
        point = self.failure_point()
        self._codec.send_failed()
        self._clear_request()
        if self._abort_error is not None:
            self._settle(pending, self._abort_error)
            return
        why = self._abort_reason or _describe(reason)
        drain = self.drain_signal and point is not FailurePoint.DURING_RESPONSE
        self._settle(pending, transport_failure(outgoing.verb, point, why, drain_signal=drain))

    def connectionLost(self, reason: Failure = None) -> None:
        self._lost = True
        self._reusable = False
        self._stop_timer()
        value = reason.value if reason is not None else None
        if isinstance(value, ProcessTerminated) and value.exitCode == DRAIN_EXIT_STATUS:
            self.drain_signal = True
        self._command_refused = isinstance(value, CommandRefused)
        self.resumeProducing()
        if self._pending is not None:
            if not self._codec.their_eof:
                self._codec.receive_data(b"")
            self._fail_pending(reason)
        waiters, self._close_waiters = self._close_waiters, []
        for waiter in waiters:
            waiter.callback(None)


def _says_turned_away(data: bytes) -> bool:
    """Whether ``data``, the first bytes of a connection that has carried no request, are a whole ``TooManyConnections``."""
    codec = Connection(Role.CLIENT)
    codec.send_message(Request((b"hello",)))
    try:
        codec.receive_data(data)
    except ProtocolError:
        return False
    events = codec.next_message()
    return events is not None and not events[0].success and events[0].args[:1] == (TOO_MANY_CONNECTIONS,)


def _describe(reason: Optional[Failure]) -> str:
    if reason is None:
        return "connection lost"
    value = reason.value
    if isinstance(value, ProcessTerminated):
        return f"server exited with status {value.exitCode}"
    return str(value) or type(value).__name__

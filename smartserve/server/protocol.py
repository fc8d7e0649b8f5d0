"""The Twisted side of a smart server connection: bytes to codec, events to requests.

A ``SmartServerProtocol`` serves one TCP connection or one SSH channel. It
feeds received bytes to the sans-IO codec, runs one request at a time
through the ``Dispatcher``, and writes the reply, pulling streamed bodies
only while the transport accepts more (it is the transport's push
producer). It never parses bytes itself.

Phases of a connection:

IDLE
    Waiting for the next request; the idle timeout runs.
REQUEST
    A request has begun: its body is being received and it is running.
RESPONSE
    The reply is being written.
CLOSED
    The connection is gone.

The transport is read only while the next bytes can be taken: not while a
step of the request runs in the backend, not from the moment a request
has wholly arrived until its response has been written, and not while the
transport still holds more of that response than it takes at once (it has
paused its producer): the next request waits until the client has read
the last answer, so pipelined requests cannot pile up answers. What the client
sends meanwhile waits in its socket (over SSH, in its channel window), so a
client that writes without reading costs the server no memory; requests it
pipelined are answered in order once the one before is done.

Each connection reports to the factory's ``body_memory`` what it holds of
request bodies (received bytes the codec has not handed on, the body its
request keeps); a request whose body grows while all of them together, or
its caller's, are over their limit is answered ``ServerBusy`` unrun.
Whenever a request is refused, its remaining body parts are taken in
pieces and dropped as they arrive.

A drain closes an IDLE connection at once and any other right after the
last byte of its current response; a request that has not begun is never
started. With a drain linger of L seconds, requests that begin within L
seconds of the drain are still served: an IDLE connection closes once it
has been idle for L seconds, or at once if L seconds have passed since the
drain began. An unmodified ``brz`` sends the requests of one command back
to back on one connection and cannot resend a streamed request (such as
the ``insert_stream`` of a push) whose connection closed under it.
"""

from __future__ import annotations

import collections
import enum
import itertools
import random
from typing import List, Optional

import breezy
from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from zope.interface import implementer

from ..protocol import (
    DEFAULT_LIMITS,
    NEED_DATA,
    PAUSED,
    BodyChunk,
    BodyError,
    Connection,
    ConnectionClosed,
    EndOfMessage,
    Limits,
    LocalProtocolError,
    ProtocolError,
    Request,
    Response,
    Role,
    SERVER_BUSY,
    SERVER_DRAINING,
    TOO_MANY_CONNECTIONS,
    error_response,
)
from .._quiet import QuietFactory
from .._sending import direct_socket, send_now, write_now
from .accesslog import DEFAULT_ACCESS_LOG, RequestRecord
from .bodymemory import ONE_CALLER, RequestBodyMemory
from .caller import Caller, peer_text
from .dispatcher import Dispatcher, Refusal
from .drain import OpenConnections
from .interfaces import IDrainable
from .jail import Writable
from .reply import Reply, StreamFailure

__all__ = ["SmartServerProtocol", "SmartServerFactory", "Phase", "ClosedAtOnce"]

log = Logger()

# Response headers as Breezy's own server sends them.
_HEADERS = {b"Software version": breezy.__version__.encode("ascii")}

# Responses smaller than this are written as one string: one copy is cheaper than a list.
_JOIN_BELOW = 64 * 1024

# How much of a response stream one worker-pool call produces.
STREAM_SLICE_BYTES = 64 * 1024

# How much of a streamed response is held back, with its response tuple,
# until the stream has ended (see SmartServerFactory). Off by default: the
# client waits for what is held, and Breezy makes a stream's start slowly.
DEFAULT_HOLD_RESPONSE_BYTES = 0

# The access-log outcome of a request whose rest broke the protocol: the
# server answered with an error and closed the connection.
PROTOCOL_ERROR = "protocol-error"

# A request arriving slower than this, on average, once its grace is spent,
# is cut off (see SmartServerProtocol._arrival_left): a client trickling a
# byte at a time would otherwise hold a connection, a share of request body
# memory and a drain for as long as it liked.
DEFAULT_MIN_REQUEST_RATE = 1024
DEFAULT_REQUEST_GRACE = 60.0

# Seconds for which a bzr:// connection closed with an answer to a request
# the server did not read (ServerDraining, TooManyConnections) is read from
# and its bytes dropped, waiting for the client to close it.
CLOSE_LINGER = 2.0

# The answer to a request the server failed to run for a reason of its own.
_INTERNAL_ERROR = Reply((b"error", b"InternalError", b"the server failed to run this request"), success=False)


def _encoding_failed_args(what: str, args) -> tuple:
    """The error sent in place of a reply or stream error whose ``args`` cannot be encoded."""
    name = args[0] if args and isinstance(args[0], bytes) else b"unnamed"
    return (b"error", b"InternalError", b"the server could not encode its %s %s" % (name, what.encode("ascii")))


class Phase(enum.Enum):
    """Where a connection stands; see the module docstring."""

    IDLE = "idle"
    REQUEST = "request"
    RESPONSE = "response"
    CLOSED = "closed"


class _CurrentRequest:
    """The request in progress on a connection."""

    __slots__ = (
        "record",
        "run",
        "refusal",
        "chunks",
        "chunk_bytes",
        "advancing_bytes",
        "finished",
        "started",
        "advancing",
        "stream",
        "ready",
        "held",
        "held_size",
    )

    def __init__(self, record: RequestRecord):
        self.record = record
        self.run = None
        self.started = False
        self.refusal: Optional[Reply] = None
        self.chunks: List[bytes] = []
        self.chunk_bytes = 0  # in chunks
        self.advancing_bytes = 0  # of the chunks the step in progress was handed
        self.finished = False
        self.advancing = False
        self.stream = None
        self.ready: Optional[list] = None
        self.held: Optional[list] = None  # the start of a streamed response, not yet written
        self.held_size = 0

    def take_body(self, data: bytes) -> None:
        """Keep a body part for the run, unless the request will not run."""
        if self.run is not None and self.refusal is None:
            self.chunks.append(data)
            self.chunk_bytes += len(data)

    def held_bytes(self) -> int:
        """Bytes of the body held for the run: waiting for it, handed to it, kept by it."""
        if self.run is None or self.refusal is not None:
            return 0
        return self.chunk_bytes + self.advancing_bytes + self.run.held_body_bytes


@implementer(IPushProducer, IHalfCloseableProtocol)
class SmartServerProtocol(Protocol):
    """Serves smart protocol v3 requests on one connection, one at a time."""

    def __init__(self, factory: "SmartServerFactory", caller: Caller, connection_id: int, carried_by=None):
        self.factory = factory
        self.caller = caller
        self.connection_id = connection_id
        # The client connection this one runs inside (an SSH session's SSH
        # connection), which the drain counts instead; None for bzr://.
        self.carried_by = carried_by
        self._final_close = None  # a drain's close waiting for the client to close (``_answer_unread_and_close``)
        self.phase = Phase.IDLE
        self.closing_for_drain = False
        self.requests_served = 0
        self._codec = Connection(Role.SERVER, factory.limits)
        self._current: Optional[_CurrentRequest] = None
        self._draining = False
        self._closing = False
        self._producer_paused = False
        self._reading_paused = False
        self._idle_timer = None
        self._waiting_since = None
        # Time spent waiting on the peer for the request now arriving: since
        # when, if it waits now, and how long before that.
        self._arrival_since = None
        self._arrival_waited = 0.0
        # Bytes received in all, and how many of them the messages before the current one took.
        self._bytes_received = 0
        self._bytes_before_message = 0
        self._idle_since = 0.0
        self._drain_started = None
        self._linger_call = None
        self._peer_from_transport = False
        self._handling_events = False
        self._handle_again = False
        self._socket = None
        self._admission_due = False  # a bzr:// connection counted per address at its first bytes
        self.counted_host: Optional[str] = None  # the address it is counted under, once admitted
        self._body_memory_share = 0  # what this connection counts in the factory's body_memory
        self._body_memory_caller = None  # whom that share is counted for (Caller.who)

    # Twisted callbacks.

    def connectionMade(self) -> None:
        # One response is one write: send it at once, as brz serve does.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        self._socket = direct_socket(self.transport)
        self._peer_from_transport = not self.caller.peer
        self._update_peer()
        if self.caller.user is None and self.factory.max_bzr_connections_per_address:
            if isinstance(self.transport, ProtocolWrapper):
                self._admission_due = True  # a PROXY header may yet name the client, ahead of its first bytes
            elif not self._admit():
                return
        self.transport.registerProducer(self, True)
        self.factory.connection_made(self)
        self._idle_since = self.factory.clock.seconds()
        self._update_idle_timer()
        if self._draining:
            self._close(for_drain=True)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._admission_due:
            self._admission_due = False
            self._update_peer()
            if not self._admit():
                return
        self._bytes_received += len(data)
        self._restart_idle_timer()
        try:
            self._codec.receive_data(data)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        self._handle_events()

    def eofReceived(self) -> None:
        """The peer will send nothing more (an SSH channel EOF).

        What it sent is still answered, the request in progress and any it
        pipelined before the EOF; then the connection closes.
        """
        if self._closing or self._codec.their_eof:
            return
        self._codec.receive_data(b"")
        self._handle_events()

    # IHalfCloseableProtocol: over TCP a client may shut down only its sending side.

    def readConnectionLost(self) -> None:
        """The TCP peer shut down its sending side: the same as an SSH channel EOF."""
        if self._final_close is not None:
            self.transport.loseConnection()  # it has read ServerDraining
            return
        self.eofReceived()

    def writeConnectionLost(self) -> None:
        """The server shut down its sending side as a drain closes the connection (``_answer_unread_and_close``)."""

    def connectionLost(self, reason: Failure = None) -> None:
        self._cancel_idle_timer()
        self._cancel_linger()
        if self._final_close is not None and self._final_close.active():
            self._final_close.cancel()
        self._closing = True
        current = self._current
        self._current = None
        if current is not None:
            if current.stream is not None:
                current.stream.close()
            elif current.run is not None:
                current.run.abort()
            if not current.finished:
                current.record.bytes_in = self._bytes_received - self._bytes_before_message
            if current.record.outcome != PROTOCOL_ERROR:
                current.record.outcome = "aborted"
            current.record.emit(self.factory.clock.seconds(), self.factory.access_log)
            self.factory.request_aborted(self, current.record)
        self.phase = Phase.CLOSED
        self.factory.body_memory.update(self._body_memory_caller, self._body_memory_share, 0)
        self._body_memory_share = 0
        self.factory.turned_away.discard(self)
        self.factory.connection_lost(self)

    # IPushProducer: the transport tells us when its buffer is full.

    def pauseProducing(self) -> None:
        self._producer_paused = True
        self._update_idle_timer()

    def resumeProducing(self) -> None:
        self._producer_paused = False
        self._update_idle_timer()
        if self.phase is Phase.IDLE and not self._closing:
            self._restart_idle_timer()  # the client took what was written
            self._handle_events()  # the next request, held back while the transport was full
            return
        current = self._current
        if self.phase is Phase.RESPONSE and current is not None and current.stream is not None:
            ready, current.ready = current.ready, None
            if ready is not None:
                self._write_slice(current, ready)
            else:
                self._pull_stream(current)

    def stopProducing(self) -> None:
        self._closing = True

    # Drain.

    def drain(self) -> None:
        """Close once idle (for the factory's drain linger), else right after the current response."""
        self._draining = True
        if self._drain_started is None:
            factory = self.factory
            # With a drain spread, each connection's linger ends at its own
            # moment, so that clients do not all reconnect at once.
            self._drain_started = factory.clock.seconds() + factory.random.uniform(0.0, factory.drain_spread)
        if self.phase is Phase.IDLE and self.transport is not None:
            self._close_if_lingered()

    def _close_if_lingered(self) -> bool:
        """Close an idle draining connection once the linger is over; True if closed."""
        since = min(self._idle_since, self._drain_started)
        remaining = since + self.factory.drain_linger - self.factory.clock.seconds()
        if remaining <= 0:
            self._close(for_drain=True)
            return True
        if self._linger_call is None:
            self._linger_call = self.factory.clock.callLater(remaining, self._linger_expired)
        return False

    def _linger_expired(self) -> None:
        self._linger_call = None
        if self.phase is Phase.IDLE:
            self._close(for_drain=True)

    def _cancel_linger(self) -> None:
        if self._linger_call is not None and self._linger_call.active():
            self._linger_call.cancel()
        self._linger_call = None

    def abort(self) -> None:
        """Drop the connection now, whatever it is doing."""
        self._closing = True
        self._cancel_idle_timer()
        abort = getattr(self.transport, "abortConnection", self.transport.loseConnection)
        abort()

    @property
    def busy(self) -> bool:
        """True while a request is running or its response is being written."""
        return self.phase in (Phase.REQUEST, Phase.RESPONSE)

    # Receiving.

    def _handle_events(self) -> None:
        """Consume received events as far as the current phase allows.

        A request answered at once ends inside this call and asks for the
        next events again; this loop does that rather than a nested call,
        so any number of pipelined requests is served with a flat stack.
        """
        if self._handling_events:
            self._handle_again = True
            return
        self._handling_events = True
        try:
            self._handle_again = True
            while self._handle_again:
                self._handle_again = False
                self._consume_events()
                if not self._closing and not self._count_body_memory():
                    self._refuse_for_body_memory()
        finally:
            self._handling_events = False
        self._update_reading()

    def _count_body_memory(self) -> bool:
        """Report this connection's share of the server's request body memory; False if it grew past the limit.

        The share is what the codec holds of received bytes and what the
        request in progress holds of its body.
        """
        current = self._current
        now = self._codec.buffered_size
        if current is not None:
            now += current.held_bytes()
        if now == self._body_memory_share == 0:
            return True  # the common case, a request without a body: nothing to count, for anyone
        memory, who = self.factory.body_memory, self.caller.who
        if who != self._body_memory_caller:
            # The client's address became known (a PROXY header): its share moves to it.
            memory.update(self._body_memory_caller, self._body_memory_share, 0)
            self._body_memory_caller, self._body_memory_share = who, 0
        before, self._body_memory_share = self._body_memory_share, now
        return memory.update(who, before, now)

    def _refuse_for_body_memory(self) -> None:
        """Refuse the request in progress unrun, if its body is still arriving: request bodies fill the server.

        Its body so far is dropped, and the rest as it arrives.
        """
        current = self._current
        if current is None or current.refusal is not None or current.advancing or current.finished:
            return
        memory = self.factory.body_memory
        if memory.over(self.caller.who) == ONE_CALLER:
            limit, whose = memory.per_caller_limit, " for one caller"
            what = (
                "refused: request bodies held for this caller are at the limit of {limit} bytes per caller "
                "(--max-request-memory-per-caller)"
            )
        else:
            limit, whose = memory.limit, ""
            what = "refused: request bodies held by the server are at its limit of {limit} bytes (--max-request-memory)"
        self.caller.warn_about(log, current.record.verb, what, limit=limit)
        message = (
            b"the server holds its limit of %d bytes of request bodies%s; nothing of this request ran, "
            b"send it again later" % (limit, whose.encode("ascii"))
        )
        current.refusal = Reply((SERVER_BUSY, message), success=False)
        current.chunks, current.chunk_bytes = [], 0
        if current.run is not None:
            current.run.abort()
            current.run = None
        self._codec.take_rest_in_pieces()
        self._handle_again = True  # drop what the codec holds of it, and count again

    def _update_reading(self) -> None:
        """Pause or resume reading the transport, as the module docstring says."""
        current = self._current
        if current is None:
            paused = self._producer_paused
        else:
            paused = current.finished or current.advancing
        if paused is self._reading_paused or self._closing:
            return
        # Noted first: resuming an SSH channel delivers the data it held at once.
        self._reading_paused = paused
        if paused:
            self.transport.pauseProducing()
        else:
            self.transport.resumeProducing()

    def _consume_events(self) -> None:
        while not self._closing:
            current = self._current
            if current is not None and current.advancing:
                return
            if self.phase is Phase.RESPONSE:
                return
            if self.phase is Phase.IDLE and self._draining and self._close_if_lingered():
                return
            if self.phase is Phase.IDLE:
                if self._producer_paused:
                    break  # the last response is not taken yet: begin no other
                whole = self._codec.next_message()
                if whole is not None:
                    self._take_whole_request(whole)
                    break
            try:
                event = self._codec.next_event()
            except ProtocolError as exc:
                self._protocol_error(exc)
                return
            if event is NEED_DATA or event is PAUSED:
                break
            kind = type(event)
            if kind is Request:
                self._begin(event)
            elif kind is BodyChunk:
                current.take_body(event.data)
            elif kind is EndOfMessage:
                self._request_ended(current)
            elif kind is BodyError:
                pass  # Breezy's server ignores the client's stream error, then ends the request.
            elif kind is ConnectionClosed:
                if self.phase is Phase.IDLE:
                    self._close(for_drain=False)
                    return
                break
        current = self._current
        if current is not None and self.phase is Phase.REQUEST:
            self._advance(current)
        self._update_idle_timer()

    def _take_whole_request(self, events: list) -> None:
        """Begin a request that arrived whole (``Connection.next_message``), body and end included."""
        self._begin(events[0])
        current = self._current
        for event in events[1:-1]:
            current.take_body(event.data)
        self._request_ended(current)

    def _request_ended(self, current: _CurrentRequest) -> None:
        current.finished = True
        consumed = self._bytes_received - self._codec.buffered_size
        current.record.bytes_in = consumed - self._bytes_before_message
        self._bytes_before_message = consumed
        self._arrival_since, self._arrival_waited = None, 0.0

    def _update_peer(self) -> None:
        """Take the caller's address from the transport, when it was not given.

        Behind a PROXY-protocol wrapper (``haproxy:`` endpoints) the real
        client address is known only once the header has arrived, after
        ``connectionMade``, so it is read again when the first request
        begins, and before a line about a connection that has made none;
        the header precedes every request byte, so it is final then.
        """
        if not self._peer_from_transport:
            return
        text = peer_text(self.transport.getPeer())
        if text != self.caller.peer:
            self.caller = Caller(self.caller.user, text, self.caller.writable)

    def _begin(self, request: Request) -> None:
        if self._peer_from_transport:
            self._update_peer()
            self._peer_from_transport = False
        record = RequestRecord(
            self.connection_id,
            self.caller.peer,
            self.caller.user,
            request.verb,
            self.factory.clock.seconds(),
        )
        current = self._current = _CurrentRequest(record)
        self.phase = Phase.REQUEST
        self._cancel_linger()
        try:
            current.run = self.factory.dispatcher.start(self.caller, request.args)
        except Refusal as refusal:
            current.refusal = refusal.reply
        except Exception:
            # A bug of the server's, or a backend tripping over odd arguments:
            # this request fails, the connection goes on.
            log.failure("Request {verb!r} could not be started", verb=request.verb)
            current.refusal = _INTERNAL_ERROR
        if current.refusal is not None:
            self._codec.take_rest_in_pieces()  # its body is dropped: never hold a part of it whole

    def _advance(self, current: _CurrentRequest) -> None:
        if current.refusal is not None:
            if current.finished:
                self._respond(current, current.refusal)
            return
        if current.advancing or (current.started and not current.chunks and not current.finished):
            return
        current.started = True
        chunks, current.chunks = current.chunks, []
        current.advancing_bytes, current.chunk_bytes = current.chunk_bytes, 0
        current.advancing = True
        try:
            d = current.run.advance(chunks, current.finished)
        except Exception:
            d = defer.fail()  # a backend that raised rather than failing its Deferred
        if d.called and not d.paused and not isinstance(d.result, Failure):
            self._advanced(d.result, current)  # answered at once (an inline read): no callback chain
        else:
            d.addCallbacks(self._advanced, self._backend_failed, (current,), None, (current,), None)

    def _advanced(self, reply: Optional[Reply], current: _CurrentRequest) -> None:
        current.advancing = False
        current.advancing_bytes = 0
        if self._current is not current:
            if reply is not None and reply.stream is not None:
                reply.stream.close()  # made after the connection was lost: nothing else will close it
            return
        if reply is not None:
            current.refusal = reply  # the rest of the request body is ignored
            if current.finished:
                self._respond(current, reply)
                return
            self._codec.take_rest_in_pieces()
        self._handle_events()

    def _backend_failed(self, failure: Failure, current: _CurrentRequest) -> None:
        log.failure("Request {verb!r} failed inside the server", failure, verb=current.record.verb)
        self._advanced(_INTERNAL_ERROR, current)

    # Responding.

    def _respond(self, current: _CurrentRequest, reply: Reply) -> None:
        self.phase = Phase.RESPONSE
        try:
            if reply.stream is None:
                parts = self._codec.send_message(Response(reply.args, reply.success, _HEADERS), reply.body)
            else:
                head = self._codec.send(Response(reply.args, reply.success, _HEADERS))
        except LocalProtocolError as exc:
            # A backend can hand back arguments bencode cannot carry (the
            # Breezy backend sends the Nones of Breezy's errors as b"", but
            # not every stray type). brz serve sends nothing for such a
            # reply; here the client gets an error it can read, and the
            # connection goes on.
            self._not_encodable(current, "reply", exc)
            if reply.stream is not None:
                reply.stream.close()
            reply = Reply(_encoding_failed_args("reply", reply.args), success=False)
            parts = self._codec.send_message(Response(reply.args, reply.success, _HEADERS))
        current.record.outcome = reply.outcome
        if reply.stream is not None:
            current.stream = reply.stream
            if self.factory.hold_response_bytes:
                current.held, current.held_size = [head], len(head)
            else:
                self._write(current, [head])
            self._pull_stream(current)
            return
        self._write(current, parts, now=True)
        self._response_done(current)

    def _pull_stream(self, current: _CurrentRequest) -> None:
        """Ask the stream for its next slice, unless one is already waiting here or asked for.

        The next slice is asked for while the transport still sends the
        last one (the producer is paused then), so that making and sending
        overlap; at most one slice waits ready beside the transport's buffer.
        """
        if self._closing or current.advancing or current.ready is not None:
            return
        current.advancing = True
        d = current.stream.pull(STREAM_SLICE_BYTES)
        d.addCallbacks(self._stream_pulled, self._stream_failed, (current,), None, (current,), None)

    def _stream_pulled(self, items: list, current: _CurrentRequest) -> None:
        current.advancing = False
        if self._current is not current:
            return
        if self._producer_paused:
            current.ready = items  # written once the transport asks for more
            return
        self._write_slice(current, items)

    def _write_slice(self, current: _CurrentRequest, items: list) -> None:
        parts = []
        ended = not items
        for item in items:
            if isinstance(item, StreamFailure):
                try:
                    parts.append(self._codec.send(BodyError(item.args)))
                except LocalProtocolError as exc:
                    self._not_encodable(current, "stream error", exc)
                    parts.append(self._codec.send(BodyError(_encoding_failed_args("error", item.args))))
                current.record.outcome = "stream-error"
                ended = True
                break
            parts.extend(self._codec.send_with_data_passthrough(BodyChunk(item)))
        if ended:
            parts.append(self._codec.send(EndOfMessage()))
        if current.held is None:
            self._write(current, parts)
        else:
            current.held.extend(parts)
            current.held_size += sum(map(len, parts))
            if ended or current.held_size >= self.factory.hold_response_bytes:
                held, current.held = current.held, None
                self._write(current, held, now=True)
        if ended:
            current.stream.close()
            self._response_done(current)
        else:
            self._pull_stream(current)

    def _stream_failed(self, failure: Failure, current: _CurrentRequest) -> None:
        log.failure("Response stream of {verb!r} failed inside the server", failure, verb=current.record.verb)
        self._stream_pulled([StreamFailure((b"error", b"InternalError", b"the server failed"))], current)

    def _not_encodable(self, current: _CurrentRequest, what: str, exc: LocalProtocolError) -> None:
        log.warn(
            "The {what} to {verb} from {user} at {peer} could not be encoded; sent InternalError instead: {error}",
            what=what,
            verb=current.record.verb.decode("utf-8", "replace"),
            user=self.caller.user or "-",
            peer=self.caller.peer,
            error=str(exc),
            connection_id=self.connection_id,
        )

    def _write(self, current: _CurrentRequest, parts: list, now: bool = False) -> None:
        """Write a response's parts; with ``now``, send them in this reactor turn (see smartserve._sending)."""
        size = sum(map(len, parts))
        current.record.bytes_out += size
        if size < _JOIN_BELOW:
            data = b"".join(parts)
            if now and self._socket is not None:
                write_now(self.transport, self._socket, data)
                return
            self.transport.write(data)
        else:
            # Large bodies go out without being copied into one string.
            self.transport.writeSequence(parts)
        if now and not self._producer_paused:
            send_now(self.transport)

    def _response_done(self, current: _CurrentRequest) -> None:
        current.record.emit(self.factory.clock.seconds(), self.factory.access_log)
        self._current = None
        self.requests_served += 1
        self.factory.request_finished(self, current.record)
        if self._draining and not self.factory.drain_linger:
            self._close(for_drain=True)
            return
        try:
            self._codec.start_next_cycle()
        except ProtocolError:
            # The peer closed its side while we answered: nothing more to do.
            self._close(for_drain=False)
            return
        self.phase = Phase.IDLE
        self._idle_since = self.factory.clock.seconds()
        self._handle_events()

    # Closing.

    def _admit(self) -> bool:
        """Count this bzr:// connection under its client's address; past the address's limit, turn it away.

        A connection turned away is answered ``TooManyConnections`` before
        anything it sent is read, as one over ``--bzr-max-connections`` is,
        so its client knows nothing ran.
        """
        host = getattr(self.transport.getPeer(), "host", None)
        if host is None:
            return True  # not an address of a host (a UNIX socket): no limit per address
        refusal = self.factory.admit_bzr_host(host)
        if refusal is None:
            self.counted_host = host
            return True
        self._closing = True
        self._cancel_idle_timer()
        turned_away = self.factory.turned_away
        if len(turned_away) >= MAX_TURNED_AWAY:
            self.transport.loseConnection()
            return False
        turned_away.add(self)
        self._final_close = _answer_unread_and_close(
            self.transport, (TOO_MANY_CONNECTIONS, refusal.encode()), self.factory.clock
        )
        return False

    def _protocol_error(self, exc: ProtocolError) -> None:
        self._update_peer()  # the PROXY header came, but perhaps no request yet
        cut_short = self._codec.their_eof
        if cut_short:
            # Not bytes the grammar refuses: a client that went away (a killed brz) before its request ended.
            log.info(
                "Connection {connection_id} from {peer} closed by the client in the middle of a request",
                peer=self.caller.peer,
                connection_id=self.connection_id,
            )
        else:
            log.warn(
                "Protocol error from {peer}, closing: {error}",
                peer=self.caller.peer,
                error=str(exc),
                connection_id=self.connection_id,
            )
        reply = self._codec.data_to_send()
        if reply:
            self.transport.write(reply)
            current = self._current
            if current is not None and not cut_short:
                current.record.outcome = PROTOCOL_ERROR
                current.record.bytes_out += len(reply)
        self._close(for_drain=False)

    def _close(self, for_drain: bool) -> None:
        if self._closing:
            return
        self._closing = True
        self.closing_for_drain = for_drain
        self._cancel_idle_timer()
        self._cancel_linger()
        if for_drain and self.carried_by is None and _can_half_close(self.transport):
            # Over SSH the drain's close says it with exit status 75; over
            # bzr:// ServerDraining answers whatever the client sent since
            # its last answer, so a request written as the connection closed
            # is known not to have run.
            draining = (SERVER_DRAINING, b"the server is draining: connect again")
            self._final_close = _answer_unread_and_close(self.transport, draining, self.factory.clock)
            if self._reading_paused:
                self._reading_paused = False
                self.transport.resumeProducing()  # the bytes are read and dropped
            return
        self.transport.loseConnection()

    # Idle timeout.

    def _waiting_on_peer(self) -> bool:
        """True while nothing moves unless the peer sends or reads."""
        if self.phase is Phase.IDLE:
            return True
        current = self._current
        if self.phase is Phase.REQUEST:
            return current is not None and not current.finished and not current.advancing
        return self.phase is Phase.RESPONSE and self._producer_paused

    def _update_idle_timer(self) -> None:
        """Count idle time exactly while the connection waits on the peer.

        One timer per connection stays armed across requests: a request
        only notes when the waiting started or stopped, and the timer, when
        it fires, closes the connection or re-arms for what is left. Arming
        and cancelling a timer around every request cost more than the
        rest of the bookkeeping of a small one.
        """
        timeout = self.factory.idle_timeout
        if self._closing or not (timeout or self.factory.min_request_rate):
            self._cancel_idle_timer()
        elif self._waiting_on_peer():
            now = None
            if self._waiting_since is None:
                self._waiting_since = now = self.factory.clock.seconds()
            if self._arrival_since is None and self.factory.min_request_rate and self._request_arriving():
                self._arrival_since = now or self.factory.clock.seconds()
                self._idle_timer_due(self._arrival_left(self._arrival_since))
            elif self._idle_timer is None and timeout:
                self._idle_timer = self.factory.clock.callLater(timeout, self._idle_timer_fired)
        else:
            self._waiting_since = None
            if self._arrival_since is not None:
                self._arrival_waited += self.factory.clock.seconds() - self._arrival_since
                self._arrival_since = None

    def _request_arriving(self) -> bool:
        """True while part of a request has arrived and the rest is awaited."""
        if self.phase is Phase.IDLE:
            return self._codec.buffered_size > 0
        current = self._current
        return self.phase is Phase.REQUEST and current is not None and not current.finished

    def _arrival_left(self, now: float) -> Optional[float]:
        """Seconds the request now arriving may still take before it is too slow; None without a rate limit.

        A request may wait on its client ``--request-grace`` seconds, and
        one more second for each ``--min-request-rate`` bytes of it that
        came: a client that sends a byte now and then to keep a request
        open is cut off, a slow but steady upload is not. Time the server
        spent not reading (running the request, its transport full) does
        not count.
        """
        rate = self.factory.min_request_rate
        if not rate or self._arrival_since is None:
            return None
        arrived = self._bytes_received - self._bytes_before_message
        allowed = self.factory.request_grace + arrived / rate
        return allowed - self._arrival_waited - (now - self._arrival_since)

    def _idle_timer_due(self, seconds: float) -> None:
        """Have the connection's timer fire within ``seconds``, sooner than it would."""
        timer = self._idle_timer
        if timer is None:
            self._idle_timer = self.factory.clock.callLater(max(0.0, seconds), self._idle_timer_fired)
        elif timer.getTime() > self.factory.clock.seconds() + seconds:
            timer.reset(max(0.0, seconds))

    def _restart_idle_timer(self) -> None:
        """The peer sent something: waiting starts afresh."""
        if self._waiting_since is not None:
            self._waiting_since = self.factory.clock.seconds()

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None
        self._waiting_since = None

    def _idle_timer_fired(self) -> None:
        self._idle_timer = None
        since = self._waiting_since
        if self._closing or since is None:
            return  # busy: the timer is armed again once the connection waits
        now = self.factory.clock.seconds()
        arrival_left = self._arrival_left(now)
        if arrival_left is not None and arrival_left <= 0:
            self._arrived_too_slowly(now)
            return
        timeout = self.factory.idle_timeout
        remaining = since + timeout - now if timeout else None
        if remaining is not None and remaining <= 0:
            self._idle_timed_out()
            return
        if arrival_left is not None and (remaining is None or arrival_left < remaining):
            remaining = arrival_left
        if remaining is not None:
            self._idle_timer = self.factory.clock.callLater(remaining, self._idle_timer_fired)

    def _arrived_too_slowly(self, now: float) -> None:
        self._update_peer()
        log.info(
            "Closing connection {connection_id} from {peer}: {received} bytes of a request in {seconds:.0f} s, "
            "slower than --min-request-rate {rate} bytes/s after --request-grace {grace:g} s",
            connection_id=self.connection_id,
            peer=self.caller.peer,
            received=self._bytes_received - self._bytes_before_message,
            seconds=self._arrival_waited + now - self._arrival_since,
            rate=self.factory.min_request_rate,
            grace=self.factory.request_grace,
        )
        self.abort()

    def _idle_timed_out(self) -> None:
        self._update_peer()
        log.info(
            "Closing connection {connection_id} from {peer}: idle for {timeout} s",
            connection_id=self.connection_id,
            peer=self.caller.peer,
            timeout=self.factory.idle_timeout,
        )
        self.abort()


class ClosedAtOnce(Protocol):
    """Closes its connection as soon as it is made: how a factory refuses one (too many open, or draining)."""

    def connectionMade(self) -> None:
        self.transport.loseConnection()


# Bytes a turned-away connection may send before it is closed anyway, and
# how many turned-away connections may linger at once.
TURNED_AWAY_MAX_BYTES = 1 << 20
MAX_TURNED_AWAY = 64


def _answer_unread_and_close(transport, error_args: tuple, clock):
    """Answer a request the server did not read with the error ``error_args``, and close without a reset.

    The sending side is shut down at once; the caller reads and drops what
    comes until the client closes, or for ``CLOSE_LINGER`` seconds, when the
    returned timer closes the connection. Closing a socket with input
    unread resets the connection, which can destroy the answer before the
    client has read it. A transport that cannot shut down its sending side
    alone (``_can_half_close``) is closed at once, and None is returned.
    """
    transport.write(error_response(error_args))
    if not _can_half_close(transport):
        transport.loseConnection()
        return None
    transport.loseWriteConnection()
    return clock.callLater(CLOSE_LINGER, transport.loseConnection)


def _can_half_close(transport) -> bool:
    """Whether ``transport`` can shut down its sending side alone, as TCP can."""
    return hasattr(transport, "loseWriteConnection")


class TurnedAway(Protocol):
    """Answers a bzr:// connection over the limit with ``TooManyConnections`` and closes it, reading no request.

    The error goes out first thing, so a client learns that nothing it sent
    was run, and may send it again later, whatever the verb; a bare close
    left it not knowing whether an ``append`` had been applied. The server
    then closes its side and reads and drops what the client sends for up
    to ``CLOSE_LINGER`` seconds (``_answer_unread_and_close``).
    """

    def __init__(self, factory: "SmartServerFactory", open_count: int):
        self.factory = factory
        self.open_count = open_count
        self._dropped = 0
        self._timer = None

    def connectionMade(self) -> None:
        self.factory.turned_away.add(self)
        message = f"the server has {self.open_count} bzr:// connections open, its limit; try again later"
        self._timer = _answer_unread_and_close(self.transport, (TOO_MANY_CONNECTIONS, message.encode()), self.factory.clock)

    def dataReceived(self, data: bytes) -> None:
        self._dropped += len(data)
        if self._dropped > TURNED_AWAY_MAX_BYTES:
            self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self.factory.turned_away.discard(self)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()


@implementer(IDrainable)
class SmartServerFactory(QuietFactory):
    """Builds a ``SmartServerProtocol`` per connection and keeps track of them.

    Over bzr:// (TCP) there is no user: callers get ``tcp_writable`` rights,
    read-only unless the operator allows writes. SSH sessions call
    ``build_protocol`` with the authenticated caller. ``metrics``, a
    ``smartserve.metrics.ServerMetrics``, counts every finished or aborted
    request when given. ``drain_linger`` is the seconds a draining server
    waits for the next request on an idle connection before closing it;
    ``drain_spread`` spreads the end of that wait over so many more seconds,
    a random moment per connection, for connections that never go idle that
    long (clients of a busy server would otherwise all reconnect at once).
    ``access_log`` is the ``Logger`` that gets each request's access event
    (the global log publisher unless given). ``max_request_memory`` bounds
    the request bodies all its connections hold together (``body_memory``,
    a ``RequestBodyMemory``; 0: counted, not bounded), and
    ``max_request_memory_per_caller`` those of one caller (``Caller.who``).

    ``hold_response_bytes``: a streamed response is written only once its
    stream has ended or that much of it is made (0: from its first slice).
    A server killed while making a response it held has sent nothing of it,
    and a client, even an unmodified ``brz``, may then resend a read;
    once a client has the response tuple, ``brz`` cannot resend.
    """

    protocol = SmartServerProtocol

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        clock=None,
        idle_timeout: float = 300.0,
        limits: Optional[Limits] = None,
        tcp_writable: Writable = Writable.nowhere(),
        metrics=None,
        drain_linger: float = 0.0,
        drain_spread: float = 0.0,
        access_log=DEFAULT_ACCESS_LOG,
        max_bzr_connections: int = 0,
        max_bzr_connections_per_address: int = 0,
        max_request_memory: int = 0,
        hold_response_bytes: int = DEFAULT_HOLD_RESPONSE_BYTES,
        max_request_memory_per_caller: int = 0,
        min_request_rate: int = 0,
        request_grace: float = DEFAULT_REQUEST_GRACE,
    ):
        if clock is None:
            from twisted.internet import reactor as clock
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.drain_linger = drain_linger
        self.drain_spread = drain_spread
        self.random = random.Random()
        self.access_log = access_log
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.min_request_rate = min_request_rate
        self.request_grace = request_grace
        self.limits = limits or DEFAULT_LIMITS
        self.tcp_writable = tcp_writable
        self.connections = OpenConnections()
        self.max_bzr_connections = max_bzr_connections
        self.max_bzr_connections_per_address = max_bzr_connections_per_address
        self.body_memory = RequestBodyMemory(max_request_memory, max_request_memory_per_caller)
        self.hold_response_bytes = hold_response_bytes
        self._bzr_by_host: collections.Counter = collections.Counter()
        self._refusing_hosts: set = set()  # addresses whose connections are being turned away
        self._bzr_connections: set = set()
        self.turned_away: set = set()  # connections turned away (over a limit) still lingering
        self.refused_bzr_connections = 0
        self._refused_in_a_row = 0  # since the last bzr:// connection accepted
        self.requests_by_class: collections.Counter = collections.Counter()
        self._ids = itertools.count(1)
        self._draining = False

    def buildProtocol(self, addr) -> Protocol:
        """A protocol for a bzr:// connection, or one that turns it away when there are too many (``TurnedAway``).

        Past ``MAX_TURNED_AWAY`` connections turned away and not yet closed,
        further ones are closed at once, without the error. The log says
        when refusing starts and when it stops, with the count, rather than
        a line per connection that a flood would turn into a flood of lines;
        ``refused_bzr_connections`` counts them all for ``/metrics``.
        """
        if self.max_bzr_connections and len(self._bzr_connections) >= self.max_bzr_connections:
            count = len(self._bzr_connections)
            self.refused_bzr_connections += 1
            self._refused_in_a_row += 1
            if self._refused_in_a_row == 1:
                log.warn(
                    "refusing bzr:// connections: {count} open, the limit (--bzr-max-connections); "
                    "the first from {peer}",
                    peer=peer_text(addr),
                    count=count,
                )
            if len(self.turned_away) >= MAX_TURNED_AWAY:
                return ClosedAtOnce()
            return TurnedAway(self, count)
        if self._refused_in_a_row:
            log.info("accepting bzr:// connections again; {refused} refused meanwhile", refused=self._refused_in_a_row)
            self._refused_in_a_row = 0
        return self.build_protocol(Caller(None, "", self.tcp_writable))

    def build_protocol(self, caller: Caller, carried_by=None) -> SmartServerProtocol:
        """A protocol serving ``caller``; connect it to a transport to start.

        ``carried_by`` is the client connection the protocol runs inside
        (an SSH session's SSH connection), if any: the drain counts and
        aborts that connection, not this protocol.
        """
        protocol = self.protocol(self, caller, next(self._ids), carried_by)
        if self._draining:
            protocol.drain()
        return protocol

    def connection_made(self, protocol: SmartServerProtocol) -> None:
        """Called by a protocol once it is connected."""
        self.connections.add(protocol)
        if protocol.caller.user is None:
            self._bzr_connections.add(protocol)

    def connection_lost(self, protocol: SmartServerProtocol) -> None:
        """Called by a protocol once its connection is gone."""
        self.connections.discard(protocol)
        self._bzr_connections.discard(protocol)
        host = protocol.counted_host
        if host is not None:
            protocol.counted_host = None
            self._bzr_by_host[host] -= 1
            if not self._bzr_by_host[host]:
                del self._bzr_by_host[host]

    def admit_bzr_host(self, host: str) -> Optional[str]:
        """Count one more bzr:// connection from ``host``, or return why it is refused.

        ``host`` may have ``max_bzr_connections_per_address`` open at once.
        The log says when an address starts being refused and when it is
        accepted again, not a line per connection; ``refused_bzr_connections``
        counts every refusal.
        """
        count = self._bzr_by_host[host]
        if count >= self.max_bzr_connections_per_address:
            self.refused_bzr_connections += 1
            if host not in self._refusing_hosts:
                self._refusing_hosts.add(host)
                log.warn(
                    "refusing bzr:// connections from {host}: {count} open from there, the limit "
                    "(--bzr-max-connections-per-address)",
                    host=host,
                    count=count,
                )
            return f"the server has {count} bzr:// connections open from your address, its limit; try again later"
        if host in self._refusing_hosts:
            self._refusing_hosts.discard(host)
            log.info("accepting bzr:// connections from {host} again", host=host)
        self._bzr_by_host[host] = count + 1
        return None

    def request_finished(self, protocol: SmartServerProtocol, record: RequestRecord) -> None:
        """Called after each request's last response byte was written."""
        self.requests_by_class[record.verb_class] += 1
        if self.metrics is not None:
            self.metrics.request_finished(record)

    def request_aborted(self, protocol: SmartServerProtocol, record: RequestRecord) -> None:
        """Called when a connection is lost while one of its requests is running."""
        if self.metrics is not None:
            self.metrics.request_finished(record)

    @property
    def open_connections(self) -> int:
        """Smart sessions open now: bzr:// connections and SSH sessions."""
        return len(self.connections)

    @property
    def busy_connections(self) -> int:
        """Smart sessions running a request now."""
        return sum(1 for protocol in self.connections if protocol.busy)

    @property
    def client_connections(self) -> int:
        """Connections of its own open now (bzr://); SSH sessions count with their SSH connection."""
        return sum(1 for protocol in self.connections if protocol.carried_by is None)

    @property
    def busy_client_connections(self) -> int:
        """Connections of its own running a request now."""
        return sum(1 for protocol in self.connections if protocol.carried_by is None and protocol.busy)

    def abort(self) -> int:
        """Abort every open connection of its own; returns how many.

        SSH sessions are left to their SSH connection, which the SSH
        factory aborts (and counts): they end with it.
        """
        protocols = [protocol for protocol in self.connections if protocol.carried_by is None]
        for protocol in protocols:
            protocol.abort()
        return len(protocols)

    def drain(self) -> defer.Deferred:
        """Drain every connection; fires once none is left."""
        self._draining = True
        for protocol in self.connections:
            protocol.drain()
        return self.wait_closed()

    def wait_closed(self) -> defer.Deferred:
        """A Deferred that fires once no connection is left."""
        return self.connections.wait_empty()

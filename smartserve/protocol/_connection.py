"""The sans-IO connection: bytes in, events out; events in, bytes out."""

from __future__ import annotations

from typing import Optional, Union

from ._events import BodyChunk, ConnectionClosed, Event, Request, Response
from ._exceptions import (
    LimitExceeded,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    UnsupportedProtocolVersion,
)
from ._limits import DEFAULT_LIMITS, Limits
from ._readers import MessageReader
from ._receivebuffer import ReceiveBuffer
from ._state import Role, State, transitions_for
from ._writers import WRITERS, body_part_header, error_response

__all__ = ["Connection", "NEED_DATA", "PAUSED"]


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str):
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")
"""``next_event`` needs more bytes before it can return an event."""

PAUSED = _Sentinel("PAUSED")
"""``next_event`` will return nothing more until ``start_next_cycle``."""


_TRANSITIONS = {role: transitions_for(role) for role in Role}

# Module-level names for the members, as an Enum attribute lookup is slow.
_IDLE = State.IDLE
_BODY = State.BODY
_DONE = State.DONE
_CLOSED = State.CLOSED
_ERROR = State.ERROR


def _other(role: Role) -> Role:
    return Role.SERVER if role is Role.CLIENT else Role.CLIENT


class Connection:
    """One end of a smart protocol version 3 connection.

    Feed received bytes to ``receive_data`` (``b""`` means the peer closed
    its side), then call ``next_event`` until it returns ``NEED_DATA``.
    ``send`` turns an event into the bytes to write. A server whose peer
    breaks the protocol finds the error reply to write in ``data_to_send``.
    """

    def __init__(self, our_role: Role, limits: Limits = DEFAULT_LIMITS):
        self.our_role = our_role
        self.their_role = _other(our_role)
        self.limits = limits
        self._our_state = _IDLE
        self._their_state = _IDLE
        self._our_transitions = _TRANSITIONS[our_role]
        self._their_transitions = _TRANSITIONS[self.their_role]
        self._buffer = ReceiveBuffer()
        self._reader = MessageReader(self.their_role, limits)
        self._their_eof = False
        self._request_in_cycle = False
        self._outgoing = b""

    @property
    def our_state(self) -> State:
        """The state of the messages we send."""
        return self._our_state

    @property
    def their_state(self) -> State:
        """The state of the messages the peer sends."""
        return self._their_state

    @property
    def their_eof(self) -> bool:
        """Whether the peer's EOF has been fed in, processed or not."""
        return self._their_eof

    @property
    def buffered_size(self) -> int:
        """How many received bytes no event has consumed yet."""
        return len(self._buffer)

    @property
    def trailing_data(self) -> bytes:
        """Received bytes that no event has consumed yet."""
        return self._buffer.peek(len(self._buffer))

    def receive_data(self, data: bytes) -> None:
        """Add bytes received from the peer; ``b""`` means EOF.

        Raises ``RemoteProtocolError`` for data after EOF, and
        ``LimitExceeded`` when, while the peer's message is complete and
        ``start_next_cycle`` has not been called, the bytes held would go
        over ``limits.max_pipelined_size``; the data is then dropped and
        the connection unusable, as after an error from ``next_event``.
        """
        if not data:
            self._their_eof = True
            return
        if self._their_eof:
            raise RemoteProtocolError("data received after EOF")
        if self._their_state is _DONE:
            held = len(self._buffer) + len(data)
            if held > self.limits.max_pipelined_size:
                exc = LimitExceeded("pipelined data", held, self.limits.max_pipelined_size)
                self._fail_remote(exc)
                raise exc
        self._buffer.append(data)

    def next_event(self) -> Union[Event, _Sentinel]:
        """Parse the next event out of the received bytes.

        Returns an event, ``NEED_DATA`` or ``PAUSED`` (the peer's message is
        complete; call ``start_next_cycle`` first). Raises
        ``RemoteProtocolError`` if the peer broke the protocol; after that
        the connection is unusable.
        """
        state = self._their_state
        if state is _DONE:
            if self._their_eof and not self._buffer:
                return self._process_received(ConnectionClosed())
            return PAUSED
        if state is _ERROR:
            raise RemoteProtocolError("cannot receive after a protocol error")
        if state is _CLOSED:
            return ConnectionClosed()
        try:
            event = self._reader.read(self._buffer)
            if event is None:
                if not self._their_eof:
                    return NEED_DATA
                if self._reader.between_messages and not self._buffer and state is _IDLE:
                    event = ConnectionClosed()
                else:
                    raise RemoteProtocolError("connection closed in the middle of a message")
            event_type = type(event)
            new_state = self._their_transitions[state].get(event_type)
            if new_state is None or (event_type is Response and not self._request_in_cycle):
                return self._process_received(event)
            self._their_state = new_state
            if event_type is Request:
                self._request_in_cycle = True
            return event
        except RemoteProtocolError as exc:
            self._fail_remote(exc)
            raise

    def next_message(self) -> Optional[list]:
        """All events of the peer's next message at once, or None.

        The same events ``next_event`` would return one by one, ending
        with ``EndOfMessage``, when the received bytes hold the whole
        message in one piece with nothing unusual about it: the common
        case of a small message, parsed in one pass. None means nothing
        was consumed; call ``next_event`` instead.
        """
        if self._their_state is not _IDLE or self._their_eof:
            return None
        if not self._request_in_cycle and self.their_role is Role.SERVER:
            return None  # a response to no request: next_event names the error
        events = self._reader.read_whole_message(self._buffer)
        if events is None:
            return None
        self._their_state = _DONE
        self._request_in_cycle = True
        return events

    def send(self, event: Event) -> bytes:
        """Return the bytes that send ``event``.

        Raises ``LocalProtocolError`` if the protocol does not allow
        ``event`` now, or if bencode cannot carry its arguments; the state
        is then unchanged.
        """
        event_type = type(event)
        new_state = self._our_transitions[self._our_state].get(event_type)
        if new_state is None or (event_type is Response and not self._request_in_cycle):
            self._refuse(event_type)
        data = WRITERS[event_type](event)
        self._our_state = new_state
        if event_type is Request:
            self._request_in_cycle = True
        return data

    def send_message(self, opening: Union[Request, Response], body: Optional[bytes] = None) -> list:
        """The byte strings, in order, that send a whole message at once.

        The same bytes as ``send`` of ``opening``, of ``body`` as one
        ``BodyChunk`` when it is given, and of ``EndOfMessage``, for the
        common message that is ready whole. ``body`` is one of the strings,
        not copied. Raises as ``send`` does, the state then unchanged.
        """
        if self._check_ours(type(opening)) is not _BODY:
            raise LocalProtocolError(f"a message opens with a request or a response, not {type(opening).__name__}")
        head = WRITERS[type(opening)](opening)
        if body is not None:
            head += body_part_header(body)
        self._our_state = _DONE
        self._request_in_cycle = True
        if body is None:
            return [head + b"e"]
        return [head, body, b"e"]

    def send_with_data_passthrough(self, event: Event) -> list:
        """Like ``send``, but return a list of byte strings to write in order.

        A ``BodyChunk``'s data is one of them, not copied, so large bodies
        can be written without joining them to their part header.
        """
        if type(event) is BodyChunk:
            new_state = self._check_ours(BodyChunk)
            header = body_part_header(event.data)
            self._our_state = new_state
            return [header, event.data]
        return [self.send(event)]

    def send_failed(self) -> None:
        """Record that sending broke off mid-message; nothing more can be sent."""
        self._our_state = _ERROR

    def start_next_cycle(self) -> None:
        """Reset both directions to IDLE after a complete request/response.

        Raises ``LocalProtocolError`` unless both messages are DONE.
        """
        if self._our_state is not _DONE or self._their_state is not _DONE:
            raise LocalProtocolError(
                f"not done: we are {self.our_state.name}, they are {self.their_state.name}"
            )
        self._our_state = self._their_state = _IDLE
        self._reader.reset()
        self._request_in_cycle = False

    def take_rest_in_pieces(self) -> None:
        """Hand on the rest of the peer's current message's body parts as their bytes arrive.

        For a receiver that will drop that body (it refused the message):
        no part is then held until it is whole, whatever its size. The next
        message is read as ``limits`` say again.
        """
        self._reader.hand_on_in_pieces()

    def data_to_send(self) -> bytes:
        """Bytes produced by receiving, such as an error reply; taken once."""
        data, self._outgoing = self._outgoing, b""
        return data

    def _check_ours(self, event_type: type) -> State:
        new_state = self._our_transitions[self._our_state].get(event_type)
        if new_state is None or (event_type is Response and not self._request_in_cycle):
            self._refuse(event_type)
        return new_state

    def _refuse(self, event_type: type) -> None:
        state = self._our_state
        if state is _ERROR:
            raise LocalProtocolError("cannot send after a protocol error")
        if self._our_transitions[state].get(event_type) is not None:
            raise LocalProtocolError("a response must follow a request")
        raise LocalProtocolError(
            f"{event_type.__name__} not allowed when the {self.our_role.value} is {state.name}"
        )

    def _process_received(self, event: Event) -> Event:
        event_type = type(event)
        state = self._their_state
        new_state = self._their_transitions[state].get(event_type)
        if new_state is None:
            raise RemoteProtocolError(
                f"{event_type.__name__} not allowed when the {self.their_role.value} is {state.name}"
            )
        if event_type is Response and not self._request_in_cycle:
            raise RemoteProtocolError("a response must follow a request")
        self._their_state = new_state
        if event_type is Request:
            self._request_in_cycle = True
        return event

    def _fail_remote(self, exc: ProtocolError) -> None:
        if self.our_role is Role.SERVER and self._our_state is _IDLE:
            if isinstance(exc, UnsupportedProtocolVersion):
                self._outgoing += exc.reply
            else:
                self._outgoing += error_response(exc.error_args)
        self._our_state = self._their_state = _ERROR

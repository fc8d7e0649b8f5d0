"""The sans-IO connection: bytes in, events out; events in, bytes out."""

from __future__ import annotations

from typing import Union

from ._events import ConnectionClosed, Event, Request, Response
from ._exceptions import LocalProtocolError, ProtocolError, RemoteProtocolError, UnsupportedProtocolVersion
from ._limits import DEFAULT_LIMITS, Limits
from ._readers import MessageReader
from ._receivebuffer import ReceiveBuffer
from ._state import Role, State, next_state
from ._writers import WRITERS, error_response

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
        self._states = {Role.CLIENT: State.IDLE, Role.SERVER: State.IDLE}
        self._buffer = ReceiveBuffer()
        self._reader = MessageReader(self.their_role, limits)
        self._their_eof = False
        self._request_in_cycle = False
        self._outgoing = b""

    @property
    def our_state(self) -> State:
        """The state of the messages we send."""
        return self._states[self.our_role]

    @property
    def their_state(self) -> State:
        """The state of the messages the peer sends."""
        return self._states[self.their_role]

    @property
    def their_eof(self) -> bool:
        """Whether the peer's EOF has been fed in, processed or not."""
        return self._their_eof

    @property
    def trailing_data(self) -> bytes:
        """Received bytes that no event has consumed yet."""
        return self._buffer.slice(0, len(self._buffer))

    def receive_data(self, data: bytes) -> None:
        """Add bytes received from the peer; ``b""`` means EOF.

        Raises ``RemoteProtocolError`` for data after EOF.
        """
        if not data:
            self._their_eof = True
            return
        if self._their_eof:
            raise RemoteProtocolError("data received after EOF")
        self._buffer.append(data)

    def next_event(self) -> Union[Event, _Sentinel]:
        """Parse the next event out of the received bytes.

        Returns an event, ``NEED_DATA`` or ``PAUSED`` (the peer's message is
        complete; call ``start_next_cycle`` first). Raises
        ``RemoteProtocolError`` if the peer broke the protocol; after that
        the connection is unusable.
        """
        state = self.their_state
        if state is State.ERROR:
            raise RemoteProtocolError("cannot receive after a protocol error")
        if state is State.CLOSED:
            return ConnectionClosed()
        if state is State.DONE:
            if self._their_eof and not self._buffer:
                return self._process_received(ConnectionClosed())
            return PAUSED
        try:
            event = self._reader.read(self._buffer)
            if event is None:
                if not self._their_eof:
                    return NEED_DATA
                if self._reader.between_messages and not self._buffer and state is State.IDLE:
                    event = ConnectionClosed()
                else:
                    raise RemoteProtocolError("connection closed in the middle of a message")
            return self._process_received(event)
        except RemoteProtocolError as exc:
            self._fail_remote(exc)
            raise

    def send(self, event: Event) -> bytes:
        """Return the bytes that send ``event``.

        Raises ``LocalProtocolError`` if the protocol does not allow
        ``event`` now; the state is then unchanged.
        """
        if self.our_state is State.ERROR:
            raise LocalProtocolError("cannot send after a protocol error")
        new_state = self._check(self.our_role, event)
        data = WRITERS[type(event)](event)
        self._advance(self.our_role, event, new_state)
        return data

    def send_failed(self) -> None:
        """Record that sending broke off mid-message; nothing more can be sent."""
        self._states[self.our_role] = State.ERROR

    def start_next_cycle(self) -> None:
        """Reset both directions to IDLE after a complete request/response.

        Raises ``LocalProtocolError`` unless both messages are DONE.
        """
        if self.our_state is not State.DONE or self.their_state is not State.DONE:
            raise LocalProtocolError(
                f"not done: we are {self.our_state.name}, they are {self.their_state.name}"
            )
        self._states[Role.CLIENT] = self._states[Role.SERVER] = State.IDLE
        self._reader.reset()
        self._request_in_cycle = False

    def data_to_send(self) -> bytes:
        """Bytes produced by receiving, such as an error reply; taken once."""
        data, self._outgoing = self._outgoing, b""
        return data

    def _check(self, sender: Role, event: Event) -> State:
        error = LocalProtocolError if sender is self.our_role else RemoteProtocolError
        state = self._states[sender]
        new_state = next_state(sender, state, type(event))
        if new_state is None:
            raise error(f"{type(event).__name__} not allowed when the {sender.value} is {state.name}")
        if type(event) is Response and not self._request_in_cycle:
            raise error("a response must follow a request")
        return new_state

    def _advance(self, sender: Role, event: Event, new_state: State) -> None:
        self._states[sender] = new_state
        if type(event) is Request:
            self._request_in_cycle = True

    def _process_received(self, event: Event) -> Event:
        self._advance(self.their_role, event, self._check(self.their_role, event))
        return event

    def _fail_remote(self, exc: ProtocolError) -> None:
        if self.our_role is Role.SERVER and self.our_state is State.IDLE:
            if isinstance(exc, UnsupportedProtocolVersion):
                self._outgoing += exc.reply
            else:
                self._outgoing += error_response(exc.error_args)
        self._states[Role.CLIENT] = self._states[Role.SERVER] = State.ERROR

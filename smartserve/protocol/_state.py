"""The message state machine, written once for either peer.

Theory of operation
-------------------

A connection carries one message at a time in each direction: the client
sends a request, the server answers with a response, and only then may the
next request start (``Connection.start_next_cycle``). Each direction has its
own state. Both directions follow the same table; what differs by role is
only which event may open a message: a client opens with ``Request``, a
server with ``Response``. A server may not open a response before it has
received a request, and a client may not receive one before it has sent a
request.

The table ``TRANSITIONS`` maps ``(state, event type)`` to the next state.
An event missing from the table for the current state is a protocol error:
a ``LocalProtocolError`` when we tried to send it, a ``RemoteProtocolError``
when the peer did.
"""

from __future__ import annotations

import enum

from ._events import (
    BodyChunk,
    BodyError,
    ConnectionClosed,
    EndOfMessage,
    Request,
    Response,
)

__all__ = ["Role", "State", "TRANSITIONS", "OPENING_EVENT", "next_state", "transitions_for"]


class Role(enum.Enum):
    """Which end of the connection we are."""

    CLIENT = "client"
    SERVER = "server"

    # Members are singletons, so identity is equality; Enum's own hash runs
    # Python code on every dictionary lookup.
    __hash__ = object.__hash__


class State(enum.Enum):
    """Where one direction of a connection stands."""

    IDLE = "IDLE"  # between messages
    BODY = "BODY"  # arguments sent; body chunks, an error or the end may follow
    TRAILER = "TRAILER"  # a body error was sent; only the end may follow
    DONE = "DONE"  # the message ended; waiting for start_next_cycle
    CLOSED = "CLOSED"  # the sender closed its side
    ERROR = "ERROR"  # a protocol error happened; nothing more is understood

    __hash__ = object.__hash__


OPENING_EVENT = {Role.CLIENT: Request, Role.SERVER: Response}

_OPEN = "open"  # stands for the sender's opening event in the table

TRANSITIONS = {
    State.IDLE: {_OPEN: State.BODY, ConnectionClosed: State.CLOSED},
    State.BODY: {
        BodyChunk: State.BODY,
        BodyError: State.TRAILER,
        EndOfMessage: State.DONE,
    },
    State.TRAILER: {EndOfMessage: State.DONE},
    State.DONE: {ConnectionClosed: State.CLOSED},
    State.CLOSED: {},
    State.ERROR: {},
}


def next_state(sender: Role, state: State, event_type: type) -> State | None:
    """The state after ``sender`` produces ``event_type`` in ``state``.

    Returns None when the table does not allow it.
    """
    row = TRANSITIONS[state]
    if event_type is OPENING_EVENT[sender]:
        return row.get(_OPEN)
    return row.get(event_type)


def transitions_for(sender: Role) -> dict:
    """``TRANSITIONS`` for messages sent by ``sender``, keyed by event type.

    The same table with the opening event spelled out, so that one lookup
    per event answers ``next_state``.
    """
    opening = OPENING_EVENT[sender]
    return {
        state: {(opening if key == _OPEN else key): new for key, new in row.items()}
        for state, row in TRANSITIONS.items()
    }

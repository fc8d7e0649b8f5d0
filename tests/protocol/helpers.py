"""Shared pieces for the codec tests: a connection pair and Breezy's side."""

from __future__ import annotations

from breezy.bzr.smart import message
from breezy.bzr.smart import protocol as breezy_protocol

from smartserve.protocol import (
    MESSAGE_MARKER,
    NEED_DATA,
    PAUSED,
    BodyChunk,
    BodyError,
    Connection,
    ConnectionClosed,
    EndOfMessage,
    Request,
    Response,
    Role,
)
from smartserve.protocol._wire import LENGTH

HELLO = [Request((b"hello",)), EndOfMessage()]


def prefixed(data: bytes) -> bytes:
    """``data`` after its 4-byte big-endian length, as the wire carries it."""
    return LENGTH.pack(len(data)) + data


def receive_all(conn: Connection, data: bytes = b"") -> list:
    """Feed ``data`` to ``conn`` and return every event it can produce now."""
    if data:
        conn.receive_data(data)
    events = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA or event is PAUSED:
            return events
        events.append(event)
        if type(event) is ConnectionClosed:
            return events


def send_all(conn: Connection, events) -> bytes:
    """The bytes ``conn`` writes to send ``events`` in order."""
    return b"".join(conn.send(event) for event in events)


def sender(role: Role, **kwargs) -> Connection:
    """A connection of ``role`` ready to open a message.

    A server first receives a request, since a response must answer one.
    """
    conn = Connection(role, **kwargs)
    if role is Role.SERVER:
        assert receive_all(conn, send_all(Connection(Role.CLIENT), HELLO)) == HELLO
    return conn


def receiver(sender_role: Role, **kwargs) -> Connection:
    """A connection ready to receive a message sent by ``sender_role``.

    A client first sends a request, since a response must answer one.
    """
    if sender_role is Role.CLIENT:
        return Connection(Role.SERVER, **kwargs)
    conn = Connection(Role.CLIENT, **kwargs)
    send_all(conn, HELLO)
    return conn


class ConnectionPair:
    """A client and a server connection wired to each other in memory."""

    def __init__(self, **kwargs) -> None:
        self.conn = {role: Connection(role, **kwargs) for role in Role}

    @property
    def client(self) -> Connection:
        """The client end."""
        return self.conn[Role.CLIENT]

    @property
    def server(self) -> Connection:
        """The server end."""
        return self.conn[Role.SERVER]

    def other(self, role: Role) -> Role:
        """The role at the other end from ``role``."""
        return Role.SERVER if role is Role.CLIENT else Role.CLIENT

    def send(self, role: Role, events, expect="match") -> bytes:
        """Send ``events`` from ``role``'s side and check what the peer reads.

        ``expect`` is the list of events the peer must get, or "match" for
        the events sent. Returns the bytes that went over the wire.
        """
        data = send_all(self.conn[role], events)
        got = receive_all(self.conn[self.other(role)], data)
        assert got == (list(events) if expect == "match" else expect)
        return data

    def start_next_cycle(self) -> None:
        """Start the next request/response cycle on both ends."""
        self.client.start_next_cycle()
        self.server.start_next_cycle()


# Breezy's side ----------------------------------------------------------


class MediumRequest:
    """The medium request Breezy's client protocols write to and read from.

    What they write is kept in ``written``; they read ``reply``.
    """

    def __init__(self, reply: bytes = b"") -> None:
        self.written = b""
        self._reply = reply
        self.finished = False

    def accept_bytes(self, data: bytes) -> None:
        self.written += data

    def finished_writing(self) -> None:
        pass

    def finished_reading(self) -> None:
        self.finished = True

    def read_bytes(self, count: int) -> bytes:
        data, self._reply = self._reply[:count], self._reply[count:]
        return data

    def read_line(self) -> bytes:
        line, newline, self._reply = self._reply.partition(b"\n")
        return line + newline


class EventRecorder(message.MessageHandler):
    """A Breezy message handler that turns the parts it gets into our events.

    ``sender`` says whose message it decodes: a response has a status byte
    before its arguments.
    """

    def __init__(self, sender: Role) -> None:
        super().__init__()
        self.sender = sender
        self.events: list = []
        self._success = None
        self._opened = False
        self._stream_error = False

    def byte_part_received(self, byte):
        if self._opened:
            self._stream_error = byte == b"E"
        else:
            self._success = byte == b"S"

    def bytes_part_received(self, data):
        self.events.append(BodyChunk(data))

    def structure_part_received(self, structure):
        if self._stream_error:
            self.events.append(BodyError(structure))
        elif self.sender is Role.CLIENT:
            self.events.append(Request(structure, self.headers))
        else:
            self.events.append(Response(structure, self._success, self.headers))
        self._opened = True

    def end_received(self):
        self.events.append(EndOfMessage())


def breezy_decode(sender: Role, data: bytes, pieces: int = 1) -> list:
    """The events Breezy's own decoder finds in ``data``, fed in ``pieces``."""
    recorder = EventRecorder(sender)
    decoder = breezy_protocol.ProtocolThreeDecoder(recorder, expect_version_marker=True)
    step = max(1, -(-len(data) // pieces))
    for start in range(0, len(data), step):
        decoder.accept_bytes(data[start : start + step])
    assert decoder.next_read_size() == 0, "Breezy's decoder wants more bytes"
    assert decoder.unused_data == b""
    return recorder.events


def breezy_read_response(data: bytes) -> message.ConventionalResponseHandler:
    """Breezy's client-side response handler, reading ``data`` as a reply."""
    handler = message.ConventionalResponseHandler()
    decoder = breezy_protocol.ProtocolThreeDecoder(handler, expect_version_marker=True)
    handler.setProtoAndMediumRequest(decoder, MediumRequest(data))
    return handler


__all__ = [
    "HELLO",
    "MESSAGE_MARKER",
    "ConnectionPair",
    "EventRecorder",
    "MediumRequest",
    "breezy_decode",
    "breezy_read_response",
    "prefixed",
    "receive_all",
    "receiver",
    "send_all",
    "sender",
]


def damaged(draw, wire: bytes, insertions, fewest: int = 0) -> bytes:
    """``wire`` with ``fewest`` to four bytes flipped, dropped, cut, or replaced by an insertion drawn from ``insertions``.

    ``draw`` is a hypothesis ``@composite`` strategy's draw function.
    """
    from hypothesis import strategies as st

    damaged_wire = bytearray(wire)
    for _ in range(draw(st.integers(fewest, 4))):
        kind = draw(st.sampled_from(["flip", "drop", "insert", "cut"]))
        where = draw(st.integers(0, len(damaged_wire)))
        if kind == "flip" and where < len(damaged_wire):
            damaged_wire[where] = draw(st.integers(0, 255))
        elif kind == "drop" and where < len(damaged_wire):
            del damaged_wire[where]
        elif kind == "insert":
            damaged_wire[where:where] = draw(insertions)
        elif kind == "cut":
            del damaged_wire[where:]
    return bytes(damaged_wire)

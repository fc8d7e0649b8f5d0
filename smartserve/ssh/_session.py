"""SSH session channels: the smart server on ``exec``, a clean refusal for the rest.

The avatar adapts to Conch's ``ISession``. ``RefusingSession`` turns down
shells, ptys and any other command with one line on stderr and a non-zero
exit status; ``SmartSession`` extends it to run the smart protocol in this
process when the exec request is what ``brz`` sends over ``bzr+ssh://``.

This module is the only place that sends an ``exit-status``: 0 after a
normal end of a smart session, 75 (EX_TEMPFAIL, "try again") when the
server closed it to drain, 1 for a refused request.

Back-pressure runs both ways through the channel's windows. Outgoing: the
smart protocol is the push producer of its ``ChannelTransport``, paused
while the client's window is full (``SSHChannel.stopWriting``) and resumed
when the client adds window. Incoming: while the protocol pauses its
transport, the connection withholds window adjustments, so the client can
send at most one window more, and what arrives is held until it resumes.
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Callable

from twisted.conch.interfaces import ISession
from twisted.conch.ssh import common, connection
from twisted.conch.ssh.session import SSHSession, SSHSessionProcessProtocol
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..server.caller import Caller
from ..server.jail import Writable
from .._sending import send_now
from ._access import Rights
from ._command import parse_serve_command
from ._exceptions import CommandRefused
from ._trace import conch_logger

__all__ = [
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_TEMPFAIL",
    "ChannelTransport",
    "RefusingSession",
    "SessionChannel",
    "SmartSession",
    "writable_for",
]

_log = Logger()

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_TEMPFAIL = 75

# One window's worth of the client's data may be in flight: 1 MiB per
# channel keeps uploads streaming without letting a paused session buffer
# much.
LOCAL_WINDOW_BYTES = 1024 * 1024
CLOSE_ANSWER_SECONDS = 10.0
"""How long a client has to answer the server's channel close before its SSH connection is dropped."""
LOCAL_MAX_PACKET = 32 * 1024
# Queued output goes to the socket this much at a time, so that a socket
# that fills stops it within a piece, however large the client's window.
SEND_PIECE_BYTES = 256 * 1024

NO_SHELL = "smartserve: no shell here; use a bzr+ssh:// URL with brz"
NO_PTY = "smartserve: no terminal here"
NO_COMMAND = "smartserve: no commands here; use a bzr+ssh:// URL with brz"
NO_SUBSYSTEM = "smartserve: no subsystems here; use a bzr+ssh:// URL with brz"


def writable_for(rights: Rights, allow_writes: bool) -> Writable:
    """Return where a session may write, from the user's rights and the command.

    Without ``--allow-writes`` the session is read-only whatever the rights.
    """
    if rights.read_only or not allow_writes:
        return Writable.nowhere()
    if "/" in rights.write_prefixes:
        return Writable.everywhere()
    return Writable.under(*rights.write_prefixes)


def _log_refusal(avatar, asked: str, **fields) -> None:
    """One line for a session request refused: ``alice from HOST:PORT asked ASKED; refused``.

    ``asked`` is a literal format, its fields given as keywords.
    """
    _log.info("{user} from {peer} asked " + asked + "; refused", user=avatar.username, peer=avatar.peer, **fields)


class SessionChannel(SSHSession):
    """A session channel whose in-process client can use the windows for flow control."""

    _log = conch_logger()

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("localWindow", LOCAL_WINDOW_BYTES)
        kwargs.setdefault("localMaxPacket", LOCAL_MAX_PACKET)
        super().__init__(*args, **kwargs)
        self.producer: IPushProducer | None = None
        self.reading_paused = False
        self._after_reply: list[Callable[[], None]] = []
        self._when_flushed: Callable[[], None] | None = None
        self._unsent: collections.deque = collections.deque()
        self._timer = None

    def after_reply(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the reply to the current channel request is sent.

        Starting or refusing a session waits for the reply, so the client
        never sees its request answered after data, exit status or close.
        """
        self._after_reply.append(action)

    def request_answered(self) -> None:
        """Called by the connection right after it answered a channel request."""
        actions, self._after_reply = self._after_reply, []
        for action in actions:
            action()

    def when_flushed(self, action: Callable[[], None]) -> None:
        """Run ``action`` once every byte written so far has left the channel."""
        if not self._unsent and not self.extBuf:
            action()
        else:
            self._when_flushed = action

    def write(self, data: bytes) -> None:
        """Send ``data`` as far as the client's window allows; queue the rest.

        Conch's channel keeps unsent data as one string and copies all of
        it on every window adjustment, which is quadratic in the size of a
        large body. Here unsent data stays queued in the pieces it came in,
        and only the part a window takes is copied. While anything is
        queued the producer stays paused, so at most one write waits here.
        """
        if not self._unsent and len(data) <= self.remoteWindowLeft and not self._socket_full():
            super().write(data)  # the common case: a response the window takes whole
            return
        if data:
            self._unsent.append(data)
        self._send_unsent()

    def _send_unsent(self) -> None:
        unsent = self._unsent
        while unsent and self.remoteWindowLeft > 0 and not self._socket_full():
            head = unsent[0]
            size = min(len(head), self.remoteWindowLeft, SEND_PIECE_BYTES)
            if size == len(head):
                unsent.popleft()
                piece = head
            else:
                view = memoryview(head)
                piece, unsent[0] = view[:size].tobytes(), view[size:]
            super().write(piece.tobytes() if isinstance(piece, memoryview) else piece)
        if unsent and self.areWriting:
            self.areWriting = False
            self.stopWriting()
        elif unsent:
            self.stopWriting()  # a full socket, not the window, held it back

    def _socket_full(self) -> bool:
        """True while the SSH connection's socket holds more than it sends at once."""
        return getattr(getattr(self.conn, "transport", None), "sending_paused", False)

    def socket_full(self) -> None:
        """The SSH connection's socket is full: the producer waits."""
        if self.producer is not None:
            self.producer.pauseProducing()

    def socket_drained(self) -> None:
        """The SSH connection's socket sent what it held: send on, as when the client adds window."""
        was_writing = self.areWriting
        self.addWindowBytes(0)
        if was_writing and self.areWriting and not self._unsent and not self.closing:
            self.startWriting()

    def addWindowBytes(self, data: int) -> None:
        self.remoteWindowLeft += data
        self._send_unsent()
        if self._when_flushed is not None:
            self._wait_for_flush()  # the client is reading: it has the full time again
        if self.extBuf:
            queued, self.extBuf = self.extBuf, []
            for data_type, extended in queued:
                self.writeExtended(data_type, extended)
        if self._unsent:
            return
        # The producer resumes only once everything queued has gone.
        if not self.areWriting and not self.closing:
            self.areWriting = True
            self.startWriting()
        if self.closing:
            self.loseConnection()
        if self._when_flushed is not None and not self.extBuf:
            action, self._when_flushed = self._when_flushed, None
            action()

    def loseConnection(self) -> None:
        self.closing = 1
        if not self._unsent:
            self._close_sent()
            super().loseConnection()

    def _close_sent(self) -> None:
        """The channel close is about to be sent: the client has a while to answer it."""
        if not self.localClosed and not self.remoteClosed:
            self._set_timer(CLOSE_ANSWER_SECONDS, self._close_unanswered)

    def dataReceived(self, data: bytes) -> None:
        if self.client is None or self.client.transport is None:
            return  # nothing runs that would read it
        super().dataReceived(data)

    def request_exec(self, data: bytes) -> int:
        command = common.getNS(data)[0]
        return self._dedicate(lambda client: self._session.execCommand(client, command), repr(command))

    def request_shell(self, data: bytes) -> int:
        return self._dedicate(self._session.openShell, "a shell")

    def _dedicate(self, begin: Callable[[SSHSessionProcessProtocol], None], what: str) -> int:
        """Give the channel to what ``begin`` starts; 1 if it started, 0 to refuse the request.

        Conch's own request_exec and request_shell log each request at
        info level; the session logs what it does with it instead.
        """
        if self.client is not None:
            return 0  # one command or shell per channel
        client = SSHSessionProcessProtocol(self)
        try:
            begin(client)
        except Exception:
            _log.failure("could not start {what} on a session channel", what=what)
            return 0
        self.client = client
        self._cancel_timer()
        return 1

    def request_pty_req(self, data: bytes) -> int:
        _log_refusal(self.avatar, "for a terminal")
        return 0

    def request_subsystem(self, data: bytes) -> int:
        if self.client is not None:
            return 0
        _log_refusal(self.avatar, "for a subsystem")
        self.client = SSHSessionProcessProtocol(self)
        self._cancel_timer()
        self._session.refuse(self.client, NO_SUBSYSTEM)
        return 1

    def stopWriting(self) -> None:
        if self.producer is not None:
            self.producer.pauseProducing()

    def startWriting(self) -> None:
        if self.producer is not None and not self._socket_full():
            self.producer.resumeProducing()

    def channelOpen(self, specificData: bytes) -> None:
        """Wait for the exec request, for the idle timeout at most; sessions are logged when they start."""
        server = self.conn.transport.factory
        if server.idle_timeout:
            self._set_timer(server.idle_timeout, self._ran_nothing)

    def _set_timer(self, seconds: float, action: Callable[[], None]) -> None:
        self._cancel_timer()
        self._timer = self.conn.transport.factory.clock.callLater(seconds, action)

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _ran_nothing(self) -> None:
        self._timer = None
        if self.client is None and not self.closing:
            _log.info("closing a session channel of {user} that ran nothing", user=self.conn.transport.avatar.username)
            self.loseConnection()

    def abort(self) -> None:
        """Close now, dropping what the client has not taken; drop its SSH connection if the close goes unanswered.

        A client that stopped reading grants no window, so buffered output
        would never leave and a polite close would wait for it for ever.
        """
        self._unsent.clear()
        self.extBuf = []
        self._when_flushed = None
        self.buf = b""
        self._close_sent()
        super().loseConnection()

    def _close_unanswered(self) -> None:
        self._timer = None
        ssh_transport = self.conn.transport
        _log.info(
            "{user}'s client did not answer the close of a session; dropping its SSH connection",
            user=ssh_transport.avatar.username,
        )
        if ssh_transport.transport is not None:
            ssh_transport.transport.abortConnection()

    def closed(self) -> None:
        self._cancel_timer()
        super().closed()

    def closeReceived(self) -> None:
        # The client will not add window any more: what is still buffered
        # can never be sent, and waiting for it would keep the channel open.
        self._unsent.clear()
        self.extBuf = []
        self._when_flushed = None
        self.loseConnection()

    def end_with_status(self, exit_code: int) -> None:
        """Send ``exit-status`` (after the buffered output) and close the channel.

        A client that takes none of the buffered output for the idle
        timeout would keep the channel open for ever: the session is then
        aborted, its output dropped.
        """
        if self.client is None:
            self.loseConnection()
            return

        def send_status() -> None:
            # What Conch's processEnded sends, without its log line per session.
            self.conn.sendRequest(self, b"exit-status", struct.pack(">L", exit_code))
            self.loseConnection()

        self.when_flushed(send_status)
        if self._when_flushed is not None:
            self._wait_for_flush()

    def _wait_for_flush(self) -> None:
        """(Re)start waiting, for the idle timeout, for the client to take some of the output an ending session holds."""
        timeout = self.conn.transport.factory.idle_timeout
        if timeout:
            self._set_timer(timeout, self._flush_stalled)

    def _flush_stalled(self) -> None:
        self._timer = None
        _log.info(
            "{user}'s client took none of the end of a session's output for {timeout} s; aborting the session",
            user=self.conn.transport.avatar.username,
            timeout=self.conn.transport.factory.idle_timeout,
        )
        self.abort()


@implementer(ISession)
class RefusingSession:
    """A session that refuses everything: no pty, no shell, no command.

    Each refusal is accepted at the SSH level and then answered with one
    line on stderr and exit status 1, so the user sees why.
    """

    def __init__(self, avatar):
        self.avatar = avatar

    def getPty(self, term, windowSize, modes):
        raise CommandRefused(NO_PTY)

    def openShell(self, proto: SSHSessionProcessProtocol) -> None:
        _log_refusal(self.avatar, "for a shell")
        self.refuse(proto, NO_SHELL)

    def execCommand(self, proto: SSHSessionProcessProtocol, command: bytes) -> None:
        _log_refusal(self.avatar, "to run {command!r}", command=command)
        self.refuse(proto, NO_COMMAND)

    def windowChanged(self, newWindowSize) -> None:
        """Window sizes mean nothing without a terminal."""

    def eofReceived(self) -> None:
        """Nothing reads the client's input."""

    def closed(self) -> None:
        """Nothing to release."""

    def refuse(self, proto: SSHSessionProcessProtocol, message: str, exit_code: int = EXIT_REFUSED):
        """After the reply, write ``message`` on stderr and end with ``exit_code``."""
        channel: SessionChannel = proto.session

        def send() -> None:
            channel.writeExtended(connection.EXTENDED_DATA_STDERR, message.encode("utf-8") + b"\n")
            channel.end_with_status(exit_code)

        channel.after_reply(send)


@implementer(ITransport, IConsumer, IPushProducer)
class ChannelTransport:
    """The transport a smart protocol sees on a session channel.

    Writes go to the channel. It is the consumer the protocol registers
    itself on as a streaming producer, and a producer the protocol may
    pause: while paused, what the client already sent is held back (at most
    one window, since no window is granted meanwhile) and delivered, then
    the EOF if one came, on resume.
    """

    def __init__(self, channel: SessionChannel, on_close: Callable[[], None], on_abort: Callable[[], None]):
        self.channel = channel
        self.protocol = None
        self.producer: IPushProducer | None = None
        self.disconnecting = False
        self._on_close = on_close
        self._on_abort = on_abort
        self._held: list[bytes] = []
        self._held_eof = False

    def connect(self, protocol) -> None:
        """Connect ``protocol`` to this transport."""
        self.protocol = protocol
        protocol.makeConnection(self)

    def data_from_client(self, data: bytes) -> None:
        """Deliver the client's bytes, or hold them while paused."""
        if self.channel.reading_paused or self._held:
            self._held.append(data)
        elif not self.disconnecting:
            self.protocol.dataReceived(data)

    def eof_from_client(self) -> None:
        """Deliver the client's EOF after anything held back."""
        if self.channel.reading_paused or self._held:
            self._held_eof = True
            return
        if self.disconnecting:
            return
        eof = getattr(self.protocol, "eofReceived", None)
        if eof is not None:
            eof()
        else:
            self.loseConnection()

    def write(self, data: bytes) -> None:
        if not self.disconnecting and data:
            self.channel.write(data)

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def send_now(self) -> None:
        """Have the SSH connection's socket send what the channel passed on so far, now."""
        ssh_transport = getattr(self.channel.conn, "transport", None)
        socket_transport = getattr(ssh_transport, "transport", None)
        if socket_transport is not None and not self.disconnecting:
            send_now(socket_transport)

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.disconnecting = True
            self._on_close()

    def abortConnection(self) -> None:
        """End the session now, even while output waits for a client that stopped reading."""
        self.disconnecting = True
        self._on_abort()

    def getPeer(self):
        return self.channel.getPeer()

    def getHost(self):
        return self.channel.getHost()

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        if not streaming:
            raise ValueError("only streaming (push) producers are supported")
        self.producer = producer
        self.channel.producer = producer
        if not self.channel.areWriting or self.channel._socket_full():
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self.producer = None
        self.channel.producer = None

    def pauseProducing(self) -> None:
        self.channel.reading_paused = True

    def resumeProducing(self) -> None:
        channel = self.channel
        channel.reading_paused = False
        while self._held and not channel.reading_paused:
            data = self._held.pop(0)
            if not self.disconnecting:
                self.protocol.dataReceived(data)
        if channel.reading_paused:
            return
        if self._held_eof:
            self._held_eof = False
            self.eof_from_client()
        missing = channel.localWindowSize - channel.localWindowLeft
        if missing >= channel.localWindowSize // 2 and channel.conn is not None:
            channel.conn.adjustWindow(channel, missing)

    def stopProducing(self) -> None:
        self.loseConnection()


class _Inbound:
    """What the channel sees as its client's transport: input goes to ours."""

    def __init__(self, transport: ChannelTransport):
        self.transport = transport

    def write(self, data: bytes) -> None:
        self.transport.data_from_client(data)

    def loseConnection(self) -> None:
        """The channel is closing; the protocol hears of it in ``closed``."""


class SmartSession(RefusingSession):
    """Runs the smart protocol for the exec request ``brz`` sends; refuses the rest."""

    def __init__(self, avatar):
        super().__init__(avatar)
        self.protocol = None
        self._transport: ChannelTransport | None = None
        self._ended = False
        self._end_logged = False
        self._started_at = 0.0

    def execCommand(self, proto: SSHSessionProcessProtocol, command: bytes) -> None:
        user = self.avatar.username
        try:
            serve = parse_serve_command(command)
        except CommandRefused as refused:
            _log_refusal(self.avatar, "to run {command!r}", command=command)
            self.refuse(proto, str(refused))
            return
        channel: SessionChannel = proto.session
        rights = self.avatar.server.access.rights_for(user)
        caller = Caller(user, self.avatar.peer, writable_for(rights, serve.allow_writes))
        self.protocol = self.avatar.server.smart_factory.build_protocol(caller, carried_by=channel.conn.transport)
        self._transport = ChannelTransport(channel, self._protocol_closed, self._protocol_aborted)
        self._started_at = self.avatar.server.clock.seconds()
        _log.info(
            "{user} from {peer} started a smart session (conn={connection_id}, read_only={read_only}, key {key})",
            user=user,
            peer=caller.peer,
            connection_id=self.protocol.connection_id,
            read_only=caller.read_only,
            key=self.avatar.login_key,
        )

        def start() -> None:
            if channel.localClosed or channel.remoteClosed:
                return
            self._transport.connect(self.protocol)
            proto.makeConnection(_Inbound(self._transport))

        channel.after_reply(start)

    def _protocol_closed(self) -> None:
        """The protocol ended the session: say why with the exit status."""
        drain = getattr(self.protocol, "closing_for_drain", False)
        exit_status = EXIT_TEMPFAIL if drain else EXIT_OK
        self._transport.channel.end_with_status(exit_status)
        self._log_end(f"the server, exit status {exit_status}", exit_status=exit_status, drain=drain)

    def _protocol_aborted(self) -> None:
        """The protocol dropped the session (idle timeout, drain deadline): close the channel without waiting."""
        if self._ended:
            return
        self._transport.channel.abort()
        if not self._end_logged:
            self._log_end("the server, aborted", aborted=True)
        self._end_protocol(Failure(ConnectionAborted()))

    def _log_end(self, ended_by: str, **fields) -> None:
        self._end_logged = True
        protocol = self.protocol
        _log.info(
            "smart session of {user} ended by {ended_by} (conn={connection_id}, requests={requests}, {seconds:.1f} s)",
            user=self.avatar.username,
            ended_by=ended_by,
            connection_id=protocol.connection_id,
            requests=protocol.requests_served,
            seconds=self.avatar.server.clock.seconds() - self._started_at,
            **fields,
        )

    def eofReceived(self) -> None:
        if self._transport is not None and self._transport.protocol is not None:
            self._transport.eof_from_client()

    def closed(self) -> None:
        if self.protocol is None:
            return
        ended_by_server = self._transport.disconnecting
        if not ended_by_server:
            self._log_end("the client", drain=False)
        reason = ConnectionDone() if ended_by_server else ConnectionLost("the SSH channel closed")
        self._end_protocol(Failure(reason))

    def _end_protocol(self, reason: Failure) -> None:
        """Tell the protocol its connection is gone, once."""
        if self.protocol is None or self._ended or self.protocol.transport is None:
            return
        self._ended = True
        if self._transport is not None:
            self._transport.disconnecting = True
        self.protocol.connectionLost(reason)

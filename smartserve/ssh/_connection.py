"""The ``ssh-connection`` service: channel limits, idle timeout, drain, inbound flow control."""

from __future__ import annotations

import struct

from twisted.conch.ssh import common, connection, transport
from twisted.logger import Logger

from ._trace import conch_logger

__all__ = ["SmartConnection"]

_log = Logger()

# Seconds a connection that logs in during a drain has to open a channel.
DRAIN_FIRST_CHANNEL_WINDOW = 5.0

# Messages whose first field is one of the server's channel numbers.
_CHANNEL_MESSAGES = frozenset(
    range(connection.MSG_CHANNEL_OPEN_CONFIRMATION, connection.MSG_CHANNEL_FAILURE + 1)
)


class SmartConnection(connection.SSHConnection):
    """An SSH connection service that enforces the per-connection policies.

    - Only session channels open, and they count against the user's limit;
      over it, an open is refused as administratively prohibited.
    - With no channel open for the idle timeout, the connection is closed
      (the smart protocol times out its own idle sessions).
    - When the transport is draining, the connection is closed as its last
      channel closes; one that logged in during the drain has a few seconds
      to open its first channel.
    - A channel whose reader is paused gets no window adjustment until it
      resumes.
    - A client that sends more than a channel's window or maximum packet
      size is disconnected for a protocol error.
    """

    _log = conch_logger()

    def __init__(self):
        super().__init__()
        self._idle_timer = None
        self._stopped = False
        self._counted: set = set()
        self._broken = False

    @property
    def _server(self):
        return self.transport.factory

    @property
    def _username(self) -> str:
        return self.transport.avatar.username

    def serviceStarted(self) -> None:
        super().serviceStarted()
        self._start_idle_timer()

    def packetReceived(self, messageNum: int, packet: bytes):
        """Dispatch as Conch does, after checking that a channel message names a channel that is open.

        Conch looks the number up unchecked: a message for a channel that is
        not open (or too short to name one) raised out of the transport and
        was logged as an unhandled error with its traceback, each time a
        client sent one. Such a client now gets a protocol error and one
        log line. Messages that follow a protocol error in what was read
        from the socket are dropped unread.
        """
        if self._broken:
            return None
        if messageNum in _CHANNEL_MESSAGES:
            if len(packet) < 4 or struct.unpack(">L", packet[:4])[0] not in self.channels:
                _log.warn(
                    "{user} sent channel message {channel_message} for a channel that is not open; disconnecting",
                    user=self._username,
                    channel_message=messageNum,
                )
                self._protocol_error(b"no such channel")
                return None
        return super().packetReceived(messageNum, packet)

    def _protocol_error(self, description: bytes) -> None:
        """Disconnect the client for a protocol error and ignore whatever else it sent."""
        self._broken = True
        self.transport.sendDisconnect(transport.DISCONNECT_PROTOCOL_ERROR, description)

    def ssh_CHANNEL_DATA(self, packet: bytes) -> None:
        if not self._over_window(packet, 4):
            super().ssh_CHANNEL_DATA(packet)

    def ssh_CHANNEL_EXTENDED_DATA(self, packet: bytes) -> None:
        if not self._over_window(packet, 8):
            super().ssh_CHANNEL_EXTENDED_DATA(packet)

    def _over_window(self, packet: bytes, length_at: int) -> bool:
        """Disconnect a client whose data message is truncated or larger than the window or maximum packet allow.

        Conch logs an error and closes the channel instead, once per
        message: a client that went on sending one byte at a time past the
        window filled the log, and stayed connected.
        """
        if len(packet) < length_at + 4:
            _log.warn(
                "{user} ({peer}) sent a truncated data message; disconnecting",
                user=self._username,
                peer=self.transport.peer,
            )
            self._protocol_error(b"truncated data message")
            return True
        channel = self.channels[struct.unpack(">L", packet[:4])[0]]
        length = struct.unpack(">L", packet[length_at : length_at + 4])[0]
        if length <= channel.localWindowLeft and length <= channel.localMaxPacket:
            return False
        _log.warn(
            "{user} ({peer}) sent {data_bytes} bytes on a channel whose window had {window_bytes} left"
            " (maximum packet {max_packet}); disconnecting",
            user=self._username,
            peer=self.transport.peer,
            data_bytes=length,
            window_bytes=channel.localWindowLeft,
            max_packet=channel.localMaxPacket,
            window_exceeded=True,
        )
        self._protocol_error(b"channel window exceeded")
        return True

    def serviceStopped(self) -> None:
        self._stopped = True
        self._cancel_idle_timer()
        super().serviceStopped()

    def ssh_CHANNEL_OPEN(self, packet: bytes) -> None:
        # Refusals are routine (port forwarding, a user over the limit):
        # answer them here, since Conch logs a traceback for each refusal
        # raised from getChannel.
        channel_type, rest = common.getNS(packet)
        sender_channel = struct.unpack(">L", rest[:4])[0]
        if channel_type != b"session":
            _log.info(
                "{user} asked for a {kind!r} channel; refused", user=self._username, kind=channel_type
            )
            self._refuse_open(sender_channel, connection.OPEN_UNKNOWN_CHANNEL_TYPE, b"unknown channel")
            return
        if not self._server.session_opening(self._username):
            self._refuse_open(
                sender_channel,
                connection.OPEN_ADMINISTRATIVELY_PROHIBITED,
                b"too many sessions for this user",
            )
            return
        local_id = self.localChannelID
        super().ssh_CHANNEL_OPEN(packet)
        channel = self.channels.get(local_id)
        if channel is None:
            self._server.session_closed(self._username)
            return
        self._counted.add(channel)
        self._cancel_idle_timer()

    def _refuse_open(self, sender_channel: int, reason: int, text: bytes) -> None:
        """Answer a channel open request with a failure."""
        self.transport.sendPacket(
            connection.MSG_CHANNEL_OPEN_FAILURE,
            struct.pack(">2L", sender_channel, reason) + common.NS(text) + common.NS(b""),
        )

    def channelClosed(self, channel) -> None:
        super().channelClosed(channel)
        if channel in self._counted:
            self._counted.discard(channel)
            self._server.session_closed(self._username)
        if self.channels or self._stopped:
            return
        if self.transport.draining:
            self.transport.disconnect_with(b"the server is restarting; try again")
        else:
            self._start_idle_timer()

    def ssh_CHANNEL_REQUEST(self, packet: bytes):
        result = super().ssh_CHANNEL_REQUEST(packet)
        channel = self.channels.get(struct.unpack(">L", packet[:4])[0])
        request_answered = getattr(channel, "request_answered", None)
        if request_answered is not None:
            request_answered()
        return result

    def adjustWindow(self, channel, bytesToAdd: int) -> None:
        if getattr(channel, "reading_paused", False):
            return  # granted on resume, from what the window then lacks
        super().adjustWindow(channel, bytesToAdd)

    def _start_idle_timer(self) -> None:
        timeout = self._server.idle_timeout
        if self.transport.draining:
            timeout = min(timeout or DRAIN_FIRST_CHANNEL_WINDOW, DRAIN_FIRST_CHANNEL_WINDOW)
        if not timeout or self._stopped:
            return
        self._cancel_idle_timer()
        self._idle_timer = self._server.clock.callLater(timeout, self._idle_expired)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None

    def _idle_expired(self) -> None:
        self._idle_timer = None
        _log.info("closing idle SSH connection of {user}", user=self._username)
        self.transport.disconnect_with(b"idle timeout")

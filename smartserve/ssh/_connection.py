"""The ``ssh-connection`` service: channel limits, idle timeout, drain, inbound flow control."""

from __future__ import annotations

import struct

from twisted.conch import error
from twisted.conch.ssh import connection
from twisted.logger import Logger

__all__ = ["SmartConnection"]

_log = Logger()

# Seconds a connection that logs in during a drain has to open a channel.
DRAIN_FIRST_CHANNEL_WINDOW = 5.0


class SmartConnection(connection.SSHConnection):
    """An SSH connection service that enforces the per-connection policies.

    - Session channels count against the user's limit; over it, an open is
      refused as administratively prohibited.
    - With no channel open for the idle timeout, the connection is closed
      (the smart protocol times out its own idle sessions).
    - When the transport is draining, the connection is closed as its last
      channel closes; one that logged in during the drain has a few seconds
      to open its first channel.
    - A channel whose reader is paused gets no window adjustment until it
      resumes.
    """

    def __init__(self):
        super().__init__()
        self._idle_timer = None
        self._stopped = False
        self._counted: set = set()

    @property
    def _server(self):
        return self.transport.factory

    @property
    def _username(self) -> str:
        return self.transport.avatar.username

    def serviceStarted(self) -> None:
        super().serviceStarted()
        self._start_idle_timer()

    def serviceStopped(self) -> None:
        self._stopped = True
        self._cancel_idle_timer()
        super().serviceStopped()

    def getChannel(self, channelType, windowSize, maxPacket, data):
        counted = channelType == b"session"
        if counted and not self._server.session_opening(self._username):
            raise error.ConchError(
                "too many sessions for this user", connection.OPEN_ADMINISTRATIVELY_PROHIBITED
            )
        try:
            channel = super().getChannel(channelType, windowSize, maxPacket, data)
        except BaseException:
            if counted:
                self._server.session_closed(self._username)
            raise
        if counted:
            self._counted.add(channel)
        self._cancel_idle_timer()
        return channel

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

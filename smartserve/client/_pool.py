"""Up to N connections, each carrying one request at a time, and spares kept open beside them."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, List, Optional

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger

from ._lifecycle import ConnectionSlot, make_slot
from ._policy import RetryPolicy
from ._exceptions import RemoteError
from ._protocol import Outgoing, SmartClientProtocol

__all__ = ["Pool", "PoolEntry"]


@dataclass(eq=False)
class PoolEntry:
    """One slot of the pool, and the connection it last handed out."""

    slot: ConnectionSlot
    protocol: Optional[SmartClientProtocol] = None
    keepalive_call: object = None
    watched: Optional[SmartClientProtocol] = None

    @property
    def has_live_connection(self) -> bool:
        """Whether its last connection is still open."""
        return self.protocol is not None and not self.protocol.is_closed


class Pool:
    """Hands out slots to calls: at most ``size`` at once, live connections first.

    With ``policy.keepalive_interval`` set, a connection left idle that long
    is sent a ``hello``; if no answer comes within the interval (or
    ``request_timeout`` when that is set), the connection is dropped, so the
    next call connects afresh instead of writing into a dead one.

    ``spares`` more slots keep connections open beside the one the next
    call takes, so that a call whose connection died moves to one already
    made (``exchange``) instead of waiting for a new one. A spare is made
    in the background, and says ``hello`` before a call may take it, once
    a call has been answered (the server is up); one that closes is made
    again only if calls were made since, so an idle client lets the
    server's idle timeout close them.
    """

    _log = Logger()

    def __init__(
        self,
        connect: Callable[[], Deferred],
        clock,
        policy: RetryPolicy,
        jitter: Callable[[], float],
        size: int = 1,
        name: str = "smartserve",
        stats=None,
        spares: int = 0,
    ):
        if size < 1:
            raise ValueError("a pool needs at least one connection")
        if spares < 0:
            raise ValueError("spares cannot be negative")
        self._clock = clock
        self._policy = policy
        self._entries: List[PoolEntry] = [
            PoolEntry(make_slot(connect, clock, policy, jitter, f"{name}#{index}"))
            for index in range(size + spares)
        ]
        self._free: List[PoolEntry] = list(self._entries)
        self._waiting: Deque[Deferred] = deque()
        self.size = size
        self.spares = spares
        self._stats = stats
        self._held = 0
        self._releases = 0
        self._stopped = False

    @property
    def in_use(self) -> int:
        """How many slots calls hold now."""
        return self._held

    @property
    def open_idle(self) -> int:
        """How many slots no call holds have an open connection ready for one."""
        return sum(1 for entry in self._free if entry.has_live_connection)

    def take_free(self) -> Optional[PoolEntry]:
        """A free slot now, live connections first, or None if ``size`` slots are held or none is free."""
        return self._take() if self._free and self._held < self.size else None

    def acquire(self) -> Deferred:
        """A free slot, as soon as there is one; cancelling gives up the wait."""
        if self._free and self._held < self.size:
            return succeed(self._take())
        waiter: Deferred = Deferred(lambda d: self._waiting.remove(d) if d in self._waiting else None)
        self._waiting.append(waiter)
        return waiter

    def release(self, entry: PoolEntry) -> None:
        """Give back ``entry``, which a call held; the longest waiting call gets it."""
        self._held -= 1
        if self.spares:
            self._releases += 1
            if entry.protocol is not entry.watched and entry.has_live_connection:
                self._watch(entry, entry.protocol)
        self._put_back(entry)
        if self.spares:
            self._make_spares()

    def exchange(self, entry: PoolEntry) -> PoolEntry:
        """A free slot with an open connection in place of ``entry``, which a call holds; ``entry`` if there is none."""
        for index in range(len(self._free) - 1, -1, -1):
            candidate = self._free[index]
            if candidate.has_live_connection and candidate.slot.ready_connection() is candidate.protocol:
                del self._free[index]
                self._cancel_keepalive(candidate)
                self._put_back(entry)
                return candidate
        return entry

    def stop(self) -> Deferred:
        """Close every connection and make no more; fires once all are closed."""
        self._stopped = True
        closing = [entry.protocol.when_closed() for entry in self._entries if entry.has_live_connection]
        for entry in self._entries:
            self._cancel_keepalive(entry)
            entry.slot.stop()
        return gatherResults(closing).addCallback(lambda _: None)

    def abort_all(self, reason: str) -> None:
        """Drop every open connection at once."""
        for entry in self._entries:
            if entry.has_live_connection:
                entry.protocol.abort(reason)

    def _put_back(self, entry: PoolEntry) -> None:
        """``entry``, which no call holds now, to the longest waiting call if one may take it, else to the free list."""
        if self._waiting and self._held < self.size:
            self._held += 1
            self._waiting.popleft().callback(entry)
            return
        self._free.append(entry)
        self._schedule_keepalive(entry)

    def _take(self) -> PoolEntry:
        self._held += 1
        free = self._free
        for index in range(len(free) - 1, -1, -1):
            if free[index].has_live_connection:
                entry = free.pop(index)
                break
        else:
            entry = free.pop()
        self._cancel_keepalive(entry)
        return entry

    def _make_spares(self) -> None:
        """Start making spares until ``spares`` free slots, besides one for the next call, are open or opening."""
        wanted = self.spares + (1 if self._held < self.size else 0) - (len(self._entries) - self._held - len(self._free))
        cold = []
        for entry in self._free:
            if entry.has_live_connection:
                wanted -= 1
            else:
                cold.append(entry)
        for entry in cold[: max(0, wanted)]:
            self._make_spare(entry)

    def _make_spare(self, entry: PoolEntry) -> None:
        """Connect ``entry``'s slot and say ``hello`` on it, away from the free list meanwhile."""
        self._free.remove(entry)
        self._cancel_keepalive(entry)
        releases = self._releases
        timeout = self._policy.request_timeout or self._policy.connect_timeout

        def connected(protocol: SmartClientProtocol) -> Deferred:
            entry.protocol = protocol
            return protocol.send_request(Outgoing(b"hello"), timeout=timeout).addCallbacks(
                answered, lost, errbackArgs=(protocol,)
            )

        def answered(reply) -> None:
            entry.slot.request_succeeded()
            self._watch(entry, entry.protocol, releases)

        def lost(failure, protocol) -> None:
            if failure.check(RemoteError):
                answered(None)
            else:
                self._log.info("a spare connection failed its hello: {reason}", reason=failure.getErrorMessage())
                entry.slot.request_failed(failure.getErrorMessage())

        def connect_failed(failure) -> None:
            pass  # the slot logged it, and backs off

        attempt = entry.slot.connection()
        attempt.addCallbacks(connected, connect_failed)
        attempt.addBoth(lambda _: self._stopped or self._put_back(entry))

    def _watch(self, entry: PoolEntry, protocol: SmartClientProtocol, releases: Optional[int] = None) -> None:
        """Make spares again when ``protocol`` closes while free, if calls were made since ``releases``."""
        entry.watched = protocol
        since = self._releases if releases is None else releases

        def closed(_) -> None:
            if not self._stopped and entry in self._free and self._releases > since:
                self._make_spares()

        protocol.when_closed().addCallback(closed)

    def _cancel_keepalive(self, entry: PoolEntry) -> None:
        call, entry.keepalive_call = entry.keepalive_call, None
        if call is not None and call.active():
            call.cancel()

    def _schedule_keepalive(self, entry: PoolEntry) -> None:
        interval = self._policy.keepalive_interval
        if interval is None or not entry.has_live_connection:
            return
        entry.keepalive_call = self._clock.callLater(interval, self._keepalive, entry)

    def _keepalive(self, entry: PoolEntry) -> None:
        entry.keepalive_call = None
        if entry not in self._free or not entry.has_live_connection:
            return
        protocol = entry.protocol
        if protocol.closed_reason() is not None or protocol.busy:
            return
        self._free.remove(entry)
        timeout = self._policy.request_timeout or self._policy.keepalive_interval
        answer = protocol.send_request(Outgoing(b"hello"), timeout=timeout)

        def answered(reply) -> None:
            self._log.debug("keepalive hello answered {args!r}", args=reply.args)

        def failed(failure) -> None:
            self._log.info("keepalive failed, dropping the connection: {reason}", reason=failure.getErrorMessage())
            entry.slot.discard(f"keepalive failed: {failure.getErrorMessage()}")
            if self._stats is not None:
                self._stats.keepalive_drops += 1

        answer.addCallbacks(answered, failed)
        answer.addBoth(lambda _: self._put_back(entry))

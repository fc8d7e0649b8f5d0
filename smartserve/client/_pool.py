"""Up to N connections, each carrying one request at a time."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, List, Optional

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger

from ._lifecycle import ConnectionSlot, make_slot
from ._policy import RetryPolicy
from ._protocol import Outgoing, SmartClientProtocol

__all__ = ["Pool", "PoolEntry"]


@dataclass(eq=False)
class PoolEntry:
    """One slot of the pool, and the connection it last handed out."""

    slot: ConnectionSlot
    protocol: Optional[SmartClientProtocol] = None
    keepalive_call: object = None

    @property
    def has_live_connection(self) -> bool:
        """Whether its last connection is still open."""
        return self.protocol is not None and not self.protocol.is_closed

    @property
    def has_usable_connection(self) -> bool:
        """Whether its last connection is open and may carry another request."""
        return self.protocol is not None and self.protocol.reusable


class Pool:
    """Hands out slots to calls: at most ``size`` at once, live connections first.

    With ``policy.keepalive_interval`` set, a connection left idle that long
    is sent a ``hello``; if no answer comes within the interval (or
    ``request_timeout`` when that is set), the connection is dropped, so the
    next call connects afresh instead of writing into a dead one.
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
        metrics=None,
    ):
        if size < 1:
            raise ValueError("a pool needs at least one connection")
        self._clock = clock
        self._policy = policy
        self._entries: List[PoolEntry] = [
            PoolEntry(make_slot(connect, clock, policy, jitter, f"{name}#{index}"))
            for index in range(size)
        ]
        self._free: List[PoolEntry] = list(self._entries)
        self._waiting: Deque[Deferred] = deque()
        self._waiting_live: Deque[Deferred] = deque()  # calls whose connection the server turned away
        self.size = size
        self._stats = stats
        self._metrics = metrics
        self.stopped = False

    @property
    def in_use(self) -> int:
        """How many slots calls hold now."""
        return self.size - len(self._free)

    def take_free(self) -> Optional[PoolEntry]:
        """A free slot now, live connections first, or None if every slot is taken."""
        return self._take() if self._free else None

    def acquire(self) -> Deferred:
        """A free slot, as soon as there is one; cancelling gives up the wait."""
        if self._free:
            return succeed(self._take())
        waiter: Deferred = Deferred(lambda d: self._waiting.remove(d) if d in self._waiting else None)
        self._waiting.append(waiter)
        return waiter

    def acquire_live(self) -> Deferred:
        """A slot with a live connection, as soon as one is free; any free slot when the pool has no live connection.

        For a call whose connection the server turned away for having too
        many: one the pool already has serves it without asking for another.
        """
        entry = self._take_usable()
        if entry is not None:
            return succeed(entry)
        if not self._any_usable():
            return self.acquire()
        waiter: Deferred = Deferred(lambda d: self._waiting_live.remove(d) if d in self._waiting_live else None)
        self._waiting_live.append(waiter)
        return waiter

    def _any_usable(self) -> bool:
        return any(entry.has_usable_connection for entry in self._entries)

    def release(self, entry: PoolEntry) -> None:
        """Give ``entry`` back, closing its connection first if it is too old; the longest waiting call gets it."""
        if self._policy.max_connection_age is not None and entry.slot.retire_if_old(self._clock.seconds()):
            if self._stats is not None:
                self._stats.retired_connections += 1
            if self._metrics is not None:
                self._metrics.reconnected("age")
        if self._waiting_live and (entry.has_usable_connection or not self._any_usable()):
            self._waiting_live.popleft().callback(entry)
            return
        if self._waiting:
            self._waiting.popleft().callback(entry)
            return
        self._free.append(entry)
        self._schedule_keepalive(entry)

    def stop(self) -> Deferred:
        """Close every connection and make no more; fires once all are closed."""
        self.stopped = True
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

    def _take(self) -> PoolEntry:
        """A free slot, one whose connection can carry a request if there is one."""
        entry = self._take_usable()
        if entry is None:
            entry = self._free.pop()
            self._cancel_keepalive(entry)
        return entry

    def _take_usable(self) -> Optional[PoolEntry]:
        """A free slot whose connection can carry a request, taken off the free list; None if there is none."""
        free = self._free
        for index in range(len(free) - 1, -1, -1):
            if free[index].has_usable_connection:
                entry = free.pop(index)
                self._cancel_keepalive(entry)
                return entry
        return None

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
        answer.addBoth(lambda _: self.release(entry))

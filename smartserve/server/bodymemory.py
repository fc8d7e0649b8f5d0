"""What request bodies hold of the server's memory, all connections together (``--max-request-memory``)
and per caller (``--max-request-memory-per-caller``)."""

from __future__ import annotations

import collections
from typing import Hashable, Optional

__all__ = ["RequestBodyMemory", "DEFAULT_MAX_REQUEST_MEMORY", "ALL_CALLERS", "ONE_CALLER"]

DEFAULT_MAX_REQUEST_MEMORY = 1024 * 1024 * 1024

# Which limit the bodies held are over (``RequestBodyMemory.over``).
ALL_CALLERS = "all callers"
ONE_CALLER = "one caller"


class RequestBodyMemory:
    """Bytes of request bodies the server holds now, summed over connections, against ``limit``.

    Per-request limits bound one connection; this bounds them all, however
    many are open, and with ``per_caller_limit`` those of one caller (an SSH
    user, or a bzr:// client address), so that one caller cannot take the
    whole of ``limit`` from the others. Each connection reports its share
    whenever it changes: bytes received and not yet handed on, and the body
    its request keeps for the handler. A request whose body grows while a
    sum it counts in is over its limit is refused unrun (``ServerBusy``),
    which gives its share back. A limit of 0 counts without refusing. Used
    on the reactor thread only.
    """

    def __init__(self, limit: int = 0, per_caller_limit: int = 0):
        self.limit = limit
        self.per_caller_limit = per_caller_limit
        self.held = 0
        self._held_by_caller: collections.Counter = collections.Counter()

    def update(self, caller: Hashable, before: int, now: int) -> bool:
        """Move one connection's share, counted for ``caller``, from ``before`` to ``now`` bytes; False if it
        grew past a limit."""
        self.held += now - before
        self._held_by_caller[caller] += now - before
        if not self._held_by_caller[caller]:
            del self._held_by_caller[caller]
        return now <= before or self.over(caller) is None

    def held_by(self, caller: Hashable) -> int:
        """Bytes of request bodies held for ``caller`` now."""
        return self._held_by_caller.get(caller, 0)

    def over(self, caller: Hashable) -> Optional[str]:
        """``ALL_CALLERS`` or ``ONE_CALLER`` if the bodies held (all, or ``caller``'s) are over their limit; else None."""
        if self.limit and self.held > self.limit:
            return ALL_CALLERS
        if self.per_caller_limit and self.held_by(caller) > self.per_caller_limit:
            return ONE_CALLER
        return None

"""What request bodies hold of the server's memory, all connections together (``--max-request-memory``)."""

from __future__ import annotations

__all__ = ["RequestBodyMemory", "DEFAULT_MAX_REQUEST_MEMORY"]

DEFAULT_MAX_REQUEST_MEMORY = 1024 * 1024 * 1024


class RequestBodyMemory:
    """Bytes of request bodies the server holds now, summed over connections, against ``limit``.

    Per-request limits bound one connection; this bounds them all, however
    many are open. Each connection reports its share whenever it changes:
    bytes received and not yet handed on, and the body its request keeps
    for the handler. A request whose body grows while the sum is over the
    limit is refused unrun (``ServerBusy``), which gives its share back.
    ``limit`` 0 counts without refusing. Used on the reactor thread only.
    """

    def __init__(self, limit: int = 0):
        self.limit = limit
        self.held = 0

    def update(self, before: int, now: int) -> bool:
        """Move one connection's share from ``before`` to ``now`` bytes; False if it grew past the limit."""
        self.held += now - before
        return now <= before or not self.limit or self.held <= self.limit

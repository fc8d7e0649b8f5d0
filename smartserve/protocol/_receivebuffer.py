"""A byte buffer that parts are read from without copying what stays."""

from __future__ import annotations

__all__ = ["ReceiveBuffer"]

_COMPACT_AT = 64 * 1024


class ReceiveBuffer:
    """Bytes received and not yet consumed.

    Readers look ahead with ``byte_at`` and ``slice`` and only ``consume``
    once a whole part is there, so a partial part costs nothing to retry.
    """

    __slots__ = ("_data", "_start")

    def __init__(self) -> None:
        self._data = bytearray()
        self._start = 0

    def __len__(self) -> int:
        return len(self._data) - self._start

    def __bool__(self) -> bool:
        return len(self._data) > self._start

    def append(self, data: bytes) -> None:
        """Add bytes received from the peer."""
        self._data += data

    def byte_at(self, offset: int) -> int:
        """The byte at ``offset`` from the start of the unread data."""
        return self._data[self._start + offset]

    def slice(self, start: int, end: int) -> bytes:
        """A copy of unread bytes ``start`` to ``end`` (relative offsets)."""
        base = self._start
        return bytes(self._data[base + start : base + end])

    def startswith(self, prefix: bytes) -> bool:
        """Whether the unread data begins with ``prefix``."""
        return self._data.startswith(prefix, self._start)

    def consume(self, count: int) -> None:
        """Drop ``count`` unread bytes."""
        self._start += count
        if self._start == len(self._data):
            self._data.clear()
            self._start = 0
        elif self._start >= _COMPACT_AT and self._start * 2 >= len(self._data):
            del self._data[: self._start]
            self._start = 0

    def take_all(self) -> bytes:
        """Remove and return every unread byte."""
        data = bytes(self._data[self._start :])
        self._data.clear()
        self._start = 0
        return data

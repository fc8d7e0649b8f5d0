"""A body's parts kept for joining at its end, many small ones held as a few large pieces."""

from __future__ import annotations

from typing import List

__all__ = ["BodyCollector", "SMALL_PART_BYTES"]

# Parts below this size are copied together into pieces of about this size.
SMALL_PART_BYTES = 64 * 1024


class BodyCollector:
    """Collects the parts of a body until it is taken whole.

    A list of the parts as they came would cost some 40 bytes of Python
    objects a part, whatever its size: a peer sending millions of two-byte
    parts would make its receiver hold twenty times the bytes it sent. Parts
    under ``SMALL_PART_BYTES`` after the first are copied into a buffer that
    becomes one piece each time it reaches that size; the first part and
    larger ones are kept as they are, not copied, so a body of one part is
    taken as that part. ``size`` is the bytes collected so far.
    """

    __slots__ = ("_pieces", "_small", "size")

    def __init__(self):
        self._pieces: List[bytes] = []
        self._small = bytearray()
        self.size = 0

    def add(self, part: bytes) -> None:
        self.size += len(part)
        if len(part) >= SMALL_PART_BYTES or not self._pieces:
            # Kept as it is: a large part, or the first (most bodies have one part).
            if self._small:
                self._pieces.append(bytes(self._small))
                self._small = bytearray()
            self._pieces.append(part)
            return
        self._small += part
        if len(self._small) >= SMALL_PART_BYTES:
            self._pieces.append(bytes(self._small))
            self._small = bytearray()

    def take(self) -> bytes:
        """The body collected, joined; the collector is empty again."""
        pieces = self._pieces
        if self._small:
            pieces.append(bytes(self._small))
        self._pieces, self._small, self.size = [], bytearray(), 0
        if len(pieces) == 1:
            return pieces[0]
        return b"".join(pieces)

"""A byte buffer that parts are read from with as few copies as possible."""

from __future__ import annotations

from collections import deque

from ._wire import LENGTH

__all__ = ["ReceiveBuffer"]

_unpack_length = LENGTH.unpack_from


class ReceiveBuffer:
    """Bytes received and not yet consumed.

    Received chunks are kept as they came: ``_head`` is the first one not
    wholly consumed (read from ``_start``), ``_tail`` the ones after it.
    Readers look ahead with ``byte_at``, ``length_at`` and ``peek`` and only
    ``consume`` or ``take`` once a whole part is there, so a partial part
    costs nothing to retry, and a part is copied once, when it is taken.
    """

    __slots__ = ("_head", "_start", "_tail", "_size")

    def __init__(self) -> None:
        self._head = b""
        self._start = 0
        self._tail: deque[bytes] = deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def append(self, data: bytes) -> None:
        """Add bytes received from the peer."""
        if type(data) is not bytes:
            data = bytes(data)
        if not data:
            return
        if self._size:
            self._tail.append(data)
        else:
            self._head = data
            self._start = 0
        self._size += len(data)

    def contiguous(self) -> tuple[bytes, int]:
        """The first chunk holding unread bytes, and where they start in it.

        Lets a reader parse a part in place when the whole part is there.
        """
        return self._head, self._start

    def peek(self, end: int) -> bytes:
        """A copy of the first ``end`` unread bytes (fewer if fewer are here)."""
        start = self._start
        head = self._head
        if start + end <= len(head) or not self._tail:
            return head[start : start + end]
        pieces = [head[start:]]
        have = len(pieces[0])
        for chunk in self._tail:
            if have >= end:
                break
            pieces.append(chunk[: end - have])
            have += len(pieces[-1])
        return b"".join(pieces)

    def byte_at(self, offset: int) -> int:
        """The byte at ``offset`` from the start of the unread data."""
        index = self._start + offset
        if index < len(self._head):
            return self._head[index]
        return self.peek(offset + 1)[offset]

    def length_at(self, offset: int) -> int:
        """The 4-byte length prefix at ``offset``; the caller checked it is here."""
        index = self._start + offset
        if index + 4 <= len(self._head):
            return _unpack_length(self._head, index)[0]
        return _unpack_length(self.peek(offset + 4), offset)[0]

    def startswith(self, prefix: bytes) -> bool:
        """Whether the unread data begins with ``prefix``."""
        if self._start + len(prefix) <= len(self._head):
            return self._head.startswith(prefix, self._start)
        return self.peek(len(prefix)) == prefix

    def consume(self, count: int) -> None:
        """Drop ``count`` unread bytes; there must be that many."""
        start = self._start + count
        head_size = len(self._head)
        if start < head_size:
            self._start = start
            self._size -= count
        elif start == head_size and not self._tail:
            self._head = b""
            self._start = self._size = 0
        else:
            self.take(count)

    def take(self, count: int) -> bytes:
        """Remove and return ``count`` unread bytes; there must be that many."""
        head = self._head
        start = self._start
        end = start + count
        if end <= len(head):
            data = head if start == 0 and end == len(head) else head[start:end]
        else:
            pieces = [memoryview(head)[start:]]
            needed = end - len(head)
            tail = self._tail
            while True:
                head = tail.popleft()
                if len(head) >= needed:
                    pieces.append(memoryview(head)[:needed])
                    end = needed
                    break
                pieces.append(head)
                needed -= len(head)
            data = b"".join(pieces)
        self._size -= count
        if end == len(head):
            if self._tail:
                self._head = self._tail.popleft()
            else:
                self._head = b""
            self._start = 0
        else:
            self._head = head
            self._start = end
        return data

    def take_all(self) -> bytes:
        """Remove and return every unread byte."""
        return self.take(self._size)

"""Regrouping a pushed pack container into whole records before Breezy's parser sees it.

The body of a push (``Repository.insert_stream*``) is a Breezy pack
container: a format line, then records (``B``, a length line, name lines,
an empty line, the record's bytes) and an end marker ``E``. Breezy's
``ContainerPushParser`` appends each piece it is given to all it holds of
the record in progress, and keeps a record of any declared size: a record
sent in many small parts costs time quadratic in their number, and one
declared huge, or a length line that never ends, costs memory without
bound. ``RecordRegrouper`` hands the parser whole records instead, one
piece each, and refuses a record over the server's limit before keeping
any of it. Breezy's own client sends each record as one body part, which
passes through unchanged.
"""

from __future__ import annotations

from typing import List, Optional

__all__ = ["RecordRegrouper", "PushStreamRefused", "MAX_HEADER_BYTES"]

# The longest format line, or length and name lines of one record, taken; Breezy's are tens of bytes.
MAX_HEADER_BYTES = 64 * 1024

_RECORD = 0x42  # b"B"
_END = 0x45  # b"E"

_FORMAT_LINE, _RECORD_TYPE, _RECORD_HEADER, _RECORD_BODY, _PASS_THROUGH, _ENDED = range(6)


class PushStreamRefused(Exception):
    """The pushed stream breaks a limit, or has a record length Breezy would misread; nothing more of it is taken.

    ``too_large`` tells a size over a limit from a malformed length.
    """

    def __init__(self, message: str, *, too_large: bool):
        super().__init__(message)
        self.too_large = too_large


class RecordRegrouper:
    """Turns the body parts of a push into whole units for Breezy's parser: the format line, each record, the end.

    ``feed`` returns the units a part completed; ``rest`` what is left at
    the end of the body (an incomplete unit, for Breezy to report as it
    does). Bytes Breezy's parser refuses at once (a record type that is
    neither ``B`` nor ``E``, a length that is no number) are passed on as
    they are, and so is everything after them: the parser fails on them and
    takes nothing more. What follows the end marker is dropped, as the
    parser ignores it.
    """

    def __init__(self, max_record_bytes: int):
        self._max_record = max_record_bytes
        self._pending = bytearray()
        self._state = _FORMAT_LINE
        self._start = 0  # where the unit in progress begins in _pending
        self._line_start = 0  # where the line being read begins
        self._scan = 0  # where to look on for that line's newline
        self._length: Optional[int] = None  # of the record whose header is being read
        self._body_end = 0  # in _RECORD_BODY: where the record ends in _pending

    def feed(self, data: bytes) -> List[bytes]:
        """The whole units ``data`` completes; raises ``PushStreamRefused`` for a unit over a limit."""
        state = self._state
        if state == _PASS_THROUGH:
            return [data] if data else []
        if state == _ENDED:
            return []
        if state == _RECORD_TYPE and not self._pending and self._is_one_record(data):
            return [data]  # the common case: Breezy's client sends a record per part
        self._pending += data
        units: List[bytes] = []
        while self._advance(units):
            pass
        if self._state in (_PASS_THROUGH, _ENDED):
            if self._state == _PASS_THROUGH and len(self._pending) > self._start:
                units.append(bytes(self._pending[self._start :]))
            self._pending = bytearray()
            self._start = self._line_start = self._scan = self._body_end = 0
        elif self._start:
            shift = self._start
            del self._pending[:shift]
            self._start = 0
            self._line_start -= shift
            self._scan -= shift
            self._body_end -= shift
        return units

    @property
    def buffered_bytes(self) -> int:
        """Bytes held of the unit in progress."""
        return len(self._pending)

    def rest(self) -> bytes:
        """What is left of an incomplete unit at the end of the body."""
        rest, self._pending = bytes(self._pending[self._start :]), bytearray()
        return rest

    def _advance(self, units: List[bytes]) -> bool:
        """Take the next step on ``_pending``; False when more bytes are needed or nothing more is parsed."""
        state = self._state
        if state == _FORMAT_LINE:
            end = self._next_line_end("format line")
            if end < 0:
                return False
            self._emit(units, end)
            self._state = _RECORD_TYPE
            return True
        if state == _RECORD_TYPE:
            if self._start >= len(self._pending):
                return False
            kind = self._pending[self._start]
            if kind == _END:
                self._emit(units, self._start + 1)
                self._state = _ENDED
            elif kind == _RECORD:
                self._line_start = self._scan = self._start + 1
                self._length = None
                self._state = _RECORD_HEADER
                return True
            else:
                self._state = _PASS_THROUGH  # Breezy's parser refuses the record type at once
            return False
        if state == _RECORD_HEADER:
            return self._read_header_line()
        if len(self._pending) < self._body_end:
            return False
        self._emit(units, self._body_end)
        self._state = _RECORD_TYPE
        return True

    def _read_header_line(self) -> bool:
        """Read the record's length line, or one of its name lines, or the empty line that ends them."""
        end = self._next_line_end("record header")
        if end < 0:
            return False
        line = bytes(self._pending[self._line_start : end - 1])
        self._line_start = self._scan = end
        if self._length is None:
            self._length = self._record_length(line)
            return self._state == _RECORD_HEADER
        if not line:
            self._body_end = end + self._length
            self._state = _RECORD_BODY
        return True

    def _record_length(self, line: bytes) -> int:
        if line.isdigit():
            length = int(line)
            if length > self._max_record:
                raise PushStreamRefused(
                    f"a record of the pushed stream is over the server's limit of {self._max_record} bytes",
                    too_large=True,
                )
            return length
        try:
            int(line)
        except ValueError:
            self._state = _PASS_THROUGH  # Breezy's parser refuses a length that is no number at once
            return 0
        # A sign, a space or an underscore: Python's int() takes them, and Breezy would read on from there.
        raise PushStreamRefused(f"a record of the pushed stream has the length {line!r}", too_large=False)

    def _next_line_end(self, what: str) -> int:
        """Where the line being read ends (just after its newline), or -1 until its newline has arrived."""
        pending = self._pending
        found = pending.find(b"\n", self._scan)
        end = len(pending) if found < 0 else found + 1
        if end - self._start > MAX_HEADER_BYTES:
            raise PushStreamRefused(f"a {what} of the pushed stream is over {MAX_HEADER_BYTES} bytes", too_large=True)
        if found < 0:
            self._scan = end
            return -1
        return end

    def _emit(self, units: List[bytes], end: int) -> None:
        units.append(bytes(self._pending[self._start : end]))
        self._start = self._line_start = self._scan = end

    def _is_one_record(self, data: bytes) -> bool:
        """Whether ``data`` is exactly one whole record within the limits, checked without copying it."""
        if not data.startswith(b"B"):
            return False
        length_end = data.find(b"\n", 1, MAX_HEADER_BYTES)
        if length_end < 0 or not data[1:length_end].isdigit():
            return False
        length = int(data[1:length_end])
        header_end = data.find(b"\n\n", length_end, MAX_HEADER_BYTES)
        return length <= self._max_record and header_end >= 0 and len(data) == header_end + 2 + length

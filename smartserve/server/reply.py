"""What a backend answers: a response's arguments and its body."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

__all__ = ["Reply", "StreamFailure"]


@dataclass(frozen=True, slots=True)
class Reply:
    """A response: its status, its arguments, and a body in one piece or a stream."""

    args: Tuple[Any, ...]
    success: bool = True
    body: Optional[bytes] = None
    stream: Optional[Any] = None  # an IBodyStream

    @property
    def outcome(self) -> str:
        """``ok``, or the name of the error, for the access log."""
        if self.success:
            return "ok"
        name = self.args[0] if self.args else b"error"
        return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)


@dataclass(frozen=True, slots=True)
class StreamFailure:
    """An error in the middle of a response stream, as an error tuple."""

    args: Tuple[Any, ...]

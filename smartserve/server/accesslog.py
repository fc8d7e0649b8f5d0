"""One structured access-log event per request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from twisted.logger import Logger

from ..verbs import classify

__all__ = ["RequestRecord", "access_log"]

access_log = Logger(namespace="smartserve.access")


@dataclass(slots=True)
class RequestRecord:
    """What the access log says about one request, filled in as it runs."""

    connection_id: int
    peer: str
    user: Optional[str]
    verb: bytes
    started: float
    bytes_in: int = 0
    bytes_out: int = 0
    outcome: str = "ok"
    finished: Optional[float] = None
    verb_class: str = field(init=False)

    def __post_init__(self) -> None:
        self.verb_class = classify(self.verb).value

    @property
    def duration(self) -> Optional[float]:
        """Seconds from the request's first byte to its end, once emitted."""
        return None if self.finished is None else self.finished - self.started

    def emit(self, finished: float) -> None:
        """Log the finished request."""
        self.finished = finished
        user = self.user or "-"
        verb = self.verb.decode("utf-8", "replace")
        duration_ms = (finished - self.started) * 1000.0
        # The line is rendered here, once, and passed as a format with no
        # fields: text observers then skip parsing a format for every request.
        line = (
            f"{self.peer} {user} {verb} {self.verb_class} {self.outcome} {duration_ms:.2f}ms "
            f"in={self.bytes_in} out={self.bytes_out} conn={self.connection_id}"
        )
        access_log.info(
            line.replace("{", "{{").replace("}", "}}"),
            log_access=True,
            connection_id=self.connection_id,
            peer=self.peer,
            user=user,
            verb=verb,
            verb_class=self.verb_class,
            outcome=self.outcome,
            duration_ms=duration_ms,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
        )

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
        access_log.info(
            "{peer} {user} {verb} {verb_class} {outcome} {duration_ms:.2f}ms "
            "in={bytes_in} out={bytes_out} conn={connection_id}",
            log_access=True,
            connection_id=self.connection_id,
            peer=self.peer,
            user=self.user or "-",
            verb=self.verb.decode("utf-8", "replace"),
            verb_class=self.verb_class,
            outcome=self.outcome,
            duration_ms=(finished - self.started) * 1000.0,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
        )

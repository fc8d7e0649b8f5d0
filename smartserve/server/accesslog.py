"""One structured access-log event per request, and the file that keeps them."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Optional

from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent
from zope.interface import implementer

from ..verbs import classify

__all__ = ["RequestRecord", "AccessLogFile", "access_logger", "DEFAULT_ACCESS_LOG"]

NAMESPACE = "smartserve.access"

# Access events go to the global log publisher (twistd's log) unless a
# server is given a logger of its own, such as one writing an AccessLogFile.
DEFAULT_ACCESS_LOG = Logger(namespace=NAMESPACE)

# How often a file that cannot be written is complained about in the twistd log.
COMPLAINT_INTERVAL = 60.0

# Verbs longer than this are cut in the access log: a client may send one of megabytes.
MAX_VERB_BYTES = 200

_log = Logger()


def _escape_char(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"  # a byte that is not UTF-8, kept by surrogateescape
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def verb_text(verb: bytes) -> str:
    """``verb`` as one field of an access line: no spaces, line breaks or control characters.

    The verb is whatever the client sent; shown raw, a verb holding a
    newline would forge a line of its own. Those characters and bytes that
    are not UTF-8 are written as ``\\xNN`` escapes, and a verb longer than
    ``MAX_VERB_BYTES`` is cut and ends in ``...``.
    """
    text = verb[:MAX_VERB_BYTES].decode("utf-8", "surrogateescape")
    if text.isprintable() and " " not in text and len(verb) <= MAX_VERB_BYTES:
        return text
    escaped = "".join(char if char.isprintable() and char != " " else _escape_char(char) for char in text)
    return escaped + "..." if len(verb) > MAX_VERB_BYTES else escaped


def access_logger(observer=None) -> Logger:
    """The logger access events go to: ``observer``, or the global publisher when None."""
    return DEFAULT_ACCESS_LOG if observer is None else Logger(namespace=NAMESPACE, observer=observer)


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
        """Seconds from the arrival of the request's verb and arguments to its end, once emitted."""
        return None if self.finished is None else self.finished - self.started

    def emit(self, finished: float, logger: Logger = DEFAULT_ACCESS_LOG) -> None:
        """Log the finished request to ``logger``."""
        self.finished = finished
        user = self.user or "-"
        verb = verb_text(self.verb)
        duration_ms = (finished - self.started) * 1000.0
        line = (
            f"{self.peer} {user} {verb} {self.verb_class} {self.outcome} {duration_ms:.2f}ms "
            f"in={self.bytes_in} out={self.bytes_out} conn={self.connection_id}"
        )
        # The event Logger.info would build, handed to the logger's observer
        # directly: Logger.emit validates the level against a sorted list of
        # every level on each call. The format has no fields, so text
        # observers skip parsing one per request; an AccessLogFile writes
        # ``access_line`` as it is.
        logger.observer(
            {
                "log_logger": logger,
                "log_level": LogLevel.info,
                "log_namespace": logger.namespace,
                "log_source": logger.source,
                "log_format": line.replace("{", "{{").replace("}", "}}"),
                "log_time": time.time(),
                "log_access": True,
                "access_line": line,
                "connection_id": self.connection_id,
                "peer": self.peer,
                "user": user,
                "verb": verb,
                "verb_class": self.verb_class,
                "outcome": self.outcome,
                "duration_ms": duration_ms,
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
            }
        )


@implementer(ILogObserver)
class AccessLogFile:
    """Appends each access event to a file as one timestamped line.

    The busiest log of a server gets a file of its own, like a web server's
    access log: a line costs one ``write`` of an already rendered string,
    where twistd's text log formats the event and flushes a buffered file
    per event. The file is opened for appending, so ``logrotate`` with
    ``copytruncate`` rotates it while the server runs, and each line is
    written whole, so a crash never leaves half a line.

    A line that cannot be written (a full disk, an I/O error) is counted in
    ``lines_lost`` and dropped: requests go on being served. The twistd log
    says so at once and then at most every ``COMPLAINT_INTERVAL`` seconds,
    and once more when lines are written again.
    """

    def __init__(self, path: str, monotonic=time.monotonic):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._second = None
        self._stamp = ""
        self.lines_lost = 0
        self._monotonic = monotonic
        self._lost_since_complaint = 0
        self._last_complaint: Optional[float] = None

    def __call__(self, event: dict) -> None:
        line = event.get("access_line")
        if line is None:
            line = formatEvent(event)
        try:
            os.write(self._fd, f"{self._timestamp(event['log_time'])} {line}\n".encode("utf-8", "replace"))
        except OSError as error:
            self._lost(error)
            return
        if self._last_complaint is not None:
            _log.info(
                "access log {path} is written again; {lost} lines were lost in all",
                path=self.path,
                lost=self.lines_lost,
            )
            self._last_complaint = None

    def _lost(self, error: OSError) -> None:
        self.lines_lost += 1
        self._lost_since_complaint += 1
        now = self._monotonic()
        if self._last_complaint is not None and now - self._last_complaint < COMPLAINT_INTERVAL:
            return
        _log.error(
            "cannot write the access log {path}: {error}; {lost} lines lost (requests are still served)",
            path=self.path,
            error=error.strerror or str(error),
            lost=self._lost_since_complaint,
        )
        self._last_complaint = now
        self._lost_since_complaint = 0

    def _timestamp(self, when: float) -> str:
        """``when`` as twistd writes times (local, ISO 8601, seconds); made once per second."""
        second = int(when)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(second))
        return self._stamp

    def close(self) -> None:
        """Close the file; later events are an error."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

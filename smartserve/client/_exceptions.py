"""The client's errors: what the server answered, or how far a request got.

``RemoteError`` and its subclasses carry the server's error tuple. The
``TransportFailure`` subclasses name the phase in which the connection was
lost, as Twisted's HTTP client does (``RequestNotSent``,
``RequestTransmissionFailed``, ``ResponseNeverReceived``, ``ResponseFailed``).
``OutcomeUnknown`` is raised instead when the request may have run and must
not be sent again.
"""

from __future__ import annotations

import reprlib
from typing import Any, Mapping, Optional, Tuple, Type

from ..protocol import REQUEST_TOO_LARGE, SERVER_BUSY
from ..verbs import FailurePoint

__all__ = [
    "ClientError",
    "RemoteError",
    "UnknownMethod",
    "NoSuchFile",
    "FileExists",
    "DirectoryNotEmpty",
    "PermissionDenied",
    "ReadError",
    "ReadOnlyError",
    "LockContention",
    "TokenMismatch",
    "ServerBusy",
    "TransportFailure",
    "RequestNotSent",
    "RequestTransmissionFailed",
    "ResponseNeverReceived",
    "ResponseFailed",
    "OutcomeUnknown",
    "DeadlineExceeded",
    "ClientClosed",
    "HostKeyError",
    "remote_error",
    "transport_failure",
]


_BRIEF = reprlib.Repr()
_BRIEF.maxlevel = 4
_BRIEF.maxother = 80


# Control characters a server sends in an error's text are shown escaped, never sent to a terminal.
_ESCAPE_CONTROLS = {code: f"\\x{code:02x}" for code in [*range(0x20), *range(0x7F, 0xA0)]}


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace").translate(_ESCAPE_CONTROLS)
    if isinstance(value, (tuple, list, dict)):
        return _BRIEF.repr(value)  # bounded: str() recurses once per nesting level
    return str(value)


class ClientError(Exception):
    """Something a smartserve client call could not do."""


class RemoteError(ClientError):
    """The server answered the request with an error.

    ``error_args`` is the error tuple as received; its first element names
    the error (``error_name``). ``body`` holds any body the error carried.
    """

    def __init__(self, verb: bytes, error_args: Tuple[Any, ...], body: bytes = b""):
        name = _text(error_args[0]) if error_args else "error"
        details = ", ".join(_text(arg) for arg in error_args[1:])
        super().__init__(f"{_text(verb)}: {name}" + (f" ({details})" if details else ""))
        self.verb = verb
        self.error_args = tuple(error_args)
        self.body = body

    @property
    def error_name(self) -> bytes:
        """The first element of the error tuple, such as ``b"NoSuchFile"``."""
        return self.error_args[0] if self.error_args else b""


class UnknownMethod(RemoteError):
    """The server does not know the verb."""


class NoSuchFile(RemoteError):
    """The path does not exist on the server."""


class FileExists(RemoteError):
    """The path already exists on the server."""


class DirectoryNotEmpty(RemoteError):
    """The directory to remove is not empty."""


class PermissionDenied(RemoteError):
    """The server refused access to the path."""


class ReadError(RemoteError):
    """The server could not read the path (for instance, it is a directory)."""


class ReadOnlyError(RemoteError):
    """The server, or this caller's access to it, is read-only."""


class LockContention(RemoteError):
    """Someone else holds the lock."""


class TokenMismatch(RemoteError):
    """The lock token does not match the lock held (or no lock is held)."""


class RequestTooLarge(RemoteError):
    """smartserve refused the request unrun: its body was over the server's ``--max-request-body``, or listed
    more keys than its ``--max-request-entries``."""


class ServerBusy(RemoteError):
    """smartserve refused the request unrun: request bodies of all its clients held its ``--max-request-memory``.

    The same request may be sent again later; ``SmartClient`` does so itself, after a backoff, within its
    resend limits. ``why_not_resent`` says why it did not, when it raises this.
    """

    why_not_resent: Optional[str] = None


_REMOTE_ERRORS: Mapping[bytes, Type[RemoteError]] = {
    b"UnknownMethod": UnknownMethod,
    b"NoSuchFile": NoSuchFile,
    b"FileExists": FileExists,
    b"DirectoryNotEmpty": DirectoryNotEmpty,
    b"PermissionDenied": PermissionDenied,
    b"ReadError": ReadError,
    b"ReadOnlyError": ReadOnlyError,
    b"LockContention": LockContention,
    b"TokenMismatch": TokenMismatch,
    REQUEST_TOO_LARGE: RequestTooLarge,
    SERVER_BUSY: ServerBusy,
}


def remote_error(verb: bytes, error_args: Tuple[Any, ...], body: bytes = b"") -> RemoteError:
    """The exception for an error tuple: the class named by its first element."""
    name = error_args[0] if error_args else b""
    if isinstance(name, str):
        name = name.encode("utf-8")
    if not isinstance(name, bytes):
        return RemoteError(verb, error_args, body)  # a list or dict names none of them, and cannot be looked up
    return _REMOTE_ERRORS.get(name, RemoteError)(verb, error_args, body)


class TransportFailure(ClientError):
    """The connection failed while a request was on it.

    ``point`` says how far the request got, ``reason`` what went wrong,
    ``drain_signal`` whether the server said it was draining (SSH
    exit-status 75) before any response byte arrived, and ``server_busy``
    whether it turned the connection away unread (``TooManyConnections``).
    Either way the server did not run the request (``not_run``).
    """

    point: FailurePoint = FailurePoint.BEFORE_WRITE

    def __init__(self, verb: bytes, reason: str, *, drain_signal: bool = False, server_busy: bool = False):
        super().__init__(f"{_text(verb)}: connection lost {self.point.value}: {reason}")
        self.verb = verb
        self.reason = reason
        self.drain_signal = drain_signal
        self.server_busy = server_busy

    @property
    def not_run(self) -> bool:
        """Whether the server said it did not run the request."""
        return self.drain_signal or self.server_busy


class RequestNotSent(TransportFailure):
    """No byte of the request was written: the server never saw it."""

    point = FailurePoint.BEFORE_WRITE


class RequestTransmissionFailed(TransportFailure):
    """The request was only partly written; the server discards it."""

    point = FailurePoint.DURING_WRITE


class ResponseNeverReceived(TransportFailure):
    """The whole request was written but no response byte arrived."""

    point = FailurePoint.AFTER_WRITE


class ResponseFailed(TransportFailure):
    """The connection was lost in the middle of the response."""

    point = FailurePoint.DURING_RESPONSE


_BY_POINT: Mapping[FailurePoint, Type[TransportFailure]] = {
    cls.point: cls
    for cls in (RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived, ResponseFailed)
}


def transport_failure(
    verb: bytes, point: FailurePoint, reason: str, *, drain_signal: bool = False, server_busy: bool = False
) -> TransportFailure:
    """The phase exception for a request lost at ``point``."""
    return _BY_POINT[point](verb, reason, drain_signal=drain_signal, server_busy=server_busy)


class OutcomeUnknown(ClientError):
    """The request may or may not have run, and may not be sent again.

    ``verb`` names the request; ``cause`` is the ``TransportFailure`` that
    left the outcome unknown, and ``why_not_resent`` says why it was not
    sent again.
    """

    def __init__(self, verb: bytes, cause: TransportFailure, why_not_resent: str):
        super().__init__(
            f"outcome of {_text(verb)} unknown: {cause.reason} {cause.point.value}; "
            f"not resent: {why_not_resent}"
        )
        self.verb = verb
        self.cause = cause
        self.why_not_resent = why_not_resent


class DeadlineExceeded(ClientError):
    """The call's overall deadline passed before a request could be sent."""

    def __init__(self, verb: bytes, deadline: float, last_error: Optional[Exception] = None):
        detail = f" (last error: {last_error})" if last_error is not None else ""
        super().__init__(f"{_text(verb)}: no answer within {deadline:g} s{detail}")
        self.verb = verb
        self.deadline = deadline
        self.last_error = last_error


class ResponseTooLarge(ClientError):
    """A response body collected whole grew past the client's limit; the connection was dropped.

    The server did answer, so the request ran. A body that large is taken
    part by part with ``on_chunk`` instead.
    """

    def __init__(self, verb: bytes, limit: int):
        super().__init__(f"{_text(verb)}: response body over {limit} bytes; take it with on_chunk")
        self.verb = verb
        self.limit = limit


class ClientClosed(ClientError):
    """The client was closed; it sends nothing more."""


class HostKeyError(ClientError):
    """The SSH server's host key is unknown or does not match known_hosts."""


class LoginRefused(ClientError):
    """The SSH server refused every key the client offered; trying again would not change that."""


class CommandRefused(ConnectionError):
    """The SSH server refused to run the remote command: nothing read what was sent on its channel.

    The connection ends with it as the reason; a request written before
    the refusal arrived counts as never sent, since no server read it.
    """

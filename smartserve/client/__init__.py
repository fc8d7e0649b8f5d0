"""A Twisted client for Breezy's smart protocol that resends only what is safe.

``SmartClient.from_url("bzr://host/path")`` gives a client whose ``call``
returns a Deferred firing with a ``Reply(args, body)``. Before each request
it makes sure the connection is still open, and after a lost connection it
resends exactly what ``smartserve.verbs.may_resend`` allows, within the
limits of a ``RetryPolicy``. ``BlockingClient`` wraps it for programs that
do not run a reactor. See doc/client.md.
"""

from ._blocking import BlockingClient
from ._client import ClientStats, SmartClient
from ._endpoints import BZR_PORT, SSH_PORT, Target, parse_url
from ._exceptions import (
    ClientClosed,
    ClientError,
    DeadlineExceeded,
    DirectoryNotEmpty,
    FileExists,
    HostKeyError,
    LoginRefused,
    LockContention,
    NoSuchFile,
    OutcomeUnknown,
    PermissionDenied,
    ReadError,
    ReadOnlyError,
    RemoteError,
    RequestNotSent,
    RequestTooLarge,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
    ResponseTooLarge,
    ServerBusy,
    TokenMismatch,
    TransportFailure,
    UnknownMethod,
)
from ._policy import RetryBudget, RetryPolicy, backoff_delay
from ._protocol import DRAIN_EXIT_STATUS, Outgoing, Reply, SmartClientProtocol
from ._ssh import DEFAULT_REMOTE_COMMAND, SSHOptions, show_ssh_trace

__all__ = [
    "SmartClient",
    "BlockingClient",
    "SSHOptions",
    "show_ssh_trace",
    "DEFAULT_REMOTE_COMMAND",
    "ClientStats",
    "SmartClientProtocol",
    "Outgoing",
    "Reply",
    "RetryPolicy",
    "RetryBudget",
    "backoff_delay",
    "Target",
    "parse_url",
    "BZR_PORT",
    "SSH_PORT",
    "DRAIN_EXIT_STATUS",
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
    "RequestTooLarge",
    "ServerBusy",
    "TransportFailure",
    "RequestNotSent",
    "RequestTransmissionFailed",
    "ResponseNeverReceived",
    "ResponseFailed",
    "OutcomeUnknown",
    "ResponseTooLarge",
    "DeadlineExceeded",
    "ClientClosed",
    "HostKeyError",
    "LoginRefused",
]

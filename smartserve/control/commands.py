"""The AMP commands spoken on the control socket."""

from twisted.protocols import amp

__all__ = ["Status", "Drain", "WaitDrained", "TakeOver", "ListenerDescriptor", "NotServing", "BadTimeout"]


class NotServing(Exception):
    """The server cannot hand its listeners over: it is draining, or another process is taking them."""


class BadTimeout(Exception):
    """The drain timeout is not a finite number of seconds, 0 or more; nothing was changed."""


class Status(amp.Command):
    """Where the server stands: drain state, connections, requests per verb class."""

    arguments = []
    response = [
        (b"pid", amp.Integer()),
        (b"state", amp.Unicode()),
        (b"connections", amp.Integer()),
        (b"busy", amp.Integer()),
        (b"aborted", amp.Integer()),
        (b"requests", amp.AmpList([(b"verb_class", amp.Unicode()), (b"count", amp.Integer())])),
    ]


class Drain(amp.Command):
    """Start draining (or shorten the deadline of a drain in progress); answers at once."""

    arguments = [(b"timeout", amp.Float(optional=True))]
    response = [(b"state", amp.Unicode())]
    errors = {BadTimeout: b"BAD_TIMEOUT"}


class WaitDrained(amp.Command):
    """Answer once the server is drained: how many connections the deadline aborted."""

    arguments = []
    response = [(b"state", amp.Unicode()), (b"aborted", amp.Integer())]


class TakeOver(amp.Command):
    """Hand every listening socket to the caller, by file-descriptor passing.

    The caller gets one descriptor per listener, in the order of ``names``,
    and should then start serving on them and send ``Drain``.
    """

    arguments = []
    response = [(b"names", amp.ListOf(amp.Unicode())), (b"families", amp.ListOf(amp.Integer()))]
    errors = {NotServing: b"NOT_SERVING"}


class ListenerDescriptor(amp.Command):
    """One listening socket's descriptor, by index into ``TakeOver``'s names."""

    arguments = [(b"index", amp.Integer())]
    response = [(b"descriptor", amp.Descriptor())]
    errors = {NotServing: b"NOT_SERVING"}

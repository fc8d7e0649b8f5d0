"""The AMP commands spoken on the control socket."""

from twisted.protocols import amp

__all__ = [
    "Status", "Drain", "WaitDrained", "TakeOver", "ListenerDescriptor", "NotServing", "BadTimeout", "BadArguments",
    "QuietAMP",
]


class QuietAMP(amp.AMP):
    """AMP without its info lines when a connection is made and lost: four lines for every `smartserve status`."""

    def makeConnection(self, transport):
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason):
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None


class NotServing(Exception):
    """The server cannot hand its listeners over: it is draining, or another process is taking them."""


class BadTimeout(Exception):
    """The drain timeout is not a finite number of seconds, 0 or more; nothing was changed."""


class BadArguments(amp.RemoteAmpError):
    """A command's arguments cannot be read (one is missing, or not of its type); nothing was done."""

    def __init__(self, description: str):
        super().__init__(b"BAD_ARGUMENTS", description)


class _ControlCommand(amp.Command):
    """A control command whose unreadable arguments are refused with ``BadArguments``.

    AMP would answer them with an unknown error, close the connection and
    log a traceback, as for a bug in the server.
    """

    errors = {BadArguments: b"BAD_ARGUMENTS"}

    @classmethod
    def parseArguments(cls, box, protocol):
        command = cls.commandName.decode()
        objects: dict = {}
        strings = box.copy()
        for name, argument in cls.arguments:
            if name not in strings and not argument.optional:
                raise BadArguments(f"{command}: argument {name.decode()} is missing")
            try:
                argument.fromBox(name, strings, objects, protocol)
            except Exception as error:
                raise BadArguments(f"{command}: argument {name.decode()} cannot be read: {error}") from None
        return objects


class Status(_ControlCommand):
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


class Drain(_ControlCommand):
    """Start draining (or shorten the deadline of a drain in progress); answers at once."""

    arguments = [(b"timeout", amp.Float(optional=True))]
    response = [(b"state", amp.Unicode())]
    errors = {BadTimeout: b"BAD_TIMEOUT"}


class WaitDrained(_ControlCommand):
    """Answer once the server is drained: how many connections the deadline aborted."""

    arguments = []
    response = [(b"state", amp.Unicode()), (b"aborted", amp.Integer())]


class TakeOver(_ControlCommand):
    """Hand every listening socket to the caller, by file-descriptor passing.

    The caller gets one descriptor per listener, in the order of ``names``,
    and should then start serving on them and send ``Drain``.
    """

    arguments = []
    response = [(b"names", amp.ListOf(amp.Unicode())), (b"families", amp.ListOf(amp.Integer()))]
    errors = {NotServing: b"NOT_SERVING"}


class ListenerDescriptor(_ControlCommand):
    """One listening socket's descriptor, by index into ``TakeOver``'s names."""

    arguments = [(b"index", amp.Integer())]
    response = [(b"descriptor", amp.Descriptor())]
    errors = {NotServing: b"NOT_SERVING"}

"""Builds the smartserve service tree from command-line options (``twistd smartserve``)."""

from __future__ import annotations

import os

from twisted.application import service, strports
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from .server.backends.bzr import BzrBackend
from .server.dispatcher import Dispatcher
from .server.jail import Writable
from .server.protocol import SmartServerFactory

__all__ = ["Options", "makeService"]

log = Logger()


class Options(usage.Options):
    """Options of ``twistd smartserve``."""

    synopsis = "[options]"
    longdesc = (
        "Serve Breezy branches over bzr+ssh:// and bzr://. With no options, "
        "serves ./smartserve-data/branches over SSH on 127.0.0.1:5022."
    )
    optParameters = [
        ["data", None, "smartserve-data", "Data folder: host key, keys, control socket (created if missing)."],
        ["root", None, None, "Folder of served branches [default: DATA/branches]."],
        ["bzr", None, None, "Endpoint for bzr:// (e.g. tcp:4155:interface=127.0.0.1); off when not given."],
        ["idle-timeout", None, 300.0, "Seconds a connection may sit idle before it is closed (0: never).", float],
        ["threads", None, 16, "Worker threads that run requests.", int],
    ]
    optFlags = [
        ["bzr-allow-writes", None, "Let bzr:// clients (who are anonymous) write; read-only otherwise."],
    ]

    def postOptions(self) -> None:
        self["data"] = os.path.abspath(self["data"])
        if self["root"] is None:
            self["root"] = os.path.join(self["data"], "branches")
        self["root"] = os.path.abspath(self["root"])
        if self["idle-timeout"] < 0:
            raise usage.UsageError("--idle-timeout must be 0 or more")
        if self["threads"] < 1:
            raise usage.UsageError("--threads must be at least 1")


class _ThreadPoolService(service.Service):
    """Starts and stops the worker pool with the application."""

    def __init__(self, pool: ThreadPool):
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


def makeService(options: Options) -> service.MultiService:
    """Build the service tree: worker pool, then the listeners."""
    from twisted.internet import reactor

    for folder in (options["data"], options["root"]):
        os.makedirs(folder, exist_ok=True)
    top = service.MultiService()
    pool = ThreadPool(minthreads=1, maxthreads=options["threads"], name="smartserve-worker")
    _ThreadPoolService(pool).setServiceParent(top)
    backend = BzrBackend(options["root"], pool, reactor)
    factory = SmartServerFactory(
        Dispatcher(backend),
        idle_timeout=options["idle-timeout"],
        tcp_writable=Writable.everywhere() if options["bzr-allow-writes"] else Writable.nowhere(),
    )
    top.smart_factory = factory
    if options["bzr"]:
        endpoint = endpoints.serverFromString(reactor, options["bzr"])
        listener = StreamServerEndpointService(endpoint, factory)
        listener.setName("bzr")
        listener.setServiceParent(top)
    return top

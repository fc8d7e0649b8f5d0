"""Builds the smartserve service tree from command-line options (``twistd smartserve``)."""

from __future__ import annotations

import gc
import math
import os
import resource
import signal
import stat

from twisted.application import service
from twisted.internet import defer, endpoints, task
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from ._folders import make_folder
from .control import client as control_client
from .control.admin import admin_site
from .control.server import Control, ControlFactory
from .listeners import Listener, ListenerGroup, SocketPathListener
from .metrics import ServerMetrics
from .protocol import Limits
from .server.accesslog import AccessLogFile, access_logger
from .server.backends.bzr import (
    DEFAULT_INLINE_READ_BYTES,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_BODY_ENTRIES,
    MAX_INLINE_READ_BYTES,
    BzrBackend,
    load_breezy_plugins,
)
from .server.bodymemory import DEFAULT_MAX_REQUEST_MEMORY
from .server.dispatcher import Dispatcher
from .server.drain import DrainController, DrainState
from .server.jail import Writable
from .server.protocol import (
    DEFAULT_HOLD_RESPONSE_BYTES,
    DEFAULT_MIN_REQUEST_RATE,
    DEFAULT_REQUEST_GRACE,
    SmartServerFactory,
)

__all__ = ["Options", "makeService", "SmartserveService"]

log = Logger()


class Options(usage.Options):
    """Options of ``twistd smartserve``."""

    synopsis = "[options]"
    longdesc = (
        "Serve Breezy branches over bzr+ssh:// and bzr://. With no options, "
        "serves ./smartserve-data/branches over SSH on 127.0.0.1:5022, with "
        "users' public keys in ./smartserve-data/keys/<user>.pub."
    )
    optParameters = [
        ["data", None, "smartserve-data", "Data folder: host key, keys, control socket (created if missing)."],
        ["root", None, None, "Folder of served branches [default: DATA/branches]."],
        ["ssh", None, "tcp:5022:interface=127.0.0.1", "Endpoint for bzr+ssh:// ('none' turns SSH off)."],
        ["keys", None, None, "Folder of users' keys, KEYS/<user>.pub [default: DATA/keys]."],
        ["access", None, None, "Access file granting write prefixes or read-only rights (see doc/access.md)."],
        ["host-key", None, None, "SSH host key file [default: DATA/ssh_host_ed25519_key, made if missing]."],
        [
            "login-grace-time", None, 120.0,
            "Seconds an SSH client has, from connecting, to log in (0: no limit of its own; the SSH "
            "library's 20 minutes from the first login request still apply).", float,
        ],
        ["max-unauthenticated", None, 50, "SSH connections allowed at once before login.", int],
        [
            "max-unauthenticated-per-address", None, 0,
            "SSH connections one client address may have at once before login (0: no limit of its own).", int,
        ],
        ["max-auth-tries", None, 6, "Refused SSH login attempts (each key offered counts) before a disconnect.", int],
        ["max-sessions-per-user", None, 10, "Smart sessions one user may have open at once.", int],
        ["bzr", None, None, "Endpoint for bzr:// (e.g. tcp:4155:interface=127.0.0.1); off when not given."],
        [
            "bzr-max-connections", None, 500,
            "bzr:// connections open at once; more are closed as soon as they are made (0: no limit).", int,
        ],
        [
            "bzr-max-connections-per-address", None, 0,
            "bzr:// connections open at once from one client address, the one a PROXY header gives behind "
            "haproxy; more are turned away (0: no limit of its own).", int,
        ],
        ["idle-timeout", None, 300.0, "Seconds a connection may sit idle before it is closed (0: never).", float],
        [
            "min-request-rate", None, DEFAULT_MIN_REQUEST_RATE,
            "Bytes per second a request must arrive at, on average, once its --request-grace is spent; "
            "a slower one closes its connection (0: no limit).", int,
        ],
        [
            "request-grace", None, DEFAULT_REQUEST_GRACE,
            "Seconds a request may take to arrive before --min-request-rate applies.", float,
        ],
        ["threads", None, 16, "Worker threads that run requests.", int],
        [
            "inline-read-bytes", None, DEFAULT_INLINE_READ_BYTES,
            "Reads of files up to this size run on the reactor thread (0: every request in the worker pool).", int,
        ],
        [
            "max-request-body", None, DEFAULT_MAX_BODY_BYTES,
            "Bytes of a request body the server keeps whole for its handler, and of one record of a push; "
            "a larger one is refused unrun.", int,
        ],
        [
            "max-request-entries", None, DEFAULT_MAX_BODY_ENTRIES,
            "Lines of a request body that lists keys (a checkout's files, a log's revisions), and "
            "arguments of a request (get_parent_map's revisions); a longer list is refused unrun.", int,
        ],
        [
            "max-request-memory", None, DEFAULT_MAX_REQUEST_MEMORY,
            "Bytes of request bodies all connections together may hold; a request whose body arrives "
            "past it is refused unrun with ServerBusy (0: no limit).", int,
        ],
        [
            "max-request-memory-per-caller", None, 0,
            "Bytes of request bodies the connections of one caller (an SSH user, a bzr:// client address) may "
            "hold together; a request whose body arrives past it is refused unrun with ServerBusy (0: no limit "
            "of its own).", int,
        ],
        [
            "hold-response-bytes", None, DEFAULT_HOLD_RESPONSE_BYTES,
            "Bytes of a streamed response (a branch's revisions) held back, with its response tuple, until "
            "the stream ends, so a server that dies while making it has sent nothing a client cannot resend "
            "(0: send from the first slice).", int,
        ],
        ["control", None, None, "Control socket path [default: DATA/control.sock]."],
        ["takeover", None, None, "Take the listening sockets of the server on this control socket, then drain it."],
        ["drain-timeout", None, 600.0, "Seconds a drain waits for busy connections before aborting them.", float],
        ["drain-grace", None, 0.0, "Seconds between /health turning 503 and the listeners closing.", float],
        ["drain-linger", None, 0.0, "Seconds a draining server waits for another request on an idle connection.", float],
        [
            "drain-spread", None, 0.0,
            "Seconds over which the linger's end is spread, per connection, so clients do not all reconnect at once.",
            float,
        ],
        ["access-log", None, None, "File of access lines, one per request [default: DATA/access.log]; '-': the twistd log."],
        ["admin", None, None, "Endpoint of the admin HTTP server (/health, /metrics); off when not given."],
    ]
    optFlags = [
        ["bzr-allow-writes", None, "Let bzr:// clients (who are anonymous) write; read-only otherwise."],
        ["ssh-debug", None, "Log Conch's SSH trace: key exchange, each login attempt, channels (about 15 lines a login)."],
        [
            "no-plugins", None,
            "Load no Breezy plugins. brz serve loads them: their hooks (mail on a push, a push policy) then "
            "run on the server, and formats they add are served.",
        ],
    ]

    def postOptions(self) -> None:
        self["data"] = os.path.abspath(self["data"])
        if self["root"] is None:
            self["root"] = os.path.join(self["data"], "branches")
        self["root"] = os.path.abspath(self["root"])
        if self["keys"] is None:
            self["keys"] = os.path.join(self["data"], "keys")
        if self["access-log"] is None:
            self["access-log"] = os.path.join(self["data"], "access.log")
        if self["control"] is None:
            self["control"] = os.path.join(self["data"], "control.sock")
        # twistd changes to --rundir after the service is made: a relative
        # path read later (keys at each login, the access file on change)
        # would be looked up there.
        for name in ("keys", "access", "host-key", "control", "takeover"):
            if self[name] is not None:
                self[name] = os.path.abspath(self[name])
        if self["access-log"] != "-":
            self["access-log"] = os.path.abspath(self["access-log"])
        if self["ssh"] in ("none", "off", ""):
            self["ssh"] = None
        for name in ("ssh", "bzr", "admin"):
            _check_endpoint(name, self[name])
        non_negative = (
            "idle-timeout", "drain-timeout", "drain-grace", "drain-linger", "drain-spread", "login-grace-time",
            "inline-read-bytes", "bzr-max-connections", "bzr-max-connections-per-address",
            "max-unauthenticated-per-address", "max-request-memory", "max-request-memory-per-caller",
            "hold-response-bytes", "min-request-rate", "request-grace",
        )
        for name in non_negative:
            if not math.isfinite(self[name]):
                raise usage.UsageError(f"--{name} must be a finite number")
            if self[name] < 0:
                raise usage.UsageError(f"--{name} must be 0 or more")
        if self["inline-read-bytes"] > MAX_INLINE_READ_BYTES:
            raise usage.UsageError(
                f"--inline-read-bytes must be at most {MAX_INLINE_READ_BYTES}: "
                "an inline read stops every connection while it runs"
            )
        at_least_one = (
            "threads", "max-unauthenticated", "max-auth-tries", "max-sessions-per-user", "max-request-body",
            "max-request-entries",
        )
        for name in at_least_one:
            if self[name] < 1:
                raise usage.UsageError(f"--{name} must be at least 1")
        for name in ("max-request-memory", "max-request-memory-per-caller"):
            if 0 < self[name] < self["max-request-body"]:
                raise usage.UsageError(
                    f"--{name} must be 0 or at least --max-request-body: "
                    "a request the size of the body limit would always be refused"
                )
        if not (self["ssh"] or self["bzr"]):
            raise usage.UsageError("nothing to serve: give --ssh or --bzr")


def raise_open_file_limit() -> tuple:
    """Raise the soft limit on open files to the hard limit; returns (before, after).

    Every connection, SSH session and open repository file takes a file
    descriptor. The usual soft limit, 1024, would make the server refuse
    connections long before its memory runs out, while the hard limit is the
    one the administrator set (systemd's ``LimitNOFILE=``). Servers raise
    it as they start, as Go's runtime does for every program.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _kernel_open_file_limit()
    if target is None or soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warn("Could not raise the open-file limit from {soft} to {target}: {error}", soft=soft, target=target,
                 error=str(exc))
        return soft, soft
    return soft, target


def _kernel_open_file_limit():
    """The most files a process may open (an unlimited hard limit still stops there), or None if unknown."""
    try:
        with open("/proc/sys/fs/nr_open") as nr_open:
            return int(nr_open.read())
    except (OSError, ValueError):
        return None


def freeze_loaded_objects() -> None:
    """Move the objects that start-up made out of the garbage collector's way.

    A full collection walks every object the collector tracks; with Breezy,
    Twisted and Conch loaded that stalled every connection of the process
    for 23-46 ms during branches on the benchmark machine. Frozen
    (``gc.freeze``), the start-up objects are skipped, and a full
    collection walks only what requests have made since: about 7 ms. Garbage is collected first so
    that none of it is kept for good.
    """
    gc.collect()
    gc.freeze()


def _check_socket_path(path: str) -> None:
    """Raise unless ``path`` is free or a UNIX socket, which start-up may replace.

    Anything else there (a file, a folder) is the operator's, never removed.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise RuntimeError(f"{path} exists and is not a socket; give --control a path of its own")


class SmartserveService(service.MultiService):
    """The whole server: listeners, control socket, drain on stop and on SIGHUP.

    Stopping it (SIGTERM, SIGINT, twistd's stop) drains first; its Deferred
    fires once the last connection has closed or the drain deadline passed.
    """

    def __init__(self, reactor, options, control: Control, listeners: ListenerGroup, drainables=()):
        super().__init__()
        self.reactor = reactor
        self.options = options
        self.control = control
        self.listeners = listeners
        self.control_factory = ControlFactory(control, clock=reactor)
        self.control_listener = SocketPathListener("control", options["control"], self.control_factory, reactor)
        self.drainables = list(drainables)
        self._previous_handlers: dict = {}
        self._exiting = False
        self._start_failed = False

    def startService(self) -> None:
        super().startService()
        self._previous_handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._sighup)
        self.control.controller.when_drained().addCallback(self._drained)
        defer.ensureDeferred(self._start()).addErrback(self._failed_to_start)

    def _drained(self, state) -> None:
        # Let the answers to WaitDrained be written first, then close the
        # control connections (which flushes them), then exit.
        self.reactor.callLater(0, self._exit_after_drain)

    def _exit_after_drain(self) -> None:
        def stop(_):
            if not self._exiting and self.reactor.running:
                self._exiting = True
                self.reactor.stop()

        self.control_factory.close_connections().addCallback(stop)

    async def _start(self) -> None:
        freeze_loaded_objects()
        before, after = raise_open_file_limit()
        if after != before:
            log.info("Open-file limit raised from {before} to {after}", before=before, after=after)
        path = self.options["control"]
        _check_socket_path(path)
        takeover = self.options["takeover"]
        old = None
        adopted = {}
        if takeover:
            try:
                old = await control_client.connect(self.reactor, takeover)
                adopted = await control_client.take_over(old)
            except control_client.NoServer as exc:
                log.warn("Nothing to take over ({error}); listening afresh", error=str(exc))
                old = None
        if old is None or takeover != path:
            # The control path may still be another live server's: one this
            # process did not take over, or none when --takeover named a
            # path where nothing answers.
            await self._refuse_if_another_server_answers(path)
        await self.listeners.listen_all(adopted)
        if os.path.exists(path):
            os.unlink(path)
        await self.control_listener.listen()
        self.control.socket_listener = self.control_listener
        self.control.socket_path = path
        if old is not None:
            state = await control_client.drain(old, self.options["drain-timeout"])
            log.info("Took over {names}; the old server is {state}", names=sorted(adopted), state=state)
            old.transport.loseConnection()

    async def _refuse_if_another_server_answers(self, path: str) -> None:
        """Raise if a server answers on the control socket ``path``; remove a socket left there by one that is gone."""
        if not os.path.exists(path):
            return
        try:
            other = await control_client.connect(self.reactor, path, timeout=2)
        except control_client.NoServer:
            os.unlink(path)
        else:
            other.transport.loseConnection()
            raise RuntimeError(f"another server answers on {path}; use --takeover {path} to replace it")

    def _failed_to_start(self, failure) -> None:
        log.critical("smartserve could not start: {error}", error=failure.getErrorMessage(), failure=failure)
        self._exiting = True
        self._start_failed = True
        # twistd has no exit status of its own: leave with 1 once shut down.
        self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    def _sighup(self, signum, frame) -> None:
        self.reactor.callFromThread(self._drain_then_exit)

    def _drain_then_exit(self) -> None:
        if self._exiting or self.control.controller.state is not DrainState.SERVING:
            log.info("SIGHUP: already draining")
            return
        log.info("SIGHUP: draining, then exiting")
        self.control.drain()

    def _stop_signal_while_stopping(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        self.reactor.callFromThread(log.info, "{signal}: already draining", signal=name)

    def stopService(self):
        """Drain, then stop; the Deferred fires once drained and every listener is closed.

        Until then SIGHUP, SIGTERM and SIGINT only say that the drain goes
        on: the process must not die, nor the reactor be stopped twice,
        while a response is still being written.
        """
        self._exiting = True
        if self._start_failed:
            return self._close_at_once()
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            previous = signal.signal(signum, self._stop_signal_while_stopping)
            self._previous_handlers.setdefault(signum, previous)
        d = self.control.drain()

        def drained(_):
            # The answers to WaitDrained are written in this turn: close the
            # control connections in the next, once they are flushed, so
            # that `smartserve drain` hears the end before the reactor stops.
            return defer.gatherResults(
                [
                    self.control_listener.stop_listening(),
                    self.listeners.stop(all_listeners=True),
                    task.deferLater(self.reactor, 0, self.control_factory.close_connections),
                ]
            )

        def restore_signal_handlers(result):
            handlers, self._previous_handlers = self._previous_handlers, {}
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            return result

        d.addCallback(drained)
        d.addCallback(lambda _: service.MultiService.stopService(self))
        d.addBoth(restore_signal_handlers)
        return d

    def _close_at_once(self) -> defer.Deferred:
        """Stop a server that could not start: close what it opened and abort its connections, with no drain.

        It never served as asked, so nothing is owed to clients that got
        in meanwhile, and a drain grace would only keep serving them.
        """
        for drainable in self.drainables:
            drainable.abort()
        closed = defer.gatherResults([self.control_listener.stop_listening(), self.listeners.stop(all_listeners=True)])
        closed.addCallback(lambda _: self.control_factory.close_connections())
        return closed.addCallback(lambda _: service.MultiService.stopService(self))


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


def makeService(options: Options, reactor=None) -> SmartserveService:
    """Build the service tree from ``options``.

    A file or folder it cannot use (a data folder that is a file, a missing
    access file, a bad host key) ends the process with a one-line error on
    stderr and exit status 1, before anything listens.
    """
    try:
        return _make_service(options, reactor)
    except (OSError, _SetupError) as error:
        raise SystemExit(f"smartserve could not start: {error}") from None


def _check_endpoint(option: str, description: str | None) -> None:
    """Raise a usage error for an endpoint description Twisted cannot parse, before anything starts.

    Only parsing is checked: whether the address can be listened on, or
    systemd passed a socket, is found when the server listens.
    """
    if not description:
        return
    try:
        endpoints.serverFromString(None, description)
    except (ValueError, TypeError, KeyError) as error:
        raise usage.UsageError(f"--{option} {description}: not an endpoint description Twisted reads: {error}") from None
    except Exception:
        pass  # parsed, but needs what only listening has (an inherited socket, an SSL module)


class _SetupError(Exception):
    """A file the options name cannot be used; the message says which and why."""


def _make_service(options: Options, reactor) -> SmartserveService:
    if reactor is None:
        from twisted.internet import reactor
    make_folder("data", options["data"])
    make_folder("root", options["root"])
    pool = ThreadPool(minthreads=1, maxthreads=options["threads"], name="smartserve-worker")
    if not options["no-plugins"]:
        load_breezy_plugins()
    backend = BzrBackend(
        options["root"],
        pool,
        reactor,
        inline_read_bytes=options["inline-read-bytes"],
        max_body_bytes=options["max-request-body"],
        max_body_entries=options["max-request-entries"],
    )
    metrics = ServerMetrics()
    access_file = None
    if options["access-log"] != "-":
        try:
            access_file = AccessLogFile(options["access-log"])
        except OSError as error:
            raise _SetupError(f"--access-log {options['access-log']}: {error.strerror}") from None
    smart_factory = SmartServerFactory(
        Dispatcher(backend),
        clock=reactor,
        idle_timeout=options["idle-timeout"],
        # A body part over the limit is refused whatever it holds: it is taken as it comes, never held whole.
        limits=Limits(max_whole_part_size=options["max-request-body"]),
        tcp_writable=Writable.everywhere() if options["bzr-allow-writes"] else Writable.nowhere(),
        metrics=metrics,
        drain_linger=options["drain-linger"],
        drain_spread=options["drain-spread"],
        access_log=access_logger(access_file),
        max_bzr_connections=options["bzr-max-connections"],
        max_bzr_connections_per_address=options["bzr-max-connections-per-address"],
        max_request_memory=options["max-request-memory"],
        hold_response_bytes=options["hold-response-bytes"],
        max_request_memory_per_caller=options["max-request-memory-per-caller"],
        min_request_rate=options["min-request-rate"],
        request_grace=options["request-grace"],
    )
    controller = DrainController(reactor, grace=options["drain-grace"], default_timeout=options["drain-timeout"])
    metrics.watch_connections("smart", smart_factory)
    metrics.watch_bzr_refusals(smart_factory)
    if access_file is not None:
        metrics.watch_access_log(access_file)
    metrics.watch_drain(controller)
    listeners = ListenerGroup()
    factories = [smart_factory]
    drainables = []
    if options["ssh"]:
        from .ssh import SSHSetupError, make_ssh_factory, show_conch_trace

        show_conch_trace(options["ssh-debug"])
        try:
            ssh_factory = make_ssh_factory(
                smart_factory=smart_factory,
                data_dir=options["data"],
                host_key_paths=[options["host-key"]] if options["host-key"] else [],
                keys_dir=options["keys"],
                access_file=options["access"],
                login_grace_time=options["login-grace-time"],
                max_unauthenticated=options["max-unauthenticated"],
                max_unauthenticated_per_address=options["max-unauthenticated-per-address"],
                max_auth_tries=options["max-auth-tries"],
                max_sessions_per_user=options["max-sessions-per-user"],
                idle_timeout=options["idle-timeout"],
                clock=reactor,
            )
        except SSHSetupError as error:
            raise _SetupError(str(error)) from None
        listeners.add(Listener("ssh", options["ssh"], ssh_factory, reactor))
        metrics.watch_connections("ssh", ssh_factory)
        metrics.watch_ssh(ssh_factory)
        drainables.append(ssh_factory)
    if options["bzr"]:
        listeners.add(Listener("bzr", options["bzr"], smart_factory, reactor))
    drainables.append(smart_factory)
    for drainable in drainables:
        controller.add_drainable(drainable)
    if options["admin"]:
        # /health keeps answering 503 through a drain, unless the listeners
        # were handed over: then the new process answers it.
        listeners.add(Listener("admin", options["admin"], admin_site(controller, metrics, clock=reactor), reactor, stops_on_drain=False))
    control = Control(controller, listeners, factories)
    controller.add_listener_stopper(lambda: listeners.stop(all_listeners=control.handed_over))
    top = SmartserveService(reactor, options, control, listeners, drainables)
    _ThreadPoolService(pool).setServiceParent(top)
    top.smart_factory = smart_factory
    top.metrics = metrics
    return top

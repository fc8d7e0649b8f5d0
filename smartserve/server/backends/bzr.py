"""The Breezy backend: Breezy's own server-side request classes, in a thread pool.

Each request runs through ``breezy.bzr.smart.request.SmartServerRequestHandler``,
the object ``brz serve`` uses between its wire decoder and the request
classes, so every verb behaves exactly as in ``brz serve``. Each step of a
request (start, body chunks, end) is one call into a bounded ``ThreadPool``,
so the reactor never waits on the repository; a response stream is made in
the pool at most 64 KiB ahead of what the connection has taken.

The one exception is a request that reads a single small file: ``hello``,
``has``, ``stat``, and ``get`` of a file of at most ``inline_read_bytes``.
It runs on the reactor thread, as twisted.web serves static files and nginx
reads them by default: handing it to a worker and back costs two thread
wake-ups, more than the read itself from the page cache. Servers whose
branches live on a network file system, where a read may take long, set
``inline_read_bytes`` to 0 to send every request to the pool.

A ``get`` or ``readv`` of more than 1 MiB is read from the file as the
connection takes it (``_large_reads``) rather than whole, as Breezy's own
requests do, so a file of gigabytes costs the server what a response
stream costs. ``Repository.tarball`` and ``Repository.pack``, which
Breezy's own server fails or ignores, work (``_large_reads``,
``_repairs``); ``_commands`` puts these requests in place of Breezy's.
Each repository a request opens is freed once the request is done with
it (``_repositories``): Breezy's would stay in memory for good.

Request bodies are bounded too. Breezy's handlers keep a body whole
until its end, except the insert_stream family, whose inserter thread
takes the body through a queue as it comes. Such a body is kept here
instead (a ``BodyCollector``, so that millions of tiny parts cost what
their bytes do) and handed to the handler as one chunk at its end: it
may grow to ``max_body_bytes`` and is then refused with
``RequestTooLarge`` before the request runs (a body Breezy parses into many times its size, such as
a ``readv``'s list of ranges, already at its ``PARSED_BODY_LIMITS``, and
a list of keys at ``max_body_entries`` lines). A push's body reaches the
inserter as whole records (``_container.RecordRegrouper``), each at most
``max_body_bytes``, and a step feeding an inserter waits until the
thread has taken all but ``STREAM_AHEAD_BYTES``, so a client that sends
faster than the repository takes its push is slowed down rather than
buffered. An error's arguments are cut to ``MAX_ERROR_ARGUMENT_BYTES``:
Breezy's message for an unexpected exception may quote a whole record.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Iterator, List, Optional

from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from ...protocol import DEFAULT_LIMITS, REQUEST_TOO_LARGE, BodyCollector
from ..caller import Caller
from ..dispatcher import Refusal
from ..interfaces import IBackend, IBodyStream, IRequestRun
from ..jail import Writable, backing_transport
from ..reply import Reply, StreamFailure
from ._container import PushStreamRefused, RecordRegrouper
from ._repositories import OpenedRepositories, track_opened_repositories

__all__ = ["BzrBackend", "configure_breezy", "load_breezy_plugins"]

log = Logger()

_configured = threading.Lock()
_breezy_state = []


def configure_breezy() -> None:
    """Set Breezy's process-wide state as ``brz serve`` does, once per process.

    No UI output (progress would go to the client's stderr) and lock waits
    fail at once instead of blocking a worker thread.
    """
    with _configured:
        if _breezy_state:
            return
        import breezy
        from breezy import lockdir, ui

        _breezy_state.append(breezy.initialize(setup_ui=False))
        ui.ui_factory = ui.SilentUIFactory()
        lockdir._DEFAULT_TIMEOUT_SECONDS = 0
        track_opened_repositories()
        _load_lazy_modules()


def load_breezy_plugins() -> None:
    """Load Breezy's plugins as ``brz serve`` does, once per process, logging which.

    The hooks they install run on the server (mail sent on a push, a
    policy refusing some pushes) and the formats they add can be served.
    Breezy's own environment variables apply (``BRZ_DISABLE_PLUGINS``,
    ``BRZ_PLUGIN_PATH``, ``BRZ_PLUGINS_AT``).
    """
    configure_breezy()
    import breezy
    from breezy import plugin

    plugin.load_plugins()
    for name, warnings in sorted(breezy.get_global_state().plugin_warnings.items()):
        for warning in warnings:
            log.warn("Breezy plugin {name}: {warning}", name=name, warning=warning)
    log.info("Breezy plugins loaded: {names}", names=", ".join(sorted(plugin.plugins())) or "none")


def _load_lazy_modules() -> None:
    """Import what Breezy would import on a new process's first requests.

    Its verb handlers and the default format's classes are registered
    lazily: about 70 ms of imports that would otherwise land on the first
    clients after every start or restart, in the middle of a deploy.
    """
    from breezy import controldir

    handlers = _registry().request_handlers
    for verb in handlers.keys():
        handlers.get(verb)
    default = controldir.format_registry.make_controldir("default")
    default.repository_format.network_name()
    default.get_branch_format().network_name()


def _registry():
    from breezy.bzr.smart import request

    return request


# Reads of at most this many bytes run on the reactor thread (see the module docstring).
DEFAULT_INLINE_READ_BYTES = 64 * 1024
# A body up to this size is written in one piece; a larger one (a large
# ``get_parent_map`` answer, say) goes out slice by slice with back-pressure,
# as streams do, so a slow connection never has the whole body queued in its
# buffers. A ``get`` or ``readv`` larger than this is streamed from its file.
LARGE_BODY_BYTES = 1024 * 1024
# An inline read is read whole while every connection waits, by Breezy's own
# classes rather than streamed: never more than a body that is not large.
MAX_INLINE_READ_BYTES = LARGE_BODY_BYTES
# Request bodies Breezy parses into Python objects many times their size are kept to these
# (or max_body_bytes, if less). A readv's list of ranges costs some 50 times its size; Breezy's
# own client asks for at most 5 MiB a request, whose list stays under 1 MiB even for ranges of
# 100 bytes. The graph searches of get_parent_map and get_stream cost some 15 times theirs;
# Breezy's client sends a few hundred bytes (a search of at most 100 generations).
PARSED_BODY_LIMITS = {
    b"readv": 2 * 1024 * 1024,
    b"Repository.get_parent_map": 16 * 1024 * 1024,
    b"Repository.get_stream": 16 * 1024 * 1024,
    b"Repository.get_stream_1.19": 16 * 1024 * 1024,
}

# Request bodies Breezy splits into one entry per line, each of which then costs it some 290 to
# 550 bytes and 6 to 15 µs (a key, a tuple, its slots in the repository's lookups): a
# checkout's list of files, the revisions of a log, the inventories a push still needs. Their
# lines are held to max_body_entries: a body of millions of tiny lines is small in bytes.
LISTED_BODY_VERBS = frozenset(
    (
        b"Repository.iter_files_bytes",
        b"Repository.iter_revisions",
        b"Repository.get_stream_for_missing_keys",
        b"Repository.pack",
        b"VersionedFileRepository.get_inventories",
    )
)
DEFAULT_MAX_BODY_ENTRIES = 250_000

# The largest body a handler may keep whole: the largest body part the codec takes.
DEFAULT_MAX_BODY_BYTES = DEFAULT_LIMITS.max_body_part_size

# What an inserter thread may have waiting in its queue before the step feeding it waits:
# at most this many bytes, or this many parts, whichever comes first.
STREAM_AHEAD_BYTES = 4 * 1024 * 1024
STREAM_AHEAD_PARTS = 64

# How much of an error the twistd log quotes.
_LOGGED_ERROR_BYTES = 1024

# Seconds between looks at whether an inserter thread a step waits for has ended.
_INSERTER_CHECK_SECONDS = 1.0

# Verbs that read one path's metadata at most.
_METADATA_VERBS = frozenset((b"hello", b"has", b"stat"))


@implementer(IBackend)
class BzrBackend:
    """Serves the branches under ``root`` with Breezy's request handlers."""

    def __init__(
        self,
        root: str,
        threadpool: ThreadPool,
        reactor,
        *,
        inline_read_bytes: int = DEFAULT_INLINE_READ_BYTES,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_body_entries: int = DEFAULT_MAX_BODY_ENTRIES,
    ):
        configure_breezy()
        self.root = root
        self.inline_read_bytes = inline_read_bytes
        self.max_body_bytes = max_body_bytes
        self.max_body_entries = max_body_entries
        self._pool = threadpool
        self._reactor = reactor
        self._verbs = frozenset(_registry().request_handlers.keys())
        self._transports = {}

    def body_limit(self, verb: bytes) -> int:
        """Bytes of a ``verb`` request's body that may be kept whole for its handler."""
        return min(self.max_body_bytes, PARSED_BODY_LIMITS.get(verb, self.max_body_bytes))

    def entry_limit(self, verb: bytes) -> Optional[int]:
        """Lines a ``verb`` request's body may have, for a body Breezy splits into one entry per line; else None."""
        return self.max_body_entries if verb in LISTED_BODY_VERBS else None

    def knows(self, verb: bytes) -> bool:
        return verb in self._verbs

    def start(self, caller: Caller, args) -> "_BzrRequestRun":
        if len(args) - 1 > self.max_body_entries:
            # Breezy turns each argument into objects of some 500 bytes as a line of a listed
            # body (get_parent_map's revisions come as arguments): held to the same limit.
            raise self._refused(
                caller, args, b"the request has more than the server's limit of %d arguments" % self.max_body_entries
            )
        transport = self._transport_for(caller.writable)
        # Each request sees the file system afresh (see jail.JailTransport.forget_checked).
        transport.forget_checked()
        return _BzrRequestRun(self, transport, caller, args, inline=self._runs_inline(transport, args))

    @staticmethod
    def _refused(caller: Caller, args, reason: bytes) -> Refusal:
        """The refusal of request ``args`` as too large, logged as the refusals of request bodies are."""
        caller.warn_about(log, args[0], "refused: {reason}", reason=reason.decode("utf-8"))
        return Refusal(Reply((REQUEST_TOO_LARGE, reason), success=False))

    def _runs_inline(self, transport, args) -> bool:
        """True for a request that reads one small file or one path's metadata."""
        if not self.inline_read_bytes:
            return False
        verb = args[0]
        if verb in _METADATA_VERBS:
            return True
        # Anything but a small readable file goes to the pool, where Breezy's
        # handler makes the error reply (for a path that is not bytes too).
        if verb != b"get" or len(args) != 2 or type(args[1]) is not bytes:
            return False
        try:
            size = transport.file_size(args[1].decode("utf-8"))
        except UnicodeDecodeError:
            return False
        return size is not None and size <= self.inline_read_bytes

    def _transport_for(self, writable: Writable):
        transport = self._transports.get(writable)
        if transport is None:
            transport = self._transports[writable] = backing_transport(self.root, writable)
        return transport

    def run_in_pool(self, function, *args):
        """Run ``function(*args)`` in the worker pool; returns a Deferred."""
        return deferToThreadPool(self._reactor, self._pool, function, *args)


@implementer(IRequestRun)
class _BzrRequestRun:
    """One request, driven step by step through Breezy's request handler.

    Each step is a job in the worker pool, and an abort is one more: with
    several workers, an abort's job may run beside a step still in
    progress, and a step may still wait for a worker when the connection
    is lost. So the steps and the abort take turns on a lock, and the
    abort is remembered, not decided when it is asked for: a step that
    gets a worker after it does nothing, so a request whose connection is
    gone never starts (a push would start Breezy's inserter thread, which
    then waits for good for a body that will never come).

    The repositories the request opens are released (``_repositories``)
    once it is done with them: when a step makes a reply, unless the reply
    streams its body, whose stream then releases them when it is closed;
    when a step fails; or when the request is aborted.
    """

    def __init__(self, backend: BzrBackend, transport, caller: Caller, args, *, inline: bool = False):
        self._backend = backend
        self._transport = transport
        self._caller = caller
        self._args = args
        self._inline = inline
        self._handler = None
        self._reply: Optional[Reply] = None
        self._failure_noted = False
        self._advanced = False
        self._aborted = False
        self._body_bytes = 0  # of a body the handler keeps whole
        self._kept_body = BodyCollector()  # that body, handed to the handler at its end
        self._body_newlines = 0  # of a body Breezy splits into lines (LISTED_BODY_VERBS)
        self._body_ends_line = True  # whether what came of that body so far ends with a newline
        self._regrouper: Optional[RecordRegrouper] = None  # of a push's body
        self._opened = OpenedRepositories()
        self._turn = threading.Lock()

    @property
    def held_body_bytes(self) -> int:
        """The body kept for the handler, or what of a push's next record has arrived."""
        if self._regrouper is not None:
            return self._regrouper.buffered_bytes
        return self._body_bytes if self._handler is not None else 0

    def advance(self, chunks: List[bytes], finished: bool):
        self._advanced = True
        if self._inline:  # a small read, whole in this call: it opens no repository
            try:
                return defer.succeed(self._note_server_failure(self._step(chunks, finished)))
            except Exception:
                return defer.fail()
        advanced = self._backend.run_in_pool(self._advance_in_thread, chunks, finished)
        return advanced.addCallback(self._note_server_failure)

    def _note_server_failure(self, reply: Optional[Reply]) -> Optional[Reply]:
        """Log a reply that carries an unexpected exception, or refuses a body too large, on the reactor thread.

        Breezy answers an exception it has no error reply for with
        ``("error", class, message)`` and writes the traceback to its own
        log file (brz.log); an operator looks in the twistd log, and a full
        disk or an I/O error on the served tree shows up there now. Text
        that is not UTF-8, almost always the client's, is noted as a refusal.
        """
        if reply is None or reply.success or self._failure_noted:
            return reply
        name = reply.args[:1]
        if name == (REQUEST_TOO_LARGE,):
            what = "refused: {reason}"
            detail = {"reason": reply.args[1].decode("utf-8", "replace")}
        elif reply.args[:2] == (b"error", b"UnicodeDecodeError"):
            what = "refused: {reason}"
            detail = {"reason": reply.args[2][:_LOGGED_ERROR_BYTES].decode("utf-8", "replace")}
        elif name == (b"error",):
            what = "failed on the server: {error}"
            detail = {"error": b": ".join(reply.args[1:3])[:_LOGGED_ERROR_BYTES].decode("utf-8", "replace")}
        else:
            return reply
        self._failure_noted = True  # later steps of the request hand back the same reply
        self._caller.warn_about(log, self._args[0], what, **detail)
        return reply

    def abort(self) -> None:
        self._aborted = True
        # An inline request runs whole within advance: nothing of it is left.
        if self._advanced and not self._inline and self._reply is None:
            self._backend.run_in_pool(self._abort_in_thread)

    def _advance_in_thread(self, chunks: List[bytes], finished: bool) -> Optional[Reply]:
        """One step of the request, in a worker thread (or on the reactor thread, for an inline read)."""
        with self._turn:
            if self._aborted:
                return None  # the connection is gone: the abort's own job cleans up
            try:
                with self._opened.collecting():
                    reply = self._step(chunks, finished)
            except BaseException:
                self._end_handler()  # the request goes no further: the protocol answers it with an error
                raise
            if reply is not None and not isinstance(reply.stream, _BzrBodyStream):
                self._opened.release()
            return reply

    def _step(self, chunks: List[bytes], finished: bool) -> Optional[Reply]:
        if self._reply is not None:
            return self._reply  # answered: the rest of the body is not the handler's
        handler = self._handler
        if handler is None:
            from ._repairs import RequestHandler

            if self._inline:  # a small read by construction: Breezy's own classes answer it fastest
                commands = _registry().request_handlers
            else:
                from ._commands import COMMANDS as commands
            handler = self._handler = RequestHandler(self._transport, commands=commands, root_client_path="/")
            handler.args_received(self._args)
        inserter = _inserter_of(handler)
        if inserter is None:
            limit = self._backend.body_limit(self._args[0])
            entry_limit = self._backend.entry_limit(self._args[0])
            for chunk in chunks:
                if handler.finished_reading:
                    break
                self._body_bytes += len(chunk)
                if self._body_bytes > limit:
                    return self._body_too_large()
                if entry_limit is not None and chunk:
                    self._body_newlines += chunk.count(b"\n")
                    self._body_ends_line = chunk.endswith(b"\n")
                    if self._body_newlines > entry_limit:
                        return self._too_many_entries(entry_limit)
                self._kept_body.add(chunk)
            if finished and entry_limit is not None and self._body_lines() > entry_limit:
                return self._too_many_entries(entry_limit)
            if finished and self._kept_body.size and not handler.finished_reading:
                # Breezy's handlers outside the insert_stream family only join
                # the chunks at the end: one chunk, not millions of tiny ones.
                handler.accept_body(self._kept_body.take())
        else:
            if self._regrouper is None:
                self._regrouper = RecordRegrouper(self._backend.max_body_bytes)
            try:
                units = [unit for chunk in chunks for unit in self._regrouper.feed(chunk)]
            except PushStreamRefused as refused:
                return self._push_refused(refused)
            if finished:
                units.append(self._regrouper.rest())
            for unit in units:
                if handler.finished_reading or not inserter.insert_thread.is_alive():
                    # An inserter that ended takes nothing more; the end of the request reports how it ended.
                    break
                if unit:
                    handler.accept_body(unit)
            if units:
                self._wait_for_inserter(inserter)
        if finished and not handler.finished_reading:
            handler.end_received()
        if handler.finished_reading and handler.response is not None:
            self._reply = _reply_from(handler.response, self._backend, self._opened)
        return self._reply

    def _body_too_large(self) -> Reply:
        """Refuse the request: its body is over the limit. The handler and the parts it kept are dropped unrun."""
        message = b"the request body is over the server's limit of %d bytes" % self._backend.body_limit(self._args[0])
        return self._refuse((REQUEST_TOO_LARGE, message))

    def _body_lines(self) -> int:
        """Lines of the body received, the last one counted whether or not a newline ends it."""
        return self._body_newlines + (0 if self._body_ends_line else 1)

    def _too_many_entries(self, entry_limit: int) -> Reply:
        """Refuse the request: its body lists more entries than Breezy may split it into. Nothing of it is kept."""
        message = b"the request body lists more than the server's limit of %d entries" % entry_limit
        return self._refuse((REQUEST_TOO_LARGE, message))

    def _push_refused(self, refused: PushStreamRefused) -> Reply:
        """Refuse a push whose stream breaks a limit: its inserter is stopped, as for a lost connection, and nothing is kept."""
        self._release_handler()
        message = str(refused).encode("utf-8")
        if refused.too_large:
            return self._refuse((REQUEST_TOO_LARGE, message))
        return self._refuse((b"error", b"breezy.bzr.pack.InvalidRecordError", message))  # as Breezy names its own

    def _refuse(self, args: tuple) -> Reply:
        """Answer ``args`` as the request's error and drop its handler and body: it never runs."""
        self._handler = None
        self._kept_body = BodyCollector()
        self._reply = Reply(args, success=False)
        return self._reply

    def _wait_for_inserter(self, inserter) -> None:
        """Return once the inserter thread has taken all but a little of the body (or ended, or the request was aborted).

        The thread's queue notifies ``not_full`` on every item it hands out,
        however long the queue may grow.
        """
        body_queue = inserter.queue
        with body_queue.not_full:
            while (
                not self._aborted
                and _holds_too_much(body_queue.queue)
                and inserter.insert_thread.is_alive()
            ):
                body_queue.not_full.wait(_INSERTER_CHECK_SECONDS)

    def _abort_in_thread(self) -> None:
        with self._turn:
            if self._reply is None:
                self._end_handler()

    def _end_handler(self) -> None:
        """Drop the handler of a request that goes no further, and release the repositories it opened."""
        if self._handler is not None and self._reply is None:
            with self._opened.collecting():
                self._release_handler()
        self._handler = None
        self._opened.release()

    def _release_handler(self) -> None:
        # A request is dropped half-received, as brz serve drops it: ending
        # it would run it on the part of its body that arrived (a put would
        # write half a file, set_tags_bytes half the tags). Only the
        # insert_stream family holds something, a thread of its own fed the
        # body through a queue: a non-bytes item makes that stream fail, so
        # the write group is aborted rather than committed from a truncated
        # body, and ending the request then waits for the thread.
        inserter = _inserter_of(self._handler)
        if inserter is None:
            return
        inserter.queue.put(_ABORTED)
        inserter.queue.put(StopIteration)
        try:
            self._handler.end_received()
        except Exception:
            log.failure("Cleaning up an aborted {verb!r}", verb=self._args[0])


def _inserter_of(handler):
    """The running command of ``handler`` if it takes its body as it comes (the insert_stream family), else None.

    Such a command has a ``queue`` its ``insert_thread`` reads the body from.
    """
    command = getattr(handler, "_command", None)
    if getattr(command, "queue", None) is None or getattr(command, "insert_thread", None) is None:
        return None
    return command


def _holds_too_much(items) -> bool:
    """Whether a body queue's ``items`` are past ``STREAM_AHEAD_PARTS`` or ``STREAM_AHEAD_BYTES``."""
    if len(items) >= STREAM_AHEAD_PARTS:
        return True
    size = 0
    for item in items:
        if type(item) is bytes:
            size += len(item)
    return size > STREAM_AHEAD_BYTES


class _Aborted:
    """Stands in the body of a request whose connection was lost."""

    def __repr__(self) -> str:
        return "<connection lost>"


_ABORTED = _Aborted()


# Each argument of an error is cut to this many bytes: Breezy's message for an
# unexpected exception quotes what failed, which for a pushed record can be
# the whole record.
MAX_ERROR_ARGUMENT_BYTES = 64 * 1024


def _bounded_error(args) -> tuple:
    """An error tuple with each over-long bytes argument cut to ``MAX_ERROR_ARGUMENT_BYTES``, saying so, and
    each None sent as ``b""``.

    Breezy puts a None in an error for what is not there, which bencode
    cannot carry: a ``TokenMismatch`` for a lock token given to a branch
    that is not locked holds None as the branch's token, and ``brz serve``
    sends no reply at all for it. ``b""`` is how the protocol says "no
    token"; Breezy's client reads the error by its name alone.

    The lock token a ``TokenMismatch`` names as held is sent as ``b""``
    too: it is the secret that lets its holder write, and the caller that
    gave the wrong token may be someone with no right to write there.
    """
    if len(args) == 3 and args[0] == b"TokenMismatch":
        args = (args[0], args[1], None)
    return tuple(map(_error_argument, args))


def _error_argument(arg):
    if arg is None:
        return b""
    limit = MAX_ERROR_ARGUMENT_BYTES
    if type(arg) is bytes and len(arg) > limit:
        return arg[:limit] + b"... (%d bytes cut)" % (len(arg) - limit)
    return arg


def _reply_from(response, backend: BzrBackend, opened: Optional[OpenedRepositories] = None) -> Reply:
    """The reply for Breezy's ``response``; a streamed body releases ``opened`` once it is closed."""
    success = response.is_successful()
    args = tuple(response.args) if success else _bounded_error(response.args)
    body, stream = response.body, None
    if response.body_stream is not None:
        stream = _BzrBodyStream(iter(response.body_stream), backend, opened)
    elif body is not None and len(body) > LARGE_BODY_BYTES:
        body, stream = None, _SlicedBody(body, backend._reactor)
    return Reply(args, success, body, stream)


@implementer(IBodyStream)
class _SlicedBody:
    """A body already in memory, handed out in slices as the connection drains.

    On the wire it is a run of body parts, which clients join exactly as
    they join one part. Each slice arrives on a later reactor turn, like a
    slice pulled from the worker pool, so a transport that resumes its
    producer from inside a write never sees a write nested in its own.
    """

    def __init__(self, body: bytes, reactor):
        self._body = memoryview(body)
        self._offset = 0
        self._reactor = reactor
        self.description = "body"

    def pull(self, max_bytes: int):
        start = self._offset
        self._offset = min(start + max_bytes, len(self._body))
        piece = [self._body[start : self._offset].tobytes()] if self._offset > start else []
        return task.deferLater(self._reactor, 0, lambda: piece)

    def close(self) -> None:
        self._body = memoryview(b"")
        self._offset = 0


@implementer(IBodyStream)
class _BzrBodyStream:
    """A response ``body_stream`` made in the worker pool, a little ahead of the connection.

    One pool job makes 16 KiB slice after slice and hands each to the
    reactor as soon as it is made (``brz serve`` writes each chunk as soon
    as it is made): no worker waits for a reactor turn between slices, and
    the reactor wakes once per slice rather than once per chunk. The job
    stops once ``AHEAD_BYTES`` wait unsent (the connection is slower than
    the repository) and starts again when the connection takes a slice, so
    a stalled client holds no worker, and memory for at most
    ``AHEAD_BYTES`` plus one of Breezy's chunks (a group of texts, a few
    MiB at most). The repositories the request opened, which the stream
    reads, are released once it is closed.
    """

    SLICE_BYTES = 16 * 1024
    AHEAD_BYTES = 4 * SLICE_BYTES

    def __init__(self, chunks: Iterator[bytes], backend: BzrBackend, opened: Optional[OpenedRepositories] = None):
        self._chunks = chunks
        self._opened = OpenedRepositories() if opened is None else opened
        self._backend = backend
        self._reactor = backend._reactor
        self._made: deque = deque()
        self._waiting: Optional[defer.Deferred] = None
        self._unsent_bytes = 0  # made and not yet pulled, counted across threads
        self._unsent_lock = threading.Lock()
        self._making = False
        self._finished = False
        self._closed = False
        self.description = "body stream"

    def pull(self, max_bytes: int):
        if self._made:
            items = self._taken(self._made.popleft())
            self._keep_making(max_bytes)
            return defer.succeed(items)
        self._waiting = defer.Deferred()
        self._keep_making(max_bytes)
        return self._waiting

    def close(self) -> None:
        self._closed = True
        self._made.clear()
        if not self._making:
            self._close_now()

    def _taken(self, items: list) -> list:
        with self._unsent_lock:
            self._unsent_bytes -= _size(items)
        return items

    def _keep_making(self, max_bytes: int) -> None:
        if self._making or self._finished or self._closed or self._unsent_bytes >= self.AHEAD_BYTES:
            return
        self._making = True
        d = self._backend.run_in_pool(self._make_in_thread, min(max_bytes, self.SLICE_BYTES))
        d.addCallbacks(self._job_done, self._job_failed, (max_bytes,))

    def _job_done(self, _, max_bytes: int) -> None:
        self._making = False
        if self._closed:
            self._close_now()
        else:
            self._keep_making(max_bytes)

    def _job_failed(self, failure) -> None:
        self._making = False
        log.failure("Making a response stream", failure)
        self._finished = True
        self._slice_made([StreamFailure((b"error", b"InternalError", b"the server failed"))])

    def _slice_made(self, items: list) -> None:
        if self._closed:
            return
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.callback(self._taken(items))
        else:
            self._made.append(items)

    def _close_now(self) -> None:
        if self._chunks is None:
            return
        chunks, self._chunks = self._chunks, None
        self._backend.run_in_pool(self._end_in_thread, chunks).addErrback(
            lambda failure: log.failure("Closing a response stream", failure)
        )

    # In a worker thread.

    def _end_in_thread(self, chunks) -> None:
        try:
            close = getattr(chunks, "close", None)
            if close is not None:
                with self._opened.collecting():
                    close()
        finally:
            self._opened.release()

    def _make_in_thread(self, slice_bytes: int) -> None:
        while not self._closed and self._unsent_bytes < self.AHEAD_BYTES:
            with self._opened.collecting():
                items = self._slice_in_thread(slice_bytes)
            with self._unsent_lock:
                self._unsent_bytes += _size(items)
            last = not items or isinstance(items[-1], StreamFailure)
            if last:
                self._finished = True
            self._reactor.callFromThread(self._slice_made, items)
            if last:
                return

    def _slice_in_thread(self, slice_bytes: int) -> list:
        from ._repairs import translate_error

        request = _registry()
        pulled: list = []
        size = 0
        while size < slice_bytes:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                break
            except Exception as exc:
                pulled.append(StreamFailure(_bounded_error(translate_error(exc))))
                break
            if isinstance(chunk, request.FailedSmartServerResponse):
                pulled.append(StreamFailure(_bounded_error(chunk.args)))
                break
            pulled.append(chunk)
            size += len(chunk)
        return pulled


def _size(items: list) -> int:
    return sum(len(item) for item in items if isinstance(item, bytes))

"""A request whose connection is lost starts nothing more in the worker pool, however far it had got."""

from __future__ import annotations

import threading

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from smartserve.protocol import BodyChunk, Connection, Request, Role
from smartserve.server.backends.bzr import BzrBackend
from smartserve.server.caller import Caller
from smartserve.server.dispatcher import Dispatcher
from smartserve.server.jail import Writable
from smartserve.server.protocol import SmartServerFactory

PACK_HEADER = b"Bazaar pack format 1 (introduced in 0.18)\n"


class _QueuedReactor:
    """Calls from worker threads are kept, not run: the test has no reactor running."""

    def __init__(self):
        self.calls = []

    def callFromThread(self, function, *args, **kwargs):
        self.calls.append((function, args, kwargs))


def _inserter_threads() -> list:
    return [thread for thread in threading.enumerate() if "_inserter_thread" in thread.name]


def _release(threads) -> None:
    """End inserter threads left waiting for a body that will never come."""
    for thread in threads:
        target = getattr(thread, "_target", None)
        command = getattr(target, "__self__", None)
        if command is not None:
            command.queue.put(StopIteration)
        thread.join(10)


@pytest.fixture
def branch_root(tmp_path, brz):
    root = tmp_path / "root"
    root.mkdir()
    brz.run("init", "-q", root / "b")
    return root


def test_insert_stream_dropped_while_its_first_step_waits_for_a_worker_starts_nothing(branch_root, monkeypatch, brz):
    """A push whose connection is lost while every worker is busy never starts Breezy's inserter thread,
    which would wait for the rest of the body for good and keep the process from exiting."""
    monkeypatch.setenv("BRZ_HOME", str(brz.home))
    monkeypatch.setenv("BRZ_LOG", str(brz.home / "brz.log"))
    before = set(_inserter_threads())
    pool = ThreadPool(minthreads=1, maxthreads=1, name="abort-test")  # not started: the step waits in the queue
    backend = BzrBackend(str(branch_root), pool, _QueuedReactor())
    factory = SmartServerFactory(Dispatcher(backend), clock=Clock(), tcp_writable=Writable.everywhere())
    protocol = factory.build_protocol(Caller(None, "test", Writable.everywhere()))
    protocol.makeConnection(StringTransport())
    client = Connection(Role.CLIENT)
    protocol.dataReceived(
        client.send(Request((b"Repository.insert_stream", b"b/", b""))) + client.send(BodyChunk(PACK_HEADER))
    )
    protocol.connectionLost(Failure(ConnectionDone()))
    pool.start()
    pool.stop()
    left = [thread for thread in _inserter_threads() if thread not in before]
    try:
        assert left == [], "an inserter thread was started for a request whose connection was gone"
    finally:
        _release(left)


class _SteppedReactor(_QueuedReactor):
    """Notes when a worker hands a result back, so a test can wait for a step to end."""

    def __init__(self):
        super().__init__()
        self.handed_back = threading.Event()

    def callFromThread(self, function, *args, **kwargs):
        super().callFromThread(function, *args, **kwargs)
        self.handed_back.set()


def test_put_dropped_in_the_middle_of_its_body_leaves_the_file_as_it_was(tmp_path, monkeypatch, brz):
    """A put whose connection is lost after part of its body was taken is dropped, as brz serve drops it:
    the file keeps its old bytes instead of getting the part that arrived."""
    monkeypatch.setenv("BRZ_HOME", str(brz.home))
    monkeypatch.setenv("BRZ_LOG", str(brz.home / "brz.log"))
    root = tmp_path / "root"
    root.mkdir()
    (root / "file").write_bytes(b"original")
    pool = ThreadPool(minthreads=1, maxthreads=1, name="abort-test")
    reactor = _SteppedReactor()
    backend = BzrBackend(str(root), pool, reactor)
    factory = SmartServerFactory(Dispatcher(backend), clock=Clock(), tcp_writable=Writable.everywhere())
    protocol = factory.build_protocol(Caller(None, "test", Writable.everywhere()))
    protocol.makeConnection(StringTransport())
    client = Connection(Role.CLIENT)
    pool.start()
    try:
        protocol.dataReceived(client.send(Request((b"put", b"/file", b""))) + client.send(BodyChunk(b"half of it")))
        assert reactor.handed_back.wait(10), "the request's first step never ran"
        protocol.connectionLost(Failure(ConnectionDone()))
    finally:
        pool.stop()  # runs what the abort queued, then waits for the worker
    assert (root / "file").read_bytes() == b"original"

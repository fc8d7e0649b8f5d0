"""A request that fails on the server with an exception Breezy has no error reply for is logged.

Breezy answers such a request with ``("error", class, message)`` and keeps
the traceback in its own log file; the operator reads the twistd log, where
the verb, the caller and the error now appear. A request the server fails
even to start gets an InternalError reply, and its traceback is logged.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.python.threadpool import ThreadPool

from smartserve.server.backends.bzr import BzrBackend
from smartserve.server.caller import Caller
from smartserve.server.jail import Writable
from smartserve.testing import MemoryBackend, encode_request, response_args, serve_in_memory
from support import logged_events

ALICE = Caller("alice", "192.0.2.7:50312", Writable.nowhere())


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("BRZ_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("BRZ_LOG", str(tmp_path / "brz.log"))
    served = tmp_path / "root"
    served.mkdir()
    (served / "small").write_bytes(b"s" * 100)
    return served


@pytest.fixture
def failing_get(monkeypatch):
    """Breezy's ``get`` handler raises what a failing disk would."""
    from breezy.bzr.smart import vfs

    def read_fails(self, relpath):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(vfs.GetRequest, "do", read_fails)


@pytest.fixture
def warnings_logged():
    def backend_warning(event):
        namespace = event.get("log_namespace", "")
        return namespace.startswith("smartserve.server.backends") and event["log_level"] >= LogLevel.warn

    with logged_events(backend_warning) as events:
        yield events


async def _run_in_pool(root, args, *, inline_read_bytes: int):
    """Run request ``args`` as Alice through a started worker pool; returns its reply."""
    pool = ThreadPool(1, 1)
    pool.start()
    try:
        backend = BzrBackend(str(root), pool, reactor, inline_read_bytes=inline_read_bytes)
        return await backend.start(ALICE, args).advance([], True)
    finally:
        pool.stop()


def _check(reply, warnings_logged):
    assert not reply.success
    assert reply.args[0] == b"error" and b"Input/output error" in reply.args[2]
    [event] = warnings_logged
    assert (event["verb"], event["user"], event["peer"]) == ("get", "alice", "192.0.2.7:50312")
    assert "Input/output error" in event["error"]


def test_failure_of_an_inline_read_is_logged_once(root, failing_get, warnings_logged):
    backend = BzrBackend(str(root), ThreadPool(), Clock(), inline_read_bytes=1000)
    run = backend.start(ALICE, (b"get", b"/small"))
    first = run.advance([], True).result
    assert run.advance([], True).result == first  # a later step hands back the same reply, not logged again
    _check(first, warnings_logged)


@pytest_twisted.ensureDeferred
async def test_failure_in_the_worker_pool_is_logged(root, failing_get, warnings_logged):
    reply = await _run_in_pool(root, (b"get", b"/small"), inline_read_bytes=0)
    _check(reply, warnings_logged)


@pytest_twisted.ensureDeferred
async def test_ordinary_error_replies_are_not_logged(root, warnings_logged):
    """A missing file is the client's business: it gets NoSuchFile and the twistd log gets nothing."""
    reply = await _run_in_pool(root, (b"get", b"/missing"), inline_read_bytes=1000)
    assert reply.args[0] == b"NoSuchFile"
    assert warnings_logged == []


class _BrokenStartBackend(MemoryBackend):
    """A ``MemoryBackend`` whose ``start`` fails for the verb ``put``, as a server bug would."""

    def start(self, caller, args):
        if args[0] == b"put":
            raise RuntimeError("bug in start")
        return super().start(caller, args)


def test_request_that_cannot_be_started_gets_an_error_reply_and_is_logged():
    """An exception while starting a request becomes an InternalError reply and a logged traceback; the connection serves on."""
    factory, protocol, transport = serve_in_memory(_BrokenStartBackend({b"f": b"data"}))
    with logged_events(lambda event: "log_failure" in event) as failures:
        protocol.dataReceived(encode_request([b"put", b"f", b""], b"new"))
    protocol.dataReceived(encode_request([b"get", b"f"]))
    assert response_args(transport.value()) == [
        (b"error", b"InternalError", b"the server failed to run this request"),
        (b"ok",),
    ]
    assert [str(event["log_failure"].value) for event in failures] == ["bug in start"]
    assert not transport.disconnecting
    assert protocol.requests_served == 2

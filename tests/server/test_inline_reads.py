"""Small reads run at once on the reactor thread; everything else waits for the worker pool."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool

from smartserve.server.backends.bzr import BzrBackend
from smartserve.server.caller import Caller
from smartserve.server.jail import Writable


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("BRZ_HOME", str(tmp_path / "home"))
    served = tmp_path / "root"
    served.mkdir()
    (served / "small").write_bytes(b"s" * 100)
    (served / "large").write_bytes(b"l" * 5000)
    return served


def advance(backend: BzrBackend, *args: bytes):
    """Start request ``args`` and return the Deferred of its first step."""
    run = backend.start(Caller(None, "test", Writable.nowhere()), args)
    return run.advance([], True)


@pytest.mark.parametrize("args", [(b"get", b"/small"), (b"has", b"/large"), (b"stat", b"/large"), (b"hello",)])
def test_bzr_backend_small_read_answers_without_the_pool(root, args):
    """With the worker pool not even started, a read of one small file or of metadata is answered at once."""
    backend = BzrBackend(str(root), ThreadPool(), Clock(), inline_read_bytes=1000)
    d = advance(backend, *args)
    assert d.called
    reply = d.result
    assert reply.success, reply.args
    if args[0] == b"get":
        assert reply.body == b"s" * 100


@pytest.mark.parametrize(
    "args, inline_read_bytes",
    [
        ((b"get", b"/large"), 1000),
        ((b"get", b"/missing"), 1000),
        ((b"get", b"/small"), 0),
        ((b"hello",), 0),
        ((b"BzrDir.open_2.1", b"/"), 1000),
    ],
)
def test_bzr_backend_other_requests_wait_for_the_pool(root, args, inline_read_bytes):
    """A larger file, a missing one, any smart verb, or everything when inline reads are off, runs only in the pool."""
    pool = ThreadPool(1, 1)
    backend = BzrBackend(str(root), pool, Clock(), inline_read_bytes=inline_read_bytes)
    d = advance(backend, *args)
    assert not d.called

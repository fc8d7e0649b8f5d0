"""Every repository a request opens is freed once the request is done, however the request ends.

Breezy's pack repositories sit in a reference cycle the garbage collector
cannot see through (see ``smartserve.server.backends._repositories``); a
repository that outlived its request would stay in memory for good.
"""

from __future__ import annotations

import gc

import pytest
from breezy import controldir
from breezy.branch import Branch
from breezy.repository import Repository
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from smartserve.protocol import NEED_DATA, BodyChunk, Connection, EndOfMessage, Request, Response, Role
from smartserve.server.backends.bzr import BzrBackend, _BzrBodyStream, configure_breezy
from smartserve.server.caller import Caller
from smartserve.server.dispatcher import Dispatcher
from smartserve.server.jail import Writable
from smartserve.server.protocol import SmartServerFactory
from support import QueuedReactor, StepPool

FORMAT_2A = b"Bazaar repository format 2a (needs bzr 1.16 or later)\n"
_NO_SEARCH = b"\n\n0"  # get_parent_map's body when the client has no parents cached


class _Server:
    """One connection to a ``BzrBackend`` over ``root``, its pool and reactor run by hand."""

    def __init__(self, root):
        self.pool = StepPool()
        self.reactor = QueuedReactor()
        backend = BzrBackend(str(root), self.pool, self.reactor)
        factory = SmartServerFactory(Dispatcher(backend), clock=Clock(), tcp_writable=Writable.everywhere())
        self.protocol = factory.build_protocol(Caller(None, "test", Writable.everywhere()))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def send(self, args, body=None, *, end=True) -> Connection:
        """Send a request (without its end, unless ``end``); returns the client side of it."""
        client = Connection(Role.CLIENT)
        data = client.send(Request(args))
        if body is not None:
            data += client.send(BodyChunk(body))
        if end:
            data += client.send(EndOfMessage())
        self.protocol.dataReceived(data)
        return client

    def run_until_idle(self):
        while self.pool.jobs or self.reactor.calls:
            while self.pool.jobs:
                self.pool.run_next()
            self.reactor.run_calls()

    def call(self, *args, body=None):
        """(success, args, body) of one request run to the end of its response."""
        client = self.send(args, body)
        self.run_until_idle()
        client.receive_data(self.transport.value())
        self.transport.clear()
        response, parts = None, []
        while True:
            event = client.next_event()
            assert event is not NEED_DATA, "the response did not end"
            if isinstance(event, Response):
                response = event
            elif isinstance(event, BodyChunk):
                parts.append(event.data)
            elif isinstance(event, EndOfMessage):
                return response.success, response.args, b"".join(parts)

    def lose_connection(self):
        self.protocol.connectionLost(Failure(ConnectionDone()))


def _live_repositories() -> int:
    gc.collect()
    return sum(1 for thing in gc.get_objects() if isinstance(thing, Repository))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A branch ``b`` of five revisions, and ``s`` stacked on it with one more."""
    configure_breezy()
    root = tmp_path_factory.mktemp("root")
    tree = controldir.ControlDir.create_standalone_workingtree(str(root / "b"))
    for number in range(5):
        (root / "b" / "file").write_text(f"revision {number}\n" * 100)
        if number == 0:
            tree.add(["file"])
        tree.commit(f"revision {number}", committer="Test <test@example.com>")
    stacked = tree.controldir.sprout(str(root / "s"), stacked=True).open_workingtree()
    stacked.branch.set_stacked_on_url("../b")
    (root / "s" / "file").write_text("stacked\n")
    stacked.commit("stacked", committer="Test <test@example.com>")
    del tree, stacked
    return root


@pytest.fixture
def server(root):
    server = _Server(root)
    yield server
    server.lose_connection()
    server.run_until_idle()


@pytest.fixture
def tip(root):
    branch = Branch.open(str(root / "b"))
    return branch.last_revision()


def _requests(tip):
    return {
        "is_shared": ((b"Repository.is_shared", b"b/"), None),
        "get_parent_map": ((b"Repository.get_parent_map", b"b/", b"include-missing:", tip), _NO_SEARCH),
        "get_stream": ((b"Repository.get_stream_1.19", b"b/", FORMAT_2A), b"ancestry-of\n" + tip),
        "stacked branch": ((b"Branch.last_revision_info", b"s/"), None),
        "stacked get_stream": ((b"Repository.get_stream_1.19", b"s/", FORMAT_2A), b"everything"),
    }


@pytest.mark.parametrize("name", ["is_shared", "get_parent_map", "get_stream", "stacked branch", "stacked get_stream"])
def test_requests_answered_leave_no_repository_behind(server, tip, name):
    """However many requests that open repositories are answered, none of their repositories stays in memory."""
    args, body = _requests(tip)[name]
    server.call(*args, body=body)  # Breezy's first use of a format loads what stays loaded
    before = _live_repositories()
    for _ in range(5):
        success, reply, _ = server.call(*args, body=body)
        assert success, reply
    assert _live_repositories() == before


def test_lock_and_write_group_across_requests_leave_no_repository_behind(server):
    """A client that locks a repository and starts a write group in one request and ends them in later
    ones (the lock and the group live on disk, as tokens) leaves none of its repositories in memory."""
    server.call(b"Repository.is_shared", b"b/")
    before = _live_repositories()
    success, reply, _ = server.call(b"Branch.lock_write", b"b/", b"", b"")
    assert success, reply
    branch_lock, repository_lock = reply[1:]
    success, reply, _ = server.call(b"Repository.start_write_group", b"b/", repository_lock)
    assert success, reply
    success, reply, _ = server.call(b"Repository.abort_write_group", b"b/", repository_lock, reply[1])
    assert success, reply
    success, reply, _ = server.call(b"Branch.unlock", b"b/", branch_lock, repository_lock)
    assert success, reply
    assert _live_repositories() == before


def test_stream_abandoned_midway_by_a_lost_connection_leaves_no_repository_behind(server, tip, monkeypatch):
    """A get_stream whose connection is lost while its stream is half made frees its repository once
    the stream is closed."""
    monkeypatch.setattr(_BzrBodyStream, "SLICE_BYTES", 1)  # one chunk a slice,
    monkeypatch.setattr(_BzrBodyStream, "AHEAD_BYTES", 1)  # one slice a job
    server.call(b"Repository.is_shared", b"b/")
    before = _live_repositories()
    server.send((b"Repository.get_stream_1.19", b"b/", FORMAT_2A), b"ancestry-of\n" + tip)
    server.pool.run_next()  # the request's step: its reply, and the first job of its stream
    server.reactor.run_calls()
    server.pool.run_next()  # the stream's first slice: Breezy's stream is begun, not ended
    server.reactor.run_calls()
    assert server.transport.value(), "the response did not begin"
    server.lose_connection()
    server.run_until_idle()
    assert _live_repositories() == before


def test_stream_made_after_the_connection_was_lost_leaves_no_repository_behind(server, tip):
    """A get_stream whose connection is lost while its step runs gets a stream no one will read, which
    is closed and its repository freed."""
    server.call(b"Repository.is_shared", b"b/")
    before = _live_repositories()
    server.send((b"Repository.get_stream_1.19", b"b/", FORMAT_2A), b"ancestry-of\n" + tip)
    server.pool.run_next()  # the step makes its reply, which waits for the reactor
    server.lose_connection()
    server.run_until_idle()
    assert _live_repositories() == before


def test_request_dropped_in_the_middle_of_its_body_leaves_no_repository_behind(server, tip):
    """A get_parent_map whose connection is lost after it opened its repository, while its body still
    arrived, frees the repository."""
    server.call(b"Repository.is_shared", b"b/")
    before = _live_repositories()
    server.send((b"Repository.get_parent_map", b"b/", b"include-missing:", tip), _NO_SEARCH[:1], end=False)
    server.run_until_idle()
    server.lose_connection()
    server.run_until_idle()
    assert _live_repositories() == before

"""Breezy response streams: made in the pool a few slices ahead of the connection, never more."""

from __future__ import annotations

import pytest

from smartserve.server.backends.bzr import BzrBackend, _BzrBodyStream
from smartserve.server.reply import StreamFailure
from support import QueuedReactor, StepPool

CHUNK = b"c" * _BzrBodyStream.SLICE_BYTES  # one chunk fills one slice
AHEAD_SLICES = _BzrBodyStream.AHEAD_BYTES // _BzrBodyStream.SLICE_BYTES


class _Chunks:
    """A body_stream that counts the chunks taken from it and notices being closed."""

    def __init__(self, count, fail_at=None, chunk=CHUNK):
        self.count = count
        self.chunk = chunk
        self.fail_at = fail_at
        self.taken = 0
        self.closed = False

    def __iter__(self):
        return self

    def __next__(self):
        if self.taken == self.fail_at:
            self.taken += 1
            raise OSError("disk went away")
        if self.taken >= self.count:
            raise StopIteration
        self.taken += 1
        return self.chunk

    def close(self):
        self.closed = True


@pytest.fixture
def pool():
    return StepPool()


@pytest.fixture
def reactor():
    return QueuedReactor()


@pytest.fixture
def make_stream(tmp_path, pool, reactor):
    backend = BzrBackend(str(tmp_path), pool, reactor)
    return lambda chunks: _BzrBodyStream(chunks, backend)


def pulled(d):
    assert d.called, "the pull has not been answered"
    return d.result


def test_stream_runs_ahead_of_a_stalled_connection_by_at_most_AHEAD_BYTES(make_stream, pool, reactor):
    """One job makes slices until AHEAD_BYTES wait unsent, then ends: no worker is held while the client stalls."""
    chunks = _Chunks(100)
    stream = make_stream(chunks)
    first = stream.pull(64 * 1024)
    pool.run_next()
    assert chunks.taken == AHEAD_SLICES
    reactor.run_calls()
    assert pulled(first) == [CHUNK]
    # Taking one slice let exactly one more be made, by a new job.
    pool.run_next()
    reactor.run_calls()
    assert chunks.taken == AHEAD_SLICES + 1
    assert pool.jobs == []


def test_one_chunk_larger_than_the_lookahead_is_made_alone(make_stream, pool, reactor):
    """Breezy's chunks can be MiBs (a group of texts): then only one waits unsent at a time."""
    big = b"b" * (_BzrBodyStream.AHEAD_BYTES * 8)
    chunks = _Chunks(10, chunk=big)
    stream = make_stream(chunks)
    first = stream.pull(64 * 1024)
    pool.run_next()
    assert chunks.taken == 1
    reactor.run_calls()
    assert pulled(first) == [big]
    pool.run_next()
    reactor.run_calls()
    assert chunks.taken == 2
    assert pool.jobs == []


def test_stream_hands_over_every_chunk_in_order_then_the_end(make_stream, pool, reactor):
    chunks = _Chunks(7)
    stream = make_stream(chunks)
    slices = []
    while True:
        d = stream.pull(64 * 1024)
        while not d.called:
            pool.run_next()
            reactor.run_calls()
        slices.append(d.result)
        if not d.result:
            break
    assert slices == [[CHUNK]] * 7 + [[]]
    assert pool.jobs == []


def test_stream_failure_becomes_the_last_slice(make_stream, pool, reactor):
    """An error raised while making the stream reaches the client as Breezy's error, and nothing is made after it."""
    chunks = _Chunks(10, fail_at=2)
    stream = make_stream(chunks)
    got = []
    for _ in range(3):
        d = stream.pull(64 * 1024)
        while not d.called:
            pool.run_next()
            reactor.run_calls()
        got.append(d.result)
    assert got[:2] == [[CHUNK], [CHUNK]]
    [failure] = got[2]
    assert isinstance(failure, StreamFailure)
    assert failure.args[0] == b"error"
    assert chunks.taken == 3
    reactor.run_calls()
    assert pool.jobs == []


def test_closing_while_a_slice_is_being_made_stops_the_job_and_closes_the_stream(make_stream, pool, reactor):
    chunks = _Chunks(100)
    stream = make_stream(chunks)
    stream.pull(64 * 1024)
    stream.close()  # the connection went away while the job waits for a worker
    pool.run_next()
    assert chunks.taken == 0
    reactor.run_calls()
    # The stream is closed in the pool, after the job has ended.
    pool.run_next()
    assert chunks.closed
    assert pool.jobs == []

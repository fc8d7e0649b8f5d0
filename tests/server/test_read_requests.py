"""smartserve's ``get`` and ``readv`` answer every request as Breezy's own do, a large read as a stream."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from breezy.bzr.smart import request
from breezy.transport import get_transport

from smartserve.server.backends import _large_reads
from smartserve.server.backends._commands import COMMANDS
from smartserve.server.backends._large_reads import LARGE_READ_BYTES

LARGE = LARGE_READ_BYTES + 12345
LARGER = 4 * LARGE_READ_BYTES


@pytest.fixture
def transport(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "small").write_bytes(b"small file")
    (root / "empty").write_bytes(b"")
    (root / "large").write_bytes(bytes(range(256)) * (LARGE // 256) + b"tail")
    (root / "dir").mkdir()
    (root / "larger").write_bytes(bytes(range(251)) * (LARGER // 251))
    return get_transport(str(root))


def answer(transport, commands, args, body=None):
    """(success, args, body) of one request, a streamed body joined."""
    handler = request.SmartServerRequestHandler(transport, commands=commands, root_client_path="/")
    handler.args_received(args)
    if body is not None:
        handler.accept_body(body)
        handler.end_of_body()
    response = handler.response
    streamed = response.body_stream is not None
    body = b"".join(response.body_stream) if streamed else response.body
    return (response.is_successful(), response.args, body), streamed


def offsets(*ranges):
    return b"".join(b"%d,%d\n" % pair for pair in ranges)


SIZE = LARGE + 4 - (LARGE % 256)


@pytest.mark.parametrize(
    "args, body, streams",
    [
        ((b"get", b"/small"), None, False),
        ((b"get", b"/empty"), None, False),
        ((b"get", b"/large"), None, True),
        ((b"get", b"/missing"), None, False),
        ((b"get", b"/dir"), None, False),
        ((b"get", b"/../escape"), None, False),
        ((b"readv", b"/large"), offsets((0, 10), (100, 5)), False),
        ((b"readv", b"/large"), offsets((0, SIZE)), True),
        ((b"readv", b"/large"), offsets((5, SIZE - 10), (0, 3), (SIZE - 4, 4)), True),
        ((b"readv", b"/large"), offsets(*[(start, 91) for start in range(0, SIZE - 100, 92)]), True),
        ((b"readv", b"/large"), offsets((SIZE - 9, 9), (0, SIZE - 10), (SIZE - 10, 0)), True),
        ((b"readv", b"/large"), offsets((0, SIZE // 2 + 1), (SIZE // 2, SIZE // 2)), False),
        ((b"readv", b"/large"), offsets((7, 0), (0, SIZE)), False),
        ((b"readv", b"/large"), offsets((0, SIZE + 1)), False),
        ((b"readv", b"/large"), offsets((10, SIZE)), False),
        ((b"readv", b"/large"), offsets((-1, SIZE)), False),
        ((b"readv", b"/small"), offsets((0, SIZE)), False),
        ((b"readv", b"/missing"), offsets((0, SIZE)), False),
        ((b"readv", b"/dir"), offsets((0, SIZE)), False),
    ],
)
def test_same_answer_as_breezy(transport, args, body, streams):
    breezy_answer, _ = answer(transport, request.request_handlers, args, body)
    ours, streamed = answer(transport, COMMANDS, args, body)
    assert ours == breezy_answer
    assert streamed == streams


def test_large_read_comes_in_bounded_pieces(transport, monkeypatch):
    monkeypatch.setattr(_large_reads, "FILE_READ_BYTES", 64 * 1024)
    handler = request.SmartServerRequestHandler(transport, commands=COMMANDS, root_client_path="/")
    handler.args_received((b"get", b"/large"))
    pieces = list(handler.response.body_stream)
    assert max(map(len, pieces)) == 64 * 1024
    assert b"".join(pieces) == transport.get_bytes("large")


def test_file_that_shrinks_while_read_ends_the_stream_with_short_readv(transport, tmp_path):
    handler = request.SmartServerRequestHandler(transport, commands=COMMANDS, root_client_path="/")
    handler.args_received((b"get", b"/large"))
    stream = handler.response.body_stream
    first = next(stream)
    with open(tmp_path / "root" / "large", "r+b") as file:
        file.truncate(len(first) + 10)
    with pytest.raises(Exception) as raised:
        next(stream)
    assert type(raised.value).__name__ == "ShortReadvError"


def test_stream_closed_unread_closes_its_file(transport):
    handler = request.SmartServerRequestHandler(transport, commands=COMMANDS, root_client_path="/")
    handler.args_received((b"get", b"/large"))
    stream = handler.response.body_stream
    file = stream._file
    stream.close()
    assert file.closed


def test_many_short_ranges_share_pieces(transport):
    """A readv of thousands of short ranges comes as a few pieces of FILE_READ_BYTES, not one per range."""
    ranges = [(start, 91) for start in range(0, SIZE - 100, 92)]
    handler = request.SmartServerRequestHandler(transport, commands=COMMANDS, root_client_path="/")
    handler.args_received((b"readv", b"/large"))
    handler.accept_body(offsets(*ranges))
    handler.end_of_body()
    pieces = list(handler.response.body_stream)
    assert [len(piece) for piece in pieces[:-1]] == [_large_reads.FILE_READ_BYTES] * (len(pieces) - 1)
    assert sum(map(len, pieces)) == 91 * len(ranges)


@st.composite
def disjoint_ranges(draw):
    """Ranges of the larger file that do not overlap, in any order, sometimes with one range inside another."""
    cuts = sorted(set(draw(st.lists(st.integers(0, LARGER_SIZE), min_size=2, max_size=12))))
    kept = [(start, end - start) for start, end in zip(cuts, cuts[1:]) if draw(st.integers(0, 3))]
    if kept and draw(st.booleans()):  # and one range inside another
        start, length = draw(st.sampled_from(kept))
        kept.append((start + length // 2, draw(st.integers(0, length - length // 2))))
    return draw(st.permutations(kept))


LARGER_SIZE = LARGER // 251 * 251
ANY_RANGES = st.lists(
    st.tuples(st.integers(-2, LARGER_SIZE + 2), st.integers(-1, LARGER_SIZE // 2)), min_size=1, max_size=6
)


@given(ranges=disjoint_ranges() | ANY_RANGES)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_readv_gets_the_same_answer_as_breezy(transport, ranges):
    """Whatever the ranges (overlapping, out of bounds, negative, empty, in any order), the answer is Breezy's."""
    theirs, _ = answer(transport, request.request_handlers, (b"readv", b"/larger"), offsets(*ranges))
    ours, _ = answer(transport, COMMANDS, (b"readv", b"/larger"), offsets(*ranges))
    assert ours == theirs

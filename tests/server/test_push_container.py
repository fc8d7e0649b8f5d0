"""RecordRegrouper hands Breezy's container parser whole records, and refuses records and lines over its limits."""

from __future__ import annotations

import pytest
from breezy.bzr import pack
from hypothesis import given, settings
from hypothesis import strategies as st

from smartserve.server.backends._container import MAX_HEADER_BYTES, PushStreamRefused, RecordRegrouper

LIMIT = 4096

_names = st.lists(
    st.tuples(st.binary(min_size=1, max_size=8).filter(lambda name: not (set(name) & set(b"\x00\t\n\x0b\x0c\r ")))),
    max_size=3,
)
_records = st.lists(st.tuples(st.binary(max_size=LIMIT), _names), max_size=8)


def _container(records, end: bool = True) -> bytes:
    serialiser = pack.ContainerSerialiser()
    data = serialiser.begin()
    for body, names in records:
        data += serialiser.bytes_record(body, names)
    return data + (serialiser.end() if end else b"")


def _parts(data: bytes, cuts) -> list:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    edges = [0, *points, len(data)]
    return [data[start:stop] for start, stop in zip(edges, edges[1:])]


def _parsed(pieces) -> tuple:
    """What Breezy's parser makes of ``pieces``: its records and whether it saw the end."""
    parser = pack.ContainerPushParser()
    for piece in pieces:
        parser.accept_bytes(piece)
    return parser.read_pending_records(), parser.finished


def _regrouped(parts, limit: int = LIMIT) -> list:
    regrouper = RecordRegrouper(limit)
    units = []
    for part in parts:
        units += regrouper.feed(part)
    rest = regrouper.rest()
    return units + ([rest] if rest else [])


@settings(max_examples=200, deadline=None)
@given(_records, st.lists(st.integers(min_value=0), max_size=12), st.booleans())
def test_regrouped_stream_parses_as_the_stream_itself(records, cuts, end):
    """However the stream is cut into parts, Breezy's parser gets the same records from the units."""
    data = _container(records, end)
    assert _parsed(_regrouped(_parts(data, cuts))) == _parsed([data])


@settings(max_examples=100, deadline=None)
@given(_records, st.lists(st.integers(min_value=0), max_size=12))
def test_each_unit_is_a_whole_record_or_the_format_line_or_the_end(records, cuts):
    """Every unit but a truncated last one is one piece of the container's framing, so the parser copies each once."""
    data = _container(records)
    units = _regrouped(_parts(data, cuts))
    serialiser = pack.ContainerSerialiser()
    expected = [serialiser.begin(), *[serialiser.bytes_record(body, names) for body, names in records], serialiser.end()]
    assert units == expected


def test_a_record_sent_as_one_part_passes_unchanged():
    """Breezy's own client sends a record per part: the part itself is handed on, not a copy."""
    serialiser = pack.ContainerSerialiser()
    regrouper = RecordRegrouper(LIMIT)
    assert regrouper.feed(serialiser.begin()) == [serialiser.begin()]
    record = serialiser.bytes_record(b"x" * 100, [(b"texts",)])
    [unit] = regrouper.feed(record)
    assert unit is record


def test_record_over_the_limit_is_refused_before_its_body_arrives():
    regrouper = RecordRegrouper(LIMIT)
    regrouper.feed(pack.ContainerSerialiser().begin())
    with pytest.raises(PushStreamRefused, match=f"limit of {LIMIT} bytes") as refused:
        regrouper.feed(b"B%d\n" % (LIMIT + 1))
    assert refused.value.too_large


@pytest.mark.parametrize("where", ["format line", "length line", "name line"])
def test_line_that_never_ends_is_refused_past_the_header_bound(where):
    """A line sent without its newline, part after part, is refused once it passes MAX_HEADER_BYTES."""
    regrouper = RecordRegrouper(LIMIT)
    if where != "format line":
        regrouper.feed(pack.ContainerSerialiser().begin())
        regrouper.feed(b"B12\n" if where == "name line" else b"B")
    piece = b"1" * 1024
    with pytest.raises(PushStreamRefused, match="over 65536 bytes"):
        for _ in range(MAX_HEADER_BYTES // len(piece) + 2):
            regrouper.feed(piece)


def test_length_python_reads_but_breezy_never_writes_is_refused():
    """A signed or spaced length, which Breezy's parser would take and misread the stream after, is refused."""
    for line in (b"-5", b" 5", b"+5", b"1_0"):
        regrouper = RecordRegrouper(LIMIT)
        regrouper.feed(pack.ContainerSerialiser().begin())
        with pytest.raises(PushStreamRefused) as refused:
            regrouper.feed(b"B" + line + b"\n\nhello")
        assert not refused.value.too_large


@pytest.mark.parametrize("bad", [b"Xjunk", b"Bnot a number\n\nbody"])
def test_framing_breezy_refuses_at_once_is_passed_on_for_it_to_refuse(bad):
    """A record type other than B or E, or a length that is no number, goes on unchanged: Breezy raises its own error."""
    regrouper = RecordRegrouper(LIMIT)
    begin = pack.ContainerSerialiser().begin()
    units = regrouper.feed(begin) + regrouper.feed(bad) + regrouper.feed(b"more")
    assert b"".join(units) == begin + bad + b"more"
    with pytest.raises((pack.UnknownRecordTypeError, pack.InvalidRecordError)):
        _parsed(units)


def test_what_follows_the_end_marker_is_dropped():
    data = _container([(b"body", [(b"name",)])])
    units = _regrouped([data + b"trailing", b"and more"])
    assert b"".join(units) == data

"""BodyCollector joins a body's parts as they came, holding many small parts as a few pieces."""

from __future__ import annotations

import tracemalloc

from hypothesis import given
from hypothesis import strategies as st

from smartserve.protocol import BodyCollector
from smartserve.protocol._collect import SMALL_PART_BYTES


_SIZES = st.one_of(st.integers(0, 40), st.integers(SMALL_PART_BYTES - 2, SMALL_PART_BYTES + 2))


@given(st.lists(st.tuples(_SIZES, st.integers(0, 255)), max_size=12))
def test_collected_body_is_its_parts_joined_in_order(shapes):
    parts = [bytes((value,)) * size for size, value in shapes]
    collector = BodyCollector()
    for part in parts:
        collector.add(part)
    assert collector.size == sum(map(len, parts))
    assert collector.take() == b"".join(parts)
    assert (collector.size, collector.take()) == (0, b""), "taking empties the collector"


def test_a_body_of_one_part_is_that_part_and_a_large_part_is_never_copied():
    one = b"x" * 10
    collector = BodyCollector()
    collector.add(one)
    assert collector.take() is one
    large = b"y" * SMALL_PART_BYTES
    collector.add(b"a")
    collector.add(b"b")
    collector.add(large)
    collector.add(b"c")
    assert collector.take() == b"ab" + large + b"c"


def test_a_million_tiny_parts_cost_about_their_bytes():
    """Held as a list, a million two-byte parts would take some 40 MiB of Python objects for 2 MB of body."""
    parts = [bytes((index % 256, 7)) for index in range(1_000_000)]  # made before measuring
    tracemalloc.start()
    try:
        collector = BodyCollector()
        for part in parts:
            collector.add(part)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2_000_000, f"{peak} bytes held for 2 MB of parts"
    assert collector.take() == b"".join(parts)

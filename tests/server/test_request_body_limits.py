"""A request body never piles up in the server: a body kept whole is refused past --max-request-body, and a
push's body reaches Breezy as whole records within that limit, as fast as the repository takes them."""

from __future__ import annotations

import hashlib
import os
import queue
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest

from smartserve.server.backends import bzr
from smartserve.testing import RawClient
from support import wait_for

pytestmark = pytest.mark.timeout(180)

MIB = 1024 * 1024
_OPTIONS = ("--bzr", "tcp:0:interface=127.0.0.1", "--bzr-allow-writes", "--ssh", "none")
# What the server may grow by while a body of many MiB goes through it.
_GROWTH_BOUND_KIB = 48 * 1024


class _Upload:
    """A request sent part by part on a new connection, with the server's memory read as it goes."""

    def __init__(self, server, args):
        self.server = server
        self.client = RawClient.connect("127.0.0.1", server.port, timeout=60)
        self.client.begin_request(args)
        self.baseline_kib = server.rss_kib()
        self.peak_kib = self.baseline_kib

    def send_parts(self, part: bytes, count: int) -> None:
        for index in range(count):
            self.client.send_body_part(part)
            if index % 8 == 0:
                self.peak_kib = max(self.peak_kib, self.server.rss_kib())

    def finish(self) -> RawClient:
        """End the request; the returned client reads the reply."""
        self.client.end_request()
        self.peak_kib = max(self.peak_kib, self.server.rss_kib())
        return self.client

    @property
    def growth_kib(self) -> int:
        return self.peak_kib - self.baseline_kib


def test_kept_body_over_the_limit_is_refused_unrun_and_dropped(start_smartserve):
    """A put whose parts add up past --max-request-body gets RequestTooLarge, writes nothing, holds none of the
    rest of its body, and the connection serves the next request."""
    server = start_smartserve(*_OPTIONS, "--max-request-body", str(MIB))
    RawClient.connect("127.0.0.1", server.port).call(b"hello")  # Breezy loaded before the baseline
    upload = _Upload(server, [b"put", b"/big", b""])
    upload.send_parts(os.urandom(MIB // 2), 160)  # 80 MiB
    client = upload.finish()
    try:
        refused = client.read_reply()
        assert (refused.success, refused.args[0]) == (False, b"RequestTooLarge")
        assert b"1048576 bytes" in refused.args[1]
        assert upload.growth_kib < _GROWTH_BOUND_KIB, f"the server grew by {upload.growth_kib} KiB"
        assert not (server.data / "branches" / "big").exists()
        written = client.call(b"put", b"/small", b"", body=b"x" * MIB)
        assert written.args == (b"ok",)
    finally:
        client.close()
    assert (server.data / "branches" / "small").read_bytes() == b"x" * MIB
    assert "put from - at 127.0.0.1:" in server.log()
    assert "refused: the request body is over the server's limit of 1048576 bytes" in server.log()
    outcomes = [(record["verb"], record["outcome"]) for record in server.access_records()]
    assert ("put", "RequestTooLarge") in outcomes and ("put", "ok") in outcomes


def test_body_of_millions_of_tiny_parts_is_kept_in_about_its_bytes(start_smartserve):
    """A put whose 4 MB body comes as two million two-byte parts is written whole, and the server grows by a
    few times the body, not by the 265 MiB a list of two million objects cost before."""
    server = start_smartserve(*_OPTIONS)
    RawClient.connect("127.0.0.1", server.port).call(b"hello")  # Breezy loaded before the baseline
    upload = _Upload(server, [b"put", b"/tiny", b""])
    server.reset_peak_rss()
    for _ in range(8):
        upload.client.send_repeated_body_part(b"ab", 250_000)
        upload.peak_kib = max(upload.peak_kib, server.rss_kib())
    client = upload.finish()
    try:
        assert client.read_reply().args == (b"ok",)
    finally:
        client.close()
    upload.peak_kib = max(upload.peak_kib, server.peak_rss_kib())
    assert (server.data / "branches" / "tiny").read_bytes() == b"ab" * 2_000_000
    assert upload.growth_kib < 32 * 1024, f"the server grew by {upload.growth_kib} KiB"


def test_body_part_over_the_limit_is_refused_without_being_held_whole(start_smartserve):
    """One body part of 160 MiB to a server whose --max-request-body is 1 MiB is taken as it comes and dropped
    past the limit, never held whole: RequestTooLarge, bounded growth, nothing written, the connection goes on."""
    server = start_smartserve(*_OPTIONS, "--max-request-body", str(MIB))
    RawClient.connect("127.0.0.1", server.port).call(b"hello")  # Breezy loaded before the baseline
    upload = _Upload(server, [b"put", b"/big", b""])
    piece = os.urandom(MIB)

    def pieces():
        for index in range(160):
            if index % 8 == 0:
                upload.peak_kib = max(upload.peak_kib, server.rss_kib())
            yield piece

    upload.client.send_large_body_part(160 * MIB, pieces())
    client = upload.finish()
    try:
        refused = client.read_reply()
        assert (refused.success, refused.args[0]) == (False, b"RequestTooLarge")
        assert upload.growth_kib < _GROWTH_BOUND_KIB, f"the server grew by {upload.growth_kib} KiB"
        assert client.call(b"put", b"/small", b"", body=b"x" * MIB).args == (b"ok",)
    finally:
        client.close()
    assert not (server.data / "branches" / "big").exists()
    assert (server.data / "branches" / "small").read_bytes() == b"x" * MIB


def test_readv_range_list_past_its_own_limit_is_refused_unparsed(start_smartserve):
    """A readv whose list of ranges passes its limit gets RequestTooLarge without Breezy parsing it
    (16 MiB of tiny ranges made the server grow by some 800 MiB), and the connection serves the next readv."""
    server = start_smartserve(*_OPTIONS)
    (server.data / "branches" / "file").write_bytes(bytes(range(256)) * 64)
    client = RawClient.connect("127.0.0.1", server.port, timeout=60)
    try:
        assert client.call(b"readv", b"/file", body=b"0,1\n").body == b"\0"  # Breezy loaded before the baseline
        server.reset_peak_rss()
        baseline_kib = server.rss_kib()
        refused = client.call(b"readv", b"/file", body=b"0,1\n" * (bzr.PARSED_BODY_LIMITS[b"readv"] // 4 * 8))
        assert (refused.success, refused.args[0]) == (False, b"RequestTooLarge")
        assert b"%d bytes" % bzr.PARSED_BODY_LIMITS[b"readv"] in refused.args[1]
        grown_kib = server.peak_rss_kib() - baseline_kib
        assert grown_kib < _GROWTH_BOUND_KIB, f"the server grew by {grown_kib} KiB"
        assert client.call(b"readv", b"/file", body=b"1,2\n300,1\n").body == b"\1\2" + bytes([300 % 256])
    finally:
        client.close()


def test_graph_search_past_its_own_limit_is_refused_unparsed(start_smartserve, brz):
    """A get_parent_map whose search passes its limit gets RequestTooLarge before Breezy parses it, and the same
    connection then maps parents."""
    server = start_smartserve(*_OPTIONS)
    brz.run("init-shared-repo", "-q", server.data / "branches" / "repo")
    client = RawClient.connect("127.0.0.1", server.port, timeout=60)
    args = (b"Repository.get_parent_map", b"repo/", b"include-missing:", b"null:")
    try:
        assert client.call(*args, body=b"null:\n\n1").success  # Breezy loaded before the baseline
        server.reset_peak_rss()
        baseline_kib = server.rss_kib()
        limit = bzr.PARSED_BODY_LIMITS[b"Repository.get_parent_map"]
        keys = b" ".join(b"%07d" % index for index in range(limit // 8 + 1))
        refused = client.call(*args, body=keys + b"\n\n0")
        assert (refused.success, refused.args[0]) == (False, b"RequestTooLarge")
        grown_kib = server.peak_rss_kib() - baseline_kib
        assert grown_kib < _GROWTH_BOUND_KIB, f"the server grew by {grown_kib} KiB"
        assert client.call(*args, body=b"null:\n\n1").success
    finally:
        client.close()


def test_request_of_more_arguments_than_the_entry_limit_is_refused_unrun(start_smartserve, brz):
    """get_parent_map takes its revisions as arguments, which Breezy turns into objects as it does a listed
    body's lines (300,000 cost 144 MiB and 6 s of a worker): a request of more arguments than
    --max-request-entries is refused RequestTooLarge before it runs; the limit itself is answered."""
    server = start_smartserve(*_OPTIONS, "--max-request-entries", "100")
    brz.run("init-shared-repo", "-q", server.data / "branches" / "repo")
    client = RawClient.connect("127.0.0.1", server.port, timeout=60)
    head = (b"Repository.get_parent_map", b"repo/", b"include-missing:")
    try:
        keys = [b"revision-%d" % index for index in range(99)]
        refused = client.call(*head, *keys, body=b"\n\n0")  # 101 arguments after the verb
        assert (refused.success, refused.args) == (
            False,
            (b"RequestTooLarge", b"the request has more than the server's limit of 100 arguments"),
        )
        answered = client.call(*head[:2], *keys, body=b"\n\n0")  # 100
        assert answered.args == (b"ok",)
    finally:
        client.close()
    assert "Repository.get_parent_map from - at 127.0.0.1:" in server.log()
    assert "refused: the request has more than the server's limit of 100 arguments" in server.log()


_FORMAT_2A = b"Bazaar repository format 2a (needs bzr 1.16 or later)\n"
# Each verb whose body Breezy splits into lines, the arguments before its body, and one line of it.
_LISTED_BODIES = [
    ((b"Repository.iter_files_bytes", b"repo/"), b"file-id\0revision-id"),
    ((b"Repository.iter_revisions", b"repo/"), b"revision-id"),
    ((b"VersionedFileRepository.get_inventories", b"repo/", b"unordered"), b"revision-id"),
    ((b"Repository.get_stream_for_missing_keys", b"repo/", _FORMAT_2A), b"inventories\trevision-id"),
]


@pytest.mark.parametrize("args, line", _LISTED_BODIES, ids=[args[0].decode() for args, _ in _LISTED_BODIES])
def test_listed_body_of_more_entries_than_the_limit_is_refused_unparsed(start_smartserve, brz, args, line):
    """A body Breezy splits into one entry per line is held to --max-request-entries lines: one line more gets
    RequestTooLarge naming the limit, before Breezy sees it; exactly the limit is answered, and so is the next
    request on the connection."""
    server = start_smartserve(*_OPTIONS, "--max-request-entries", "100")
    brz.run("init-shared-repo", "-q", server.data / "branches" / "repo")
    client = RawClient.connect("127.0.0.1", server.port, timeout=60)
    try:
        refused = client.call(*args, body=b"\n".join([line] * 101))
        assert (refused.success, refused.args) == (
            False,
            (b"RequestTooLarge", b"the request body lists more than the server's limit of 100 entries"),
        )
        assert client.call(*args, body=b"\n".join([line] * 100)).success
        # Lines each ended by a newline count the same (some verbs take no newline after the last line: the
        # answer is then Breezy's own error, not the limit's).
        assert client.call(*args, body=b"".join([line + b"\n"] * 100)).args[0] != b"RequestTooLarge"
        assert client.call(*args, body=b"".join([line + b"\n"] * 101)).args[0] == b"RequestTooLarge"
    finally:
        client.close()
    verb = args[0].decode()
    assert f"{verb} from - at 127.0.0.1:" in server.log()
    assert "refused: the request body lists more than the server's limit of 100 entries" in server.log()
    records = wait_for(lambda: server.access_records()[3:] and server.access_records(), 10, "four access lines")
    outcomes = [(record["verb"], record["outcome"]) for record in records]
    assert outcomes[:2] == [(verb, "RequestTooLarge"), (verb, "ok")] and outcomes[3] == (verb, "RequestTooLarge")


def test_millions_of_tiny_entries_are_refused_with_bounded_growth(start_smartserve, brz):
    """Two million distinct file keys of a few bytes (16 MiB) would cost Breezy some 800 MiB and 40 s of a
    worker; at the default limit they are refused with the server barely growing, and the connection goes on."""
    server = start_smartserve(*_OPTIONS)
    brz.run("init-shared-repo", "-q", server.data / "branches" / "repo")
    client = RawClient.connect("127.0.0.1", server.port, timeout=60)
    args = (b"Repository.iter_files_bytes", b"repo/")
    try:
        assert client.call(*args, body=b"a\0b").success  # Breezy loaded before the baseline
        server.reset_peak_rss()
        baseline_kib = server.rss_kib()
        refused = client.call(*args, body=b"\n".join(b"%x\0r" % index for index in range(2 * MIB)))
        assert (refused.success, refused.args[0]) == (False, b"RequestTooLarge")
        assert b"limit of %d entries" % bzr.DEFAULT_MAX_BODY_ENTRIES in refused.args[1]
        grown_kib = server.peak_rss_kib() - baseline_kib
        assert grown_kib < _GROWTH_BOUND_KIB, f"the server grew by {grown_kib} KiB"
        assert client.call(*args, body=b"a\0b").success
    finally:
        client.close()


def test_stock_checkout_of_a_tree_over_the_entry_limit_fails_with_the_reason(start_smartserve, brz, tmp_path):
    """A lightweight checkout asks for the whole tree's files in one request: with more files than
    --max-request-entries, brz fails and shows the server's reason; with the limit at the tree's size it works."""
    branch = brz.make_branch(tmp_path / "source", revisions=1, files=30)
    for limit, works in ((29, False), (30, True)):
        server = start_smartserve(*_OPTIONS, "--max-request-entries", str(limit), name=f"limit-{limit}")
        brz.run("push", "-q", f"{server.url}/trunk", cwd=branch)
        checkout = tmp_path / f"checkout-{limit}"
        result = brz.run("checkout", "--lightweight", f"{server.url}/trunk", checkout, check=False)
        if works:
            assert result.returncode == 0, result.stderr
            assert (checkout / "file29.txt").read_text() == (branch / "file29.txt").read_text()
        else:
            assert result.returncode != 0
            assert f"the request body lists more than the server's limit of {limit} entries" in result.stderr


def test_stock_client_readv_of_many_short_ranges_fits_the_limit(smartserve):
    """Breezy's client at its largest readv (5 MiB a request) of ranges of 100 bytes, the offsets in the tens of
    millions: its lists of ranges stay under their limit and every byte comes back right."""
    size = 12 * MIB
    pattern = os.urandom(1 << 16)
    with open(smartserve.data / "branches" / "sparse", "wb") as out:
        out.truncate(60 * MIB)
        out.seek(60 * MIB - size)
        out.write(pattern * (size // len(pattern)))
    script = (
        "import sys, hashlib, breezy\n"
        "with breezy.initialize():\n"
        "    from breezy.transport import get_transport\n"
        "    base, size = 60 * 1024 * 1024 - int(sys.argv[2]), int(sys.argv[2])\n"
        "    offsets = [(start, 100) for start in range(base, base + size, 200)]\n"
        "    digest = hashlib.sha256()\n"
        "    for offset, data in get_transport(sys.argv[1]).readv('sparse', offsets):\n"
        "        digest.update(data)\n"
        "    print(len(offsets), digest.hexdigest())\n"
    )
    read = subprocess.run(
        [sys.executable, "-c", script, f"bzr://127.0.0.1:{smartserve.port}/", str(size)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "BRZ_HOME": str(smartserve.data.parent / "brz-home")},
    )
    assert read.returncode == 0, read.stderr
    whole = pattern * (size // len(pattern))
    expected = hashlib.sha256(b"".join(whole[at : at + 100] for at in range(0, size, 200))).hexdigest()
    assert read.stdout.split() == [str(len(range(0, size, 200))), expected]
    assert "RequestTooLarge" not in smartserve.access_lines()


def test_body_within_the_limit_in_many_parts_is_kept_whole(start_smartserve):
    """A put of exactly the limit, sent in many parts, writes the whole body."""
    server = start_smartserve(*_OPTIONS, "--max-request-body", str(MIB))
    upload = _Upload(server, [b"put", b"/whole", b""])
    part = os.urandom(MIB // 16)
    upload.send_parts(part, 16)
    client = upload.finish()
    try:
        assert client.read_reply().args == (b"ok",)
    finally:
        client.close()
    assert (server.data / "branches" / "whole").read_bytes() == part * 16


def test_push_body_after_its_inserter_failed_is_dropped_not_queued(start_smartserve, brz):
    """An insert_stream whose stream Breezy has already rejected takes the rest of a large body without keeping
    it, answers the error at the end, and another client is served meanwhile."""
    server = start_smartserve(*_OPTIONS)
    brz.run("init-shared-repo", "-q", server.data / "branches" / "repo")
    other = RawClient.connect("127.0.0.1", server.port)
    assert other.call(b"BzrDir.open_2.1", b"repo/").success  # Breezy loaded before the baseline
    upload = _Upload(server, [b"Repository.insert_stream_1.19", b"repo/", b""])
    upload.send_parts(b"not a pack container\n", 1)
    upload.send_parts(os.urandom(MIB), 120)
    assert other.call(b"hello").args == (b"ok", b"2")
    client = upload.finish()
    try:
        failed = client.read_reply()
        assert not failed.success
        assert b"UnknownContainerFormatError" in b" ".join(arg for arg in failed.args if isinstance(arg, bytes))
    finally:
        client.close()
        other.close()
    assert upload.growth_kib < _GROWTH_BOUND_KIB, f"the server grew by {upload.growth_kib} KiB"


def _inserter(items):
    """A stand-in for Breezy's insert_stream command: a queue holding ``items`` and a thread taking them on cue."""
    body_queue = queue.Queue()
    for item in items:
        body_queue.put(item)
    take = threading.Semaphore(0)

    def consume():
        while True:
            take.acquire()
            if body_queue.get() is StopIteration:
                return

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    return SimpleNamespace(queue=body_queue, insert_thread=thread), take


def _wait_in_thread(inserter):
    """A request run waiting for ``inserter`` in a thread of its own, and the event set when the wait returns."""
    run = bzr._BzrRequestRun(None, None, None, (b"Repository.insert_stream_1.19",))
    done = threading.Event()

    def wait():
        run._wait_for_inserter(inserter)
        done.set()

    threading.Thread(target=wait, daemon=True).start()
    return run, done


def _end(inserter, take) -> None:
    inserter.queue.put(StopIteration)
    take.release(inserter.queue.qsize())
    inserter.insert_thread.join(10)


def test_step_feeding_an_inserter_waits_until_it_has_taken_the_body_down_to_the_bound():
    """With more than STREAM_AHEAD_BYTES waiting in the queue, the step returns only once the thread took enough."""
    part = b"x" * MIB
    parts = bzr.STREAM_AHEAD_BYTES // MIB + 3
    inserter, take = _inserter([part] * parts)
    run, done = _wait_in_thread(inserter)
    assert not done.wait(0.2), "the step did not wait for the inserter"
    take.release(3)
    assert done.wait(10), "the step went on waiting after the inserter took the body down to the bound"
    assert inserter.queue.qsize() == parts - 3
    _end(inserter, take)


def test_step_feeding_an_inserter_counts_parts_too():
    """Many small parts make it wait as well: STREAM_AHEAD_PARTS of them, whatever their size."""
    inserter, take = _inserter([b"x"] * bzr.STREAM_AHEAD_PARTS)
    run, done = _wait_in_thread(inserter)
    assert not done.wait(0.2), "the step did not wait for the inserter"
    take.release(1)
    assert done.wait(10)
    _end(inserter, take)


def test_step_stops_waiting_when_the_inserter_ends_or_the_request_is_aborted():
    """A thread that ended, or a request whose connection is gone, releases the waiting step."""
    ended, take = _inserter([StopIteration] + [b"x" * MIB] * 8)
    take.release(1)
    ended.insert_thread.join(10)
    _, done = _wait_in_thread(ended)
    assert done.wait(10), "the step waited for a thread that had ended"

    stuck, take = _inserter([b"x" * MIB] * 8)
    run, done = _wait_in_thread(stuck)
    assert not done.wait(0.2)
    run._aborted = True
    assert done.wait(bzr._INSERTER_CHECK_SECONDS + 10), "an aborted request's step went on waiting"
    _end(stuck, take)


_FORMAT_2A = b"Bazaar repository format 2a (needs bzr 1.16 or later)\n"


def _push_upload(server, brz):
    """A raw insert_stream into a new shared repository, begun with the pack header and the 2a format record."""
    from breezy.bzr import pack

    brz.run("init-shared-repo", "-q", server.data / "branches" / "repo")
    RawClient.connect("127.0.0.1", server.port).call(b"BzrDir.open_2.1", b"repo/")  # Breezy loaded before the baseline
    upload = _Upload(server, [b"Repository.insert_stream_1.19", b"repo/", b""])
    serialiser = pack.ContainerSerialiser()
    upload.send_parts(serialiser.begin() + serialiser.bytes_record(_FORMAT_2A, []), 1)
    return upload


def test_push_record_declared_over_the_limit_is_refused_and_the_repository_stays_usable(start_smartserve, brz, tmp_path):
    """A record whose length line says more than --max-request-body is refused before its body is kept; the
    rest of the body is dropped, and a real push into the repository works afterwards."""
    server = start_smartserve(*_OPTIONS, "--max-request-body", str(MIB))
    upload = _push_upload(server, brz)
    upload.send_parts(b"B%d\n\n" % (64 * MIB), 1)
    upload.send_parts(os.urandom(MIB), 64)
    client = upload.finish()
    try:
        refused = client.read_reply()
        assert (refused.success, refused.args[0]) == (False, b"RequestTooLarge")
        assert b"a record of the pushed stream is over the server's limit of 1048576 bytes" in refused.args[1]
    finally:
        client.close()
    assert upload.growth_kib < _GROWTH_BOUND_KIB, f"the server grew by {upload.growth_kib} KiB"
    local = brz.make_branch(tmp_path / "local", 3)
    brz.run("push", "-q", "-d", local, f"{server.url}/repo/trunk")
    assert brz.run("revno", f"{server.url}/repo/trunk").stdout.strip() == "3"
    check = brz.run("check", server.data / "branches" / "repo" / "trunk", check=False)
    assert check.returncode == 0, check.stderr


def test_push_record_cut_into_thousands_of_parts_is_parsed_in_linear_time(start_smartserve, brz):
    """A 48 MiB record sent 4 KiB at a time reaches Breezy's parser as one piece: it answers at once, where
    feeding the parts one by one would copy the growing record again for each (hundreds of GB)."""
    server = start_smartserve(*_OPTIONS)
    upload = _push_upload(server, brz)
    upload.send_parts(b"B%d\n%s\n\n" % (48 * MIB, b"texts"), 1)
    upload.send_parts(b"\0" * 4096, 48 * MIB // 4096)
    upload.client.sock.settimeout(60)
    client = upload.finish()
    try:
        answer = client.read_reply()  # a record of zeros is no record stream: an error, but at once
        assert not answer.success
    finally:
        client.close()
    # Breezy's message quotes the record; the answer and the log line quote only its start.
    assert max(len(arg) for arg in answer.args) <= bzr.MAX_ERROR_ARGUMENT_BYTES + 64
    assert b"bytes cut" in answer.args[-1]
    assert max(len(line) for line in server.log().splitlines()) < 4096

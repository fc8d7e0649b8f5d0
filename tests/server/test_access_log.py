"""Access events: one per request, written to a file of their own or to the twistd log."""

from __future__ import annotations

import re
import time

import pytest
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from smartserve.server.accesslog import AccessLogFile, access_logger
from smartserve.testing import MemoryBackend, RawClient, encode_request, serve_in_memory
from support import SmartserveProcess, logged_events, wait_for

_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} memory - (\S+) (\S+) (\S+) [\d.]+ms in=(\d+) out=(\d+) conn=1$"
)


def test_access_log_file_gets_one_line_per_request(tmp_path):
    """Each request appends one timestamped line with its verb, class, outcome and byte counts; nothing reaches the global log."""
    path = tmp_path / "access.log"
    access_file = AccessLogFile(str(path))
    seen_globally = []
    globalLogPublisher.addObserver(seen_globally.append)
    try:
        factory, protocol, transport = serve_in_memory(MemoryBackend({b"f": b"data"}), clock=Clock())
        factory.access_log = access_logger(access_file)
        request = encode_request([b"get", b"f"])
        protocol.dataReceived(request)
        protocol.dataReceived(encode_request([b"append", b"f", b""], body=b"more"))
        protocol.dataReceived(encode_request([b"get", b"missing"]))
    finally:
        globalLogPublisher.removeObserver(seen_globally.append)
        access_file.close()
    lines = path.read_text().splitlines()
    parsed = [_LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [match.groups()[:3] for match in parsed] == [
        ("get", "read", "ok"),
        ("append", "mutate", "ok"),
        ("get", "read", "NoSuchFile"),
    ]
    assert int(parsed[0].group(4)) == len(request)
    assert sum(int(match.group(5)) for match in parsed) == len(transport.value())
    assert not [event for event in seen_globally if event.get("log_access")]


def test_access_events_count_the_bytes_of_their_own_request():
    """Requests pipelined in one read, one sent a byte at a time and one cut mid-body each count exactly their own bytes in."""
    events = []
    factory, protocol, transport = serve_in_memory(MemoryBackend({b"f": b"data"}), clock=Clock())
    factory.access_log = access_logger(events.append)
    pipelined = [
        encode_request([b"get", b"f"]),
        encode_request([b"append", b"f", b""], body=b"more" * 100),
        encode_request([b"get", b"missing"]),
    ]
    protocol.dataReceived(b"".join(pipelined))
    one_by_one = encode_request([b"put", b"g", b""], body=b"x" * 300)
    for index in range(len(one_by_one)):
        protocol.dataReceived(one_by_one[index : index + 1])
    cut = encode_request([b"put", b"h", b""], body=b"y" * 300)[:200]
    protocol.dataReceived(cut[:100])
    protocol.dataReceived(cut[100:])
    protocol.connectionLost(None)
    assert [(event["verb"], event["outcome"], event["bytes_in"]) for event in events] == [
        ("get", "ok", len(pipelined[0])),
        ("append", "ok", len(pipelined[1])),
        ("get", "NoSuchFile", len(pipelined[2])),
        ("put", "ok", len(one_by_one)),
        ("put", "aborted", len(cut)),
    ]


def test_request_broken_by_bad_bytes_is_logged_as_a_protocol_error_with_the_reply_counted():
    """A request whose body breaks the framing is answered with an error and closed: its access line says
    ``protocol-error`` and counts that reply, rather than ``aborted`` with nothing out as for a vanished client.
    """
    events = []
    factory, protocol, transport = serve_in_memory(MemoryBackend({}), clock=Clock())
    factory.access_log = access_logger(events.append)
    opening = encode_request([b"put", b"g", b""], body=b"x" * 10)[:-16]  # the arguments, and no body part yet
    with logged_events(lambda event: "Protocol error" in event.get("log_format", "")) as warnings:
        protocol.dataReceived(opening + b"Zjunk")
        protocol.connectionLost(None)
    [event] = events
    assert (event["verb"], event["outcome"]) == ("put", "protocol-error")
    assert event["bytes_out"] == len(transport.value()) > 0
    assert len(warnings) == 1


def test_client_gone_in_the_middle_of_a_request_is_logged_as_such_not_as_a_protocol_error():
    """A client that sends its end of the connection mid-request (a killed ``brz push``) gets an info line saying
    so and its request an ``aborted`` access line; no protocol-error warning."""
    events = []
    factory, protocol, transport = serve_in_memory(MemoryBackend({}), clock=Clock())
    factory.access_log = access_logger(events.append)
    with logged_events(lambda event: event.get("log_namespace") == "smartserve.server.protocol") as lines:
        protocol.dataReceived(encode_request([b"put", b"g", b""], body=b"x" * 300)[:200])
        protocol.eofReceived()
        protocol.connectionLost(None)
    assert [(event["verb"], event["outcome"]) for event in events] == [("put", "aborted")]
    assert [event["log_level"].name for event in lines] == ["info"]
    assert "closed by the client in the middle of a request" in lines[0]["log_format"]


def test_access_log_file_keeps_odd_verbs_to_one_field_of_one_line(tmp_path):
    """Verbs with a newline, spaces, control characters, bytes that are not UTF-8 or megabytes of text are escaped and cut, so no client can forge or flood lines."""
    path = tmp_path / "access.log"
    access_file = AccessLogFile(str(path))
    verbs = [
        b"get\n2026-01-01T00:00:00+0000 10.0.0.1:1 root get read ok 0.01ms in=1 out=1 conn=9",
        b"get read ok",
        b"\x1b[2J\r\t",
        b"\xff\xfe\xe2\x80\xa8",
        b"x" * 1_000_000,
    ]
    try:
        factory, protocol, transport = serve_in_memory(MemoryBackend(), clock=Clock())
        factory.access_log = access_logger(access_file)
        for verb in verbs:
            protocol.dataReceived(encode_request([verb]))
    finally:
        access_file.close()
    lines = path.read_text().splitlines()
    parsed = [_LINE.match(line) for line in lines]
    assert len(lines) == len(verbs) and all(parsed), lines
    assert [match.group(1) for match in parsed[:4]] == [
        "get\\x0a2026-01-01T00:00:00+0000\\x2010.0.0.1:1\\x20root\\x20get\\x20read\\x20ok\\x200.01ms\\x20in=1\\x20out=1\\x20conn=9",
        "get\\x20read\\x20ok",
        "\\x1b[2J\\x0d\\x09",
        "\\xff\\xfe\\u2028",
    ]
    assert parsed[4].group(1) == "x" * 200 + "..."
    assert [match.group(3) for match in parsed] == ["UnknownMethod"] * len(verbs)


def test_access_log_file_appends_and_stamps_each_line_with_its_event_time(tmp_path):
    """An existing file is appended to, and each line starts with its event's own time, not the time it was written."""
    path = tmp_path / "access.log"
    path.write_text("earlier line\n")
    access_file = AccessLogFile(str(path))
    when = time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, -1))
    access_file({"log_time": when, "access_line": "a line"})
    access_file({"log_time": when + 1, "log_format": "plain {word}", "word": "event"})
    access_file.close()
    first, second, third = path.read_text().splitlines()
    assert first == "earlier line"
    assert second.startswith("2026-01-02T03:04:05") and second.endswith(" a line")
    assert third.startswith("2026-01-02T03:04:06") and third.endswith(" plain event")


def test_access_log_dash_sends_access_events_to_the_twistd_log(tmp_path):
    """With --access-log=- each request is a line of the twistd log and no access file is made."""
    server = SmartserveProcess(tmp_path / "data", ["--ssh=none", "--bzr=tcp:0:interface=127.0.0.1", "--access-log=-"])
    server.start()
    try:
        client = RawClient.connect("127.0.0.1", server.port)
        try:
            assert client.call(b"hello").args == (b"ok", b"2")
        finally:
            client.close()
        wait_for(lambda: "[smartserve.access#info] 127.0.0.1:" in server.log(), 10, "the access line in the twistd log")
    finally:
        server.stop()
    assert " hello read ok " in server.log()
    assert not (tmp_path / "data" / "access.log").exists()


@pytest.fixture
def file_complaints():
    """The events the access log file itself logs (about failed writes) while the test runs."""
    with logged_events(lambda event: event.get("log_namespace") == "smartserve.server.accesslog") as events:
        yield events


class _Ticks:
    """A monotonic clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_access_log_file_that_cannot_be_written_drops_lines_and_says_so_now_and_then(file_complaints):
    """On a full disk each line is counted and dropped; the twistd log hears of it at once, then at most once a minute."""
    from smartserve.server.accesslog import COMPLAINT_INTERVAL

    ticks = _Ticks()
    access_file = AccessLogFile("/dev/full", monotonic=ticks)
    try:
        for _ in range(3):
            access_file({"log_time": time.time(), "access_line": "a line"})
        ticks.now += COMPLAINT_INTERVAL
        access_file({"log_time": time.time(), "access_line": "a line"})
    finally:
        access_file.close()
    assert access_file.lines_lost == 4
    assert [(event["log_level"].name, event["lost"]) for event in file_complaints] == [("error", 1), ("error", 3)]
    assert "No space left on device" in file_complaints[0]["error"]


def test_server_with_an_unwritable_access_log_keeps_serving(tmp_path):
    """With the access log on a full disk, requests on one connection are all answered and /metrics counts the lost lines."""
    import urllib.request

    server = SmartserveProcess(
        tmp_path / "data",
        [
            "--ssh=none", "--bzr=tcp:0:interface=127.0.0.1", "--access-log=/dev/full",
            "--admin=tcp:0:interface=127.0.0.1",
        ],  # fmt: skip
    )
    server.start()
    try:
        client = RawClient.connect("127.0.0.1", server.port)
        try:
            replies = [client.call(b"hello").args for _ in range(3)]
        finally:
            client.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{server.admin_port}/metrics", timeout=10) as response:
            metrics = response.read().decode()
    finally:
        server.stop()
    assert replies == [(b"ok", b"2")] * 3
    assert "smartserve_access_log_lost_lines_total 3.0" in metrics
    assert "cannot write the access log /dev/full: No space left on device" in server.log()


def test_access_log_file_says_when_it_is_written_again(tmp_path, monkeypatch, file_complaints):
    """After a failure, the first line written again is followed by one line in the twistd log with the total lost."""
    import os
    import types

    from smartserve.server import accesslog

    path = tmp_path / "access.log"
    access_file = AccessLogFile(str(path))
    def write_fails(fd, data):
        raise OSError(5, "Input/output error")

    try:
        monkeypatch.setattr(accesslog, "os", types.SimpleNamespace(write=write_fails))
        access_file({"log_time": time.time(), "access_line": "lost line"})
        monkeypatch.setattr(accesslog, "os", os)
        access_file({"log_time": time.time(), "access_line": "kept line"})
        access_file({"log_time": time.time(), "access_line": "another kept line"})
    finally:
        access_file.close()
    assert [line.split(" ", 1)[1] for line in path.read_text().splitlines()] == ["kept line", "another kept line"]
    assert [event["log_level"].name for event in file_complaints] == ["error", "info"]
    assert file_complaints[1]["lost"] == 1 and "written again" in file_complaints[1]["log_format"]

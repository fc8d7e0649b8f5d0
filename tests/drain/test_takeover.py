"""Restart on one host: a new process takes the listening sockets over while clients keep working."""

from __future__ import annotations

import re
import shutil
import socket

import pytest

from support import free_port, wait_for

from smartserve.testing import RawClient

from .conftest import ConnectionLoop, ControlConnection, GatedRelay, ServerProcess, server_status

pytestmark = pytest.mark.timeout(120)

_DRAINING = re.compile(r"Draining: (\d+) connections open, (\d+) busy")
TAKEN_BACK = "The process taking over went away before it asked this one to drain"
CONTROL_LISTENING = "control listening on"
# Lines Twisted's factories and AMP log by default, which smartserve turns off.
_TWISTED_CONNECTION_NOISE = re.compile(r"(Starting|Stopping) factory|connection (established|lost) \(HOST")


def wait_taken_back(server: ServerProcess) -> None:
    """Wait until ``server`` took its listeners back and listens on its control socket again."""
    wait_for(
        lambda: TAKEN_BACK in server.log() and server.log().count(CONTROL_LISTENING) == 2,
        30,
        "the server to take its listeners back",
    )


def assert_serves(server: ServerProcess) -> None:
    """``server`` answers a new bzr:// connection, and `smartserve status` on its control socket."""
    client = RawClient.connect("127.0.0.1", server.port, timeout=10)
    try:
        assert client.call(b"hello").args == (b"ok", b"2")
    finally:
        client.close()
    status = server_status(server)
    assert (status["pid"], status["state"]) == (server.pid, "serving")


def test_takeover_long_branch_completes_and_no_connection_lost(tmp_path, brz, big_branch, connection_loop):
    """A brz branch whose stream is in flight during a takeover completes intact, the old process exits, and no new connection is refused or reset."""
    data = tmp_path / "data"
    shutil.copytree(big_branch, data / "branches" / "big")
    port = free_port()
    options = ["--bzr", f"tcp:{port}:interface=127.0.0.1", "--ssh", "none"]
    old = ServerProcess(data, options, name="old", access_log="-").start()
    new = ServerProcess(data, [*options, "--takeover", str(old.control)], name="new")
    # brz goes through a relay that holds the stream once it has begun, so
    # the old process is still writing it when the drain starts.
    relay = GatedRelay(port, hold_after=1024 * 1024)
    try:
        loop = connection_loop(port)
        loop.wait_for_attempts(20)
        branching = brz.popen("branch", "-q", f"bzr://127.0.0.1:{relay.port}/big", tmp_path / "copy")
        wait_for(relay.holding.is_set, 60, "the stream to begin")
        new.start()
        draining = wait_for(lambda: _DRAINING.search(old.log()), 30, "the old process to drain")
        assert old.process.poll() is None
        relay.release()
        assert old.wait_exit(60) == 0
        _, err = branching.communicate(timeout=60)
        served_before = len(new.access_records())
        wait_for(lambda: len(new.access_records()) >= served_before + 20, 30, "the new process to serve the loop")
        attempts = loop.stop()
    finally:
        relay.close()
        old.stop()
        new.stop()
    assert branching.returncode == 0, err
    assert int(draining.group(2)) >= 1, "brz's stream was not busy when the drain started"
    old_log = old.log()
    assert old_log.index("Draining: ") < old_log.index("Repository.get_stream_1.19"), "the stream ended before the drain"
    assert "Drained in" in old_log and "(all closed); 0 aborted" in old_log
    for log in (old_log, new.log()):
        assert not _TWISTED_CONNECTION_NOISE.search(log), "factory or AMP connection lines in the log"
    assert ConnectionLoop.failures(attempts) == []
    assert brz.run("revno", tmp_path / "copy").stdout == brz.run("revno", big_branch).stdout
    assert brz.run("log", "--line", tmp_path / "copy").stdout == brz.run("log", "--line", big_branch).stdout
    brz.run("check", tmp_path / "copy")


@pytest.fixture
def server(tmp_path):
    """A server on bzr:// only."""
    process = ServerProcess(tmp_path / "data", ["--bzr", "tcp:0:interface=127.0.0.1", "--ssh", "none"]).start()
    yield process
    process.stop()


def test_second_takeover_refused_while_one_is_in_progress(server):
    """While one process is taking the listeners over, a second TakeOver is refused with NOT_SERVING."""
    first, second = ControlConnection(server.control), ControlConnection(server.control)
    try:
        assert "_answer" in first.call("TakeOver")
        refused = second.call("TakeOver")
        assert refused.get("_error_code") == b"NOT_SERVING", refused
        assert b"being handed over to another process already" in refused["_error_description"]
        assert "_answer" in first.call("Drain")
    finally:
        first.close()
        second.close()
    assert server.wait_exit(30) == 0


def test_takeover_abandoned_before_drain_old_server_serves_again(server):
    """A process that takes the listeners and goes away before asking for the drain leaves the old server accepting and answering on its control socket."""
    control = ControlConnection(server.control)
    try:
        assert "_answer" in control.call("TakeOver")
        assert not server.control.exists()
    finally:
        control.close()
    wait_taken_back(server)
    assert "accepting again on ['bzr']" in server.log()
    assert_serves(server)


def test_takeover_of_a_path_where_nothing_answers_refused_while_another_server_answers_on_control(tmp_path):
    """A --takeover path where nothing answers does not let the new process take the control socket of a live server: it is refused as a plain start is."""
    data = tmp_path / "data"
    options = ["--bzr", "tcp:0:interface=127.0.0.1", "--ssh", "none"]
    old = ServerProcess(data, options, name="old").start()
    new = ServerProcess(data, [*options, "--takeover", str(tmp_path / "typo.sock")], name="new")
    try:
        new.start_expecting_exit()
        assert new.process.returncode == 1
        assert (
            f"could not start: another server answers on {old.control}; use --takeover {old.control} to replace it"
            in new.log()
        )
        assert_serves(old)
    finally:
        new.stop()
        old.stop()


def test_stopped_server_leaves_a_control_socket_another_process_bound_in_place(server):
    """A server whose control socket path now holds another process's socket does not remove that socket as it stops."""
    server.control.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(server.control))
        other.listen()
        inode = server.control.stat().st_ino
        server.stop()
        assert server.control.stat().st_ino == inode
    assert f"Leaving {server.control} in place: another process has bound its own socket there" in server.log()


def test_takeover_asked_to_listen_elsewhere_refused_old_server_serves_on(server):
    """A new process asked to listen on another port than the socket handed over fails to start, naming both; the old server takes its sockets back."""
    moved = f"tcp:{free_port()}:interface=127.0.0.1"
    new = ServerProcess(server.data, ["--bzr", moved, "--ssh", "none", "--takeover", str(server.control)], name="new")
    try:
        new.start_expecting_exit()
        assert new.process.returncode == 1
        assert (
            f"could not start: --bzr {moved} asks for 127.0.0.1:{moved.split(':')[1]} "
            f"but the socket handed over listens on 127.0.0.1:{server.port}" in new.log()
        )
        assert "listening on" not in new.log()
        wait_taken_back(server)
        assert_serves(server)
    finally:
        new.stop()

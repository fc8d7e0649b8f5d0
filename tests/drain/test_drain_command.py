"""`smartserve drain` and `smartserve status` against a real server process."""

from __future__ import annotations

import json
import signal
import socket
import time

import pytest

from smartserve.testing import RawClient


from .conftest import ControlConnection, ServerProcess, run_smartserve, said_draining, server_status

pytestmark = pytest.mark.timeout(90)

BIG = 48 * 1024 * 1024


@pytest.fixture
def server(tmp_path):
    """A server on bzr:// with one big file under its root."""
    data = tmp_path / "data"
    (data / "branches").mkdir(parents=True)
    (data / "branches" / "big.bin").write_bytes(b"\xa5" * BIG)
    process = ServerProcess(data, ["--bzr", "tcp:0:interface=127.0.0.1", "--ssh", "none"]).start()
    yield process
    process.stop()


def stuck_client(port: int) -> RawClient:
    """A client that asks for the big file and never reads the answer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    client = RawClient(sock)
    client.send_request([b"get", b"big.bin"])
    return client


def test_status_json_while_serving(server):
    """`smartserve status --json` prints the serving state, the pid and the requests counted so far."""
    client = RawClient.connect("127.0.0.1", server.port)
    client.call(b"hello")
    done = run_smartserve("status", "--control", server.control, "--json")
    client.close()
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["state"] == "serving"
    assert status["pid"] == server.pid
    assert status["connections"] == 1
    assert {"verb_class": "read", "count": 1} in status["requests"]


def test_status_text_names_state(server):
    """`smartserve status` prints one line with the pid and the state."""
    done = run_smartserve("status", "--control", server.control)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"pid {server.pid}: serving: 0 connections open, 0 busy")


def test_status_adds_no_line_to_the_server_log(server):
    """`smartserve status`, which monitoring may run every few seconds, logs nothing: AMP logged every control
    connection made and lost at info. The server is stopped first, so that each connection was seen to close."""
    before = server.log()
    for _ in range(3):
        done = run_smartserve("status", "--control", server.control)
        assert done.returncode == 0, done.stderr
    server.process.send_signal(signal.SIGTERM)
    assert server.wait_exit(30) == -signal.SIGTERM
    added = server.log()[len(before):].splitlines()
    assert any("Drained in" in line for line in added)
    assert [line for line in added if "twisted.protocols.amp" in line or "ControlProtocol" in line] == []


def test_drain_command_drained_exits_0(server):
    """With only idle connections, `smartserve drain` prints progress and 'drained', exits 0, and the server exits."""
    client = RawClient.connect("127.0.0.1", server.port)
    client.call(b"hello")
    done = run_smartserve("drain", "--control", server.control)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "drained"
    assert said_draining(client.wait_closed())
    assert server.wait_exit(30) == 0


def test_drain_command_timed_out_exits_1(server):
    """With a request stuck at the deadline, `smartserve drain --timeout 1` says it timed out, exits 1, and the stuck connection is aborted."""
    client = stuck_client(server.port)
    try:
        progress = run_smartserve("status", "--control", server.control, "--json")
        assert json.loads(progress.stdout)["connections"] == 1
        done = run_smartserve("drain", "--control", server.control, "--timeout", "1")
        assert done.returncode == 1, done.stdout + done.stderr
        assert "timed out: aborted 1 connections" in done.stderr
        assert "draining: 1 connections open" in done.stdout
        assert server.wait_exit(30) == 0
        assert "Drain deadline passed: aborted 1 connections" in server.log()
    finally:
        client.close()


def test_drain_command_no_server_exits_2(tmp_path):
    """With nothing on the control socket, `smartserve drain` says so and exits 2."""
    done = run_smartserve("drain", "--control", tmp_path / "nothing.sock")
    assert done.returncode == 2
    assert "no server answers" in done.stderr
    assert done.stdout == ""


def test_status_no_server_exits_2(tmp_path):
    """With nothing on the control socket, `smartserve status` exits 2."""
    done = run_smartserve("status", "--control", tmp_path / "nothing.sock")
    assert done.returncode == 2
    assert "no server answers" in done.stderr


@pytest.mark.parametrize("timeout", ["-1", "nan", "inf"])
def test_drain_command_bad_timeout_exits_2_and_server_keeps_serving(server, timeout):
    """`smartserve drain --timeout` with a negative, NaN or infinite value exits 2 saying why; the server keeps serving and drains later."""
    done = run_smartserve("drain", "--control", server.control, "--timeout", timeout)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "must be a finite number of seconds, 0 or more" in done.stderr
    assert server_status(server)["state"] == "serving"
    client = RawClient.connect("127.0.0.1", server.port)
    assert client.call(b"hello").args == (b"ok", b"2")
    client.close()
    done = run_smartserve("drain", "--control", server.control)
    assert done.returncode == 0, done.stderr
    assert server.wait_exit(30) == 0


@pytest.mark.parametrize("timeout", [b"-1", b"nan", b"inf"])
def test_control_drain_bad_timeout_refused_before_anything_changes(server, timeout):
    """A Drain on the control socket with a negative, NaN or infinite timeout gets BAD_TIMEOUT; the server keeps serving, and SIGTERM still drains it."""
    control = ControlConnection(server.control)
    try:
        answer = control.call("Drain", timeout=timeout)
    finally:
        control.close()
    assert answer.get("_error_code") == b"BAD_TIMEOUT", answer
    assert b"finite number of seconds, 0 or more" in answer["_error_description"]
    assert server_status(server)["state"] == "serving"
    client = RawClient.connect("127.0.0.1", server.port)
    assert client.call(b"hello").args == (b"ok", b"2")
    client.close()
    server.process.send_signal(signal.SIGTERM)
    assert server.wait_exit(30) == -signal.SIGTERM
    assert "Drained in" in server.log()


def test_control_command_with_unreadable_arguments_gets_an_error_and_one_log_line(server):
    """A Drain whose timeout is not a number, or a ListenerDescriptor with no index, is answered BAD_ARGUMENTS naming
    the argument, on a connection that stays usable; the server logs one line for each, no traceback, and serves on."""
    control = ControlConnection(server.control)
    try:
        bad_timeout = control.call("Drain", timeout=b"abc")
        no_index = control.call("ListenerDescriptor")
        status = control.call("Status")
    finally:
        control.close()
    assert bad_timeout["_error_code"] == b"BAD_ARGUMENTS", bad_timeout
    assert bad_timeout["_error_description"] == (
        b"Drain: argument timeout cannot be read: could not convert string to float: b'abc'"
    )
    assert no_index["_error_code"] == b"BAD_ARGUMENTS", no_index
    assert no_index["_error_description"] == b"ListenerDescriptor: argument index is missing"
    assert status["state"] == b"serving"
    log = server.log()
    assert "Traceback" not in log and "Unhandled" not in log
    refused = [line for line in log.splitlines() if "Refused a control command" in line]
    assert [line.split("] ", 1)[1] for line in refused] == [
        "Refused a control command: Drain: argument timeout cannot be read: could not convert string to float: b'abc'",
        "Refused a control command: ListenerDescriptor: argument index is missing",
    ]


def test_control_client_that_never_reads_does_not_keep_drained_server_alive(server):
    """A control client that never reads its answers is cut off shortly after the drain, and the drained server exits."""
    control = ControlConnection(server.control)
    try:
        # Thousands of answers, more than the socket holds: the server stops
        # reading this connection once they back up.
        control.sock.setblocking(False)
        try:
            control.sock.sendall(b"".join(control.ask("Status") for _ in range(20000)))
        except BlockingIOError:
            pass
        assert run_smartserve("drain", "--control", server.control, timeout=30).returncode == 0
        assert server.wait_exit(30) == 0
    finally:
        control.close()
    assert "Aborting 1 control connections that did not take their answers within 2.0 s" in server.log()


def test_status_and_drain_of_stopped_server_give_up_and_exit_2(server):
    """With the server's process stopped (SIGSTOP), `smartserve status` gives up after its default answer timeout and `smartserve drain` after --answer-timeout, both with exit 2."""
    server.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        status = run_smartserve("status", "--control", server.control, timeout=30)
        status_seconds = time.monotonic() - started
        drain = run_smartserve("drain", "--control", server.control, "--answer-timeout", "1", timeout=30)
    finally:
        server.process.send_signal(signal.SIGCONT)
    assert status.returncode == 2, status.stdout + status.stderr
    assert f"no answer from the server on {server.control} within 10 s" in status.stderr
    assert 10 <= status_seconds < 25
    assert drain.returncode == 2, drain.stdout + drain.stderr
    assert f"no answer from the server on {server.control} within 1 s" in drain.stderr
    # The drain request was written before the command gave up: the server reads it once it runs again.
    assert server.wait_exit(30) == 0


@pytest.fixture
def other_programs_socket(tmp_path):
    """A UNIX socket served by something else: it answers each connection with an HTTP error and closes."""
    import threading

    path = tmp_path / "other.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    stop = threading.Event()

    def answer():
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    yield path
    stop.set()
    listener.close()
    thread.join(10)


@pytest.mark.parametrize("command", ["status", "drain"])
def test_control_commands_on_another_programs_socket_say_so_and_exit_2(other_programs_socket, command):
    """Pointed at a socket that does not speak the control protocol, status and drain say so in one line.

    Found wrong: status printed a traceback and drain 'lost contact with the server:' and nothing more.
    """
    done = run_smartserve(command, "--control", other_programs_socket)
    assert done.returncode == 2, done.stderr
    assert f"what answers on {other_programs_socket} is not a smartserve control socket" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1


def test_control_command_on_a_path_that_is_not_a_socket_says_so(tmp_path):
    """A regular file given as --control is named as not a socket, not as a server that is not running."""
    regular = tmp_path / "control.sock"
    regular.write_text("")
    done = run_smartserve("status", "--control", regular)
    assert done.returncode == 2
    assert f"{regular} is not a socket (is --control the server's control socket?)" in done.stderr


def test_status_into_a_pipe_nobody_reads_exits_141_quietly(server):
    """`smartserve status | head -0`: the closed pipe ends the command as SIGPIPE would, with no traceback."""
    import os
    import subprocess

    from .conftest import SMARTSERVE

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [SMARTSERVE, "status", "--control", server.control], stdout=write_end, stderr=subprocess.PIPE, timeout=60
        )
    finally:
        os.close(write_end)
    assert done.returncode == 141 and done.stderr == b""

"""bin/rolling-restart replaces a running server while a connection loop runs."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from support import VENV_BIN, free_port, wait_for

from .conftest import ConnectionLoop, ServerProcess, server_status
from .test_takeover import assert_serves, wait_taken_back

pytestmark = pytest.mark.timeout(120)

ROLLING_RESTART = Path(__file__).resolve().parents[2] / "bin" / "rolling-restart"


def run_rolling_restart(*args, **environment) -> subprocess.CompletedProcess:
    """Run bin/rolling-restart with the test environment's twistd and smartserve on PATH, and ``environment`` added."""
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", **environment)
    return subprocess.run(
        [str(ROLLING_RESTART), *map(str, args)], capture_output=True, text=True, timeout=90, env=env
    )


def test_rolling_restart_replaces_server_without_losing_connections(tmp_path, connection_loop):
    """rolling-restart starts a new server on the old one's sockets, waits for the old one to exit, and no connection fails."""
    data = tmp_path / "data"
    port = free_port()
    options = ["--bzr", f"tcp:{port}:interface=127.0.0.1", "--ssh", "none"]
    options_file = tmp_path / "smartserve.options"
    options_file.write_text("# the server's options\n" + " ".join(options) + "\n")
    old = ServerProcess(data, options, name="old").start()
    new_pid = None
    try:
        loop = connection_loop(port)
        loop.wait_for_attempts(30)
        done = run_rolling_restart("--data", data, "--options-file", options_file, "--log", tmp_path / "new.log")
        assert done.returncode == 0, done.stdout + done.stderr
        assert old.process.poll() is not None
        status = server_status(old)
        new_pid = status["pid"]
        assert new_pid != old.pid and status["state"] == "serving"
        loop.wait_for_attempts(len(loop.attempts) + 30)
        attempts = loop.stop()
    finally:
        old.stop()
        if new_pid is not None:
            os.kill(new_pid, signal.SIGTERM)
            wait_for(lambda: not Path(f"/proc/{new_pid}").exists(), 30, "the new server to exit")
    assert f"old server: pid {old.pid}" in done.stdout
    assert f"old server (pid {old.pid}) drained and exited; pid {new_pid} serves" in done.stdout
    assert ConnectionLoop.failures(attempts) == []
    assert "(taken over)" in (tmp_path / "new.log").read_text()


def test_rolling_restart_no_server_exits_2(tmp_path):
    """With no server on the control socket, rolling-restart says so and exits 2 without starting one."""
    done = run_rolling_restart("--data", tmp_path / "data", "--", "--bzr", "tcp:0", "--ssh", "none")
    assert done.returncode == 2
    assert "no server answers" in done.stderr
    assert not (tmp_path / "data" / "smartserve.log").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--start-timeout", "abc"], "--start-timeout: not a number of seconds: abc"),
        (["--exit-timeout", "10s"], "--exit-timeout: not a number of seconds: 10s"),
        (["--data"], "usage: rolling-restart"),
    ],
)
def test_rolling_restart_bad_value_exits_1_before_touching_the_server(tmp_path, args, message):
    """A bad timeout or an option without its value is a usage error found before anything starts.

    Found wrong: ``--start-timeout abc`` was read only after the new server
    had taken over, and the script died unsupervised with exit status 1.
    """
    data = tmp_path / "data"
    old = ServerProcess(data, ["--bzr", "tcp:0:interface=127.0.0.1", "--ssh", "none"], name="old").start()
    try:
        done = run_rolling_restart(*(["--data", data] if args != ["--data"] else []), *args)
        assert done.returncode == 1, done.stdout + done.stderr
        assert message in done.stderr
        assert "new server" not in done.stdout
        assert server_status(old)["pid"] == old.pid
    finally:
        old.stop()


def test_rolling_restart_options_file_keeps_a_quoted_word_whole(tmp_path):
    """A quoted path with a space in the options file reaches the new server as one word, quotes removed.

    Found wrong: the quotes stayed in the word and the space split it, so
    the new server could not read its access file and the restart failed.
    """
    data = tmp_path / "data"
    access = tmp_path / "with space" / "access"
    access.parent.mkdir()
    access.write_text("# no rights beyond the defaults\n")
    port = free_port()
    options = ["--bzr", f"tcp:{port}:interface=127.0.0.1", "--ssh", "none", "--access", str(access)]
    options_file = tmp_path / "smartserve.options"
    options_file.write_text(f'--bzr tcp:{port}:interface=127.0.0.1 --ssh none --access "{access}"  # quoted\n')
    old = ServerProcess(data, options, name="old").start()
    new_pid = None
    try:
        done = run_rolling_restart("--data", data, "--options-file", options_file, "--log", tmp_path / "new.log")
        assert done.returncode == 0, done.stdout + done.stderr
        new_pid = server_status(old)["pid"]
        assert new_pid != old.pid
    finally:
        old.stop()
        if new_pid is not None:
            os.kill(new_pid, signal.SIGTERM)
            wait_for(lambda: not Path(f"/proc/{new_pid}").exists(), 30, "the new server to exit")


def test_rolling_restart_bad_options_exits_3(tmp_path):
    """When the new server cannot start (bad options), rolling-restart exits 3 and the old one keeps serving."""
    data = tmp_path / "data"
    old = ServerProcess(data, ["--bzr", "tcp:0:interface=127.0.0.1", "--ssh", "none"], name="old").start()
    try:
        done = run_rolling_restart("--data", data, "--", "--no-such-option")
        assert done.returncode == 3, done.stdout + done.stderr
        assert "the new server exited while starting" in done.stderr
        assert server_status(old)["pid"] == old.pid
    finally:
        old.stop()


def test_rolling_restart_new_server_cannot_listen_old_one_serves_on(tmp_path):
    """When the new server took the sockets but cannot listen on a port of its own (its --admin port is taken), rolling-restart exits 3 and the old server accepts again and answers on its control socket."""
    data = tmp_path / "data"
    old = ServerProcess(data, ["--bzr", "tcp:0:interface=127.0.0.1", "--ssh", "none"], name="old").start()
    taken = socket.create_server(("127.0.0.1", 0))
    admin = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
    try:
        done = run_rolling_restart(
            "--data", data, "--log", tmp_path / "new.log",
            "--", "--bzr", f"tcp:{old.port}:interface=127.0.0.1", "--ssh", "none", "--admin", admin,
        )  # fmt: skip
        assert done.returncode == 3, done.stdout + done.stderr
        assert "the new server exited while starting" in done.stderr
        new_log = (tmp_path / "new.log").read_text()
        assert "(taken over)" in new_log and "could not start" in new_log
        wait_taken_back(old)
        assert_serves(old)
    finally:
        taken.close()
        old.stop()


# Stands for a new server that took the control socket over and then got
# stuck: it listens on the socket and never answers.
STUCK_TWISTD = """#!{python}
import os, socket, sys, time
control = sys.argv[sys.argv.index("--takeover") + 1]
os.unlink(control)
listener = socket.socket(socket.AF_UNIX)
listener.bind(control)
listener.listen()
time.sleep(60)
"""


@contextmanager
def restarted_onto(tmp_path, stand_in: str):
    """rolling-restart with --start-timeout 3 of a new server onto the ``twistd`` script ``stand_in``.

    Yields (the old server, rolling-restart's result, the stand-in's pid);
    the stand-in is killed and the old server stopped on the way out.
    """
    old = ServerProcess(tmp_path / "data", ["--bzr", "tcp:0:interface=127.0.0.1", "--ssh", "none"], name="old").start()
    twistd = tmp_path / "stuck-twistd"
    twistd.write_text(stand_in.format(python=sys.executable))
    twistd.chmod(0o755)
    new_pid = None
    try:
        done = run_rolling_restart("--data", old.data, "--start-timeout", "3", "--", "--bzr", "tcp:0", TWISTD=str(twistd))
        new_pid = int(re.search(r"new server: pid (\d+)", done.stdout).group(1))
        yield old, done, new_pid
    finally:
        if new_pid is not None:
            try:
                os.kill(new_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # stopped by rolling-restart
        old.stop()


def test_rolling_restart_stuck_new_server_exits_3_at_start_timeout(tmp_path):
    """A new server that holds the control socket without answering makes rolling-restart exit 3 once --start-timeout has passed, not wait for good."""
    with restarted_onto(tmp_path, STUCK_TWISTD) as (old, done, new_pid):
        assert done.returncode == 3, done.stdout + done.stderr
        assert f"the new server (pid {new_pid}) did not answer on {old.control} within 3 s" in done.stderr


# Stands for a new server that took the listening sockets over and then got
# stuck before asking the old one to drain: it holds the hand-over and a
# control socket of its own, and answers nothing.
STUCK_AFTER_TAKEOVER = """#!{python}
import socket, sys, time
from twisted.internet import defer, task
from smartserve.control.client import connect, take_over
control = sys.argv[sys.argv.index("--takeover") + 1]
async def main(reactor):
    protocol = await connect(reactor, control)
    await take_over(protocol)
    listener = socket.socket(socket.AF_UNIX)
    for _ in range(100):  # the old process removes its socket file as it hands over
        try:
            listener.bind(control)
            break
        except OSError:
            time.sleep(0.05)
    listener.listen()
    await defer.Deferred()
task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
"""


def test_rolling_restart_stops_a_new_server_stuck_after_taking_over(tmp_path):
    """A new server stuck after taking the sockets is stopped at --start-timeout, and the old one takes them back and serves on."""
    with restarted_onto(tmp_path, STUCK_AFTER_TAKEOVER) as (old, done, new_pid):
        assert done.returncode == 3, done.stdout + done.stderr
        assert f"stopped it, so the old server (pid {old.pid}) takes its sockets back" in done.stderr
        wait_taken_back(old)
        assert_serves(old)

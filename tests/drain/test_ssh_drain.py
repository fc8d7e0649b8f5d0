"""Drain over SSH with the real OpenSSH client: an idle session ends with exit status 75."""

from __future__ import annotations

import shutil
import signal
import subprocess
from contextlib import contextmanager

import pytest

from smartserve.testing import RawClient

from support import make_key_pair, wait_for

from .conftest import ServerProcess, needs_openssh, run_smartserve, server_status, ssh_serve_argv

pytestmark = [needs_openssh, pytest.mark.timeout(60)]

EX_TEMPFAIL = 75
SIZE = 8 * 1024 * 1024


@pytest.fixture
def ssh_server(tmp_path):
    """A server on SSH only, on a free port, where the key ``tmp_path/id_ed25519`` logs in as alice."""
    key = make_key_pair(tmp_path / "id_ed25519", comment="alice")
    data = tmp_path / "data"
    (data / "keys").mkdir(parents=True)
    shutil.copy(key.with_suffix(".pub"), data / "keys" / "alice.pub")
    server = ServerProcess(data, ["--ssh", "tcp:0:interface=127.0.0.1"]).start()
    port = server.listening["ssh"]
    host_key = (data / "ssh_host_ed25519_key.pub").read_text().split()
    (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    server.ssh_key = key
    yield server
    server.stop()


def start_smart_session(server: ServerProcess) -> subprocess.Popen:
    """Run ``bzr serve --inet`` through the real ssh, with its stdin and stdout as pipes."""
    argv = ssh_serve_argv(server.ssh_key, server.data.parent / "known_hosts", server.listening["ssh"])
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_ssh_idle_session_exits_75_on_drain(ssh_server):
    """An idle bzr+ssh session is closed by a drain with exit status 75, and the server then exits."""
    session = start_smart_session(ssh_server)
    try:
        client = RawClient.over_pipes(session.stdin, session.stdout)
        assert client.call(b"hello").args == (b"ok", b"2")
        ssh_server.process.send_signal(signal.SIGHUP)
        assert session.wait(timeout=10) == EX_TEMPFAIL, session.stderr.read()
    finally:
        if session.poll() is None:
            session.kill()
        session.wait()
    assert ssh_server.wait_exit(30) == 0


@contextmanager
def _busy_session(ssh_server):
    """A smart session whose big response is being written, unread: (the ssh process, its client); killed if left running."""
    (ssh_server.data / "branches" / "big.bin").write_bytes(b"\x5a" * SIZE)
    session = start_smart_session(ssh_server)
    try:
        client = RawClient.over_pipes(session.stdin, session.stdout)
        assert client.call(b"hello").args == (b"ok", b"2")
        client.send_request([b"get", b"big.bin"])
        # Unread, the response fills the pipe and the SSH window: the request stays busy.
        wait_for(lambda: server_status(ssh_server)["busy"] == 1, 10, "the request to run")
        yield session, client
    finally:
        if session.poll() is None:
            session.kill()
        session.wait()


def test_ssh_busy_session_finishes_then_exits_75(ssh_server):
    """A session whose request is running when the drain starts gets its whole response, then exit status 75."""
    with _busy_session(ssh_server) as (session, client):
        ssh_server.process.send_signal(signal.SIGHUP)
        reply = client.read_reply()
        assert reply.body == b"\x5a" * SIZE
        assert session.wait(timeout=10) == EX_TEMPFAIL, session.stderr.read()


def test_ssh_busy_session_counted_once_in_status_and_at_the_deadline(ssh_server):
    """One bzr+ssh client with a busy session is one connection in `smartserve status`, and the drain deadline aborts and counts it once."""
    with _busy_session(ssh_server) as (session, client):
        status = server_status(ssh_server)
        assert (status["connections"], status["busy"]) == (1, 1)
        done = run_smartserve("drain", "--control", ssh_server.control, "--timeout", "1")
        assert done.returncode == 1, done.stdout + done.stderr
        assert "draining: 1 connections open, 1 busy" in done.stdout
        assert "timed out: aborted 1 connections still busy" in done.stderr
        assert ssh_server.wait_exit(30) == 0
    log = ssh_server.log()
    assert "Draining: 1 connections open, 1 busy" in log
    assert "Drain deadline passed: aborted 1 connections" in log

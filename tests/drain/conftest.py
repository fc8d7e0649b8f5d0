"""Fixtures for drain and deploy tests: named server processes, the CLI, a connection loop."""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Dict, List

import pytest

from support import VENV_BIN, SmartserveProcess, TcpRelay, wait_for
from smartserve.testing import RawClient, response_args

SMARTSERVE = str(VENV_BIN / "smartserve")



class ServerProcess(SmartserveProcess):
    """A smartserve process with its own log and access log, which several processes may share a data folder with.

    With ``access_log="-"`` the access lines go to its twistd log, in order with everything else it logs.
    """

    def __init__(self, data: Path, extra_args=(), *, name: str = "server", access_log: str = ""):
        super().__init__(data, extra_args)
        self.name = name
        self.log_path = data.parent / f"{name}.log"
        self.access_path = self.log_path if access_log == "-" else data.parent / f"{name}-access.log"
        self.args.append(f"--access-log={access_log or self.access_path}")
        self.args = [f"--logfile={self.log_path}" if a.startswith("--logfile=") else a for a in self.args]

    @property
    def control(self) -> Path:
        """The control socket's path."""
        return self.data / "control.sock"

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_exit(self, timeout: float = 30) -> int:
        """Wait for the process to exit on its own; returns its exit status."""
        return self.process.wait(timeout=timeout)


def run_smartserve(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the ``smartserve`` command and return the finished process."""
    return subprocess.run([SMARTSERVE, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def start_smartserve_command(*args) -> subprocess.Popen:
    """Start the ``smartserve`` command without waiting for it (text pipes for its output)."""
    return subprocess.Popen(
        [SMARTSERVE, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def said_draining(data: bytes) -> bool:
    """Whether ``data``, all a bzr:// connection got after its last answer, is the drain's ServerDraining and no more."""
    return response_args(data) == [(b"ServerDraining", b"the server is draining: connect again")]


def server_status(server: ServerProcess) -> dict:
    """The server's answer to `smartserve status --json`."""
    done = run_smartserve("status", "--control", server.control, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


class ControlConnection:
    """A blocking connection to a server's control socket that writes and reads AMP boxes by hand.

    It can do what the ``smartserve`` command never does: send arguments
    the command would refuse, leave in the middle of a hand-over, or never
    read its answers.
    """

    def __init__(self, path: Path, timeout: float = 30):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._asked = 0
        self._buffer = b""

    @staticmethod
    def box(fields: Dict[str, bytes]) -> bytes:
        """One AMP box: each key and value with its 16-bit length, then an empty key."""
        out = b""
        for key, value in fields.items():
            out += struct.pack("!H", len(key)) + key.encode("ascii") + struct.pack("!H", len(value)) + value
        return out + b"\x00\x00"

    def ask(self, command: str, **arguments: bytes) -> bytes:
        """The bytes of one command asking for an answer, with a new ``_ask`` tag."""
        self._asked += 1
        return self.box({"_command": command.encode("ascii"), "_ask": str(self._asked).encode("ascii"), **arguments})

    def send(self, command: str, **arguments: bytes) -> None:
        """Send one command without waiting for its answer."""
        self.sock.sendall(self.ask(command, **arguments))

    def read_box(self) -> Dict[str, bytes]:
        """The next box the server sent."""
        fields = {}
        while True:
            key = self._read(struct.unpack("!H", self._read(2))[0])
            if not key:
                return fields
            fields[key.decode("ascii")] = self._read(struct.unpack("!H", self._read(2))[0])

    def call(self, command: str, **arguments: bytes) -> Dict[str, bytes]:
        """Send one command and return its answer or error box."""
        self.send(command, **arguments)
        return self.read_box()

    def close(self) -> None:
        self.sock.close()

    def _read(self, size: int) -> bytes:
        while len(self._buffer) < size:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the control connection")
            self._buffer += data
        out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out


@dataclasses.dataclass
class Attempt:
    """One connection made by ``ConnectionLoop``: when, from which port, and how it ended."""

    started: float
    source_port: int
    outcome: str


class ConnectionLoop(threading.Thread):
    """Makes new connections to ``port``, one ``hello`` round trip each, until stopped.

    Outcomes are ``ok``, ``refused``, ``reset`` (the connection ended before
    the response did) or ``error: ...``. At most ``limit`` connections are
    made, ``pace`` seconds apart at least.
    """

    def __init__(self, port: int, *, limit: int = 3000, pace: float = 0.005):
        super().__init__(daemon=True)
        self.port = port
        self.limit = limit
        self.pace = pace
        self.attempts: List[Attempt] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set() and len(self.attempts) < self.limit:
            self.attempts.append(self._one())
            self._stop_event.wait(self.pace)

    def _one(self) -> Attempt:
        started = time.monotonic()
        source_port = 0
        try:
            client = RawClient.connect("127.0.0.1", self.port, timeout=10)
        except ConnectionRefusedError:
            return Attempt(started, source_port, "refused")
        try:
            source_port = client.sock.getsockname()[1]
            reply = client.call(b"hello")
            outcome = "ok" if reply.args == (b"ok", b"2") else f"error: {reply.args!r}"
        except (ConnectionError, OSError) as exc:
            outcome = "reset" if isinstance(exc, ConnectionError) or exc.errno == errno.EPIPE else f"error: {exc!r}"
        finally:
            client.close()
        return Attempt(started, source_port, outcome)

    def wait_for_attempts(self, count: int, timeout: float = 30) -> None:
        """Block until at least ``count`` connections were made."""
        wait_for(lambda: len(self.attempts) >= count, timeout, f"{count} connections")

    def stop(self) -> List[Attempt]:
        """Stop making connections and return every attempt."""
        self._stop_event.set()
        self.join(timeout=30)
        return self.attempts

    @staticmethod
    def failures(attempts: List[Attempt]) -> List[Attempt]:
        """The attempts that did not get their answer."""
        return [attempt for attempt in attempts if attempt.outcome != "ok"]


class GatedRelay(TcpRelay):
    """A relay to ``target_port`` that can hold a response in flight.

    On the first connection, once ``hold_after`` bytes came from the server,
    the relay stops reading from the server (so the server's writes back up
    and its request stays busy) until ``release`` is called. Later
    connections are relayed freely. ``holding`` is set once it holds.
    """

    def __init__(self, target_port: int, hold_after: int):
        self.hold_after = hold_after
        self.holding = threading.Event()
        self._released = threading.Event()
        self._from_server = 0
        super().__init__(target_port, server_receive_buffer=65536)

    def passes(self, data: bytes, to_server: bool, connection: int) -> bool:
        if not to_server and connection == 0:
            self._from_server += len(data)
            if self._from_server >= self.hold_after and not self._released.is_set():
                self.holding.set()
                self._released.wait(120)
        return True

    def release(self) -> None:
        """Let the held response flow again."""
        self._released.set()

    def close(self) -> None:
        self._released.set()
        super().close()


SSH = shutil.which("ssh")
SSH_KEYGEN = shutil.which("ssh-keygen")

needs_openssh = pytest.mark.skipif(
    SSH is None or SSH_KEYGEN is None, reason="the OpenSSH client is not installed"
)


def ssh_serve_argv(key: Path, known_hosts: Path, port: int, user: str = "alice") -> List[str]:
    """The real ``ssh`` running ``bzr serve --inet`` on 127.0.0.1:``port``, as bzr+ssh:// does."""
    return [
        SSH, "-F", "/dev/null", "-i", str(key),
        "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
        "-p", str(port), f"{user}@127.0.0.1",
        "bzr", "serve", "--inet", "--directory=/", "--allow-writes",
    ]  # fmt: skip


@pytest.fixture
def connection_loop():
    """Start ``ConnectionLoop``s with ``connection_loop(port)``; each is stopped at the end."""
    loops = []

    def start(port: int, **options) -> ConnectionLoop:
        loop = ConnectionLoop(port, **options)
        loop.start()
        loops.append(loop)
        return loop

    yield start
    for loop in loops:
        loop.stop()


def build_big_branch(path: Path, revisions: int, file_size: int) -> None:
    """Create a 2a branch at ``path`` with ``revisions`` commits, each rewriting four files of ``file_size`` random bytes in all."""
    script = textwrap.dedent(
        f"""
        import os
        import breezy
        from breezy import controldir
        from breezy.bzr import bzrdir  # registers the default format
        breezy.initialize()
        tree = controldir.ControlDir.create_standalone_workingtree({str(path)!r})
        with tree.lock_write():
            for number in range({revisions}):
                for index in range(4):
                    with open(os.path.join({str(path)!r}, f"file{{index}}"), "wb") as out:
                        out.write(os.urandom({file_size} // 4))
                if number == 0:
                    tree.smart_add([{str(path)!r}])
                tree.commit(f"revision {{number}}", committer="Test <test@example.com>")
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300, capture_output=True)


@pytest.fixture(scope="session")
def big_branch(tmp_path_factory) -> Path:
    """A local branch of 6 revisions whose stream is about 12 MB (built once per session)."""
    path = tmp_path_factory.mktemp("big") / "big"
    build_big_branch(path, revisions=6, file_size=2 * 1024 * 1024)
    return path

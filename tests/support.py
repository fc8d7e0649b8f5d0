"""Helpers shared by the test suite: real `brz` runs, a real smartserve process, waiting on conditions.

Import them as ``from support import ...``: the test folders each have a
``conftest.py``, so ``conftest`` names a different module in each.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from smartserve.testing import with_systemd_socket

VENV_BIN = Path(sys.executable).parent
BRZ = str(VENV_BIN / "brz")
TWISTD = str(VENV_BIN / "twistd")

_LISTENER = re.compile(r"\[smartserve\.listeners#info\] (\w+) listening on IPv[46]Address\(.*?port=(\d+)")
# The control socket is the last thing a server starts listening on.
_CONTROL_READY = "[smartserve.listeners#info] control listening on"
# A line of DATA/access.log: a timestamp, then what RequestRecord.emit renders
# (with the namespace between them when access lines go to the twistd log).
_ACCESS = re.compile(
    r"^\S+ (?:\[smartserve\.access#info\] )?(?P<peer>\S+) (?P<user>\S+) (?P<verb>\S+) (?P<verb_class>\S+) "
    r"(?P<outcome>\S+) \S+ in=\d+ out=\d+ conn=(?P<conn>\d+)$",
    re.MULTILINE,
)


def brz_env(home: Path) -> dict:
    """The environment for running `brz` with a private home folder (created if missing)."""
    home.mkdir(parents=True, exist_ok=True)
    return dict(
        os.environ,
        HOME=str(home),
        BRZ_HOME=str(home),
        BRZ_EMAIL="Test User <test@example.com>",
        BRZ_LOG=str(home / "brz.log"),
        BRZ_DISABLE_PLUGINS="launchpad",
        PYTHONUNBUFFERED="1",
    )


def make_key_pair(path: Path, kind: str = "ed25519", comment: str = "test") -> Path:
    """Create an unencrypted SSH key pair at ``path`` and ``path.pub`` with ssh-keygen; returns ``path``."""
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", comment, "-f", str(path)], check=True)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout: float, what: str, interval: float = 0.02):
    """Poll ``condition`` until it returns a true value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def logged_events(match):
    """The events of the global log for which ``match(event)`` is true, collected while the block runs."""
    from twisted.logger import globalLogPublisher

    events: list = []

    def observe(event):
        if match(event):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observe)


async def wait_until(condition, timeout: float, what: str, interval: float = 0.02) -> None:
    """Like ``wait_for``, for a condition the reactor must run to make true: polls without blocking it."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        await deferLater(reactor, interval)


class Brz:
    """Runs the real `brz` command with a private home folder."""

    def __init__(self, home: Path):
        self.home = home
        self.env = brz_env(home)

    def run(self, *args, cwd=None, check=True, timeout=120) -> subprocess.CompletedProcess:
        """Run ``brz args`` and return the finished process; raise on failure when ``check``."""
        proc = subprocess.run(
            [BRZ, *map(str, args)], cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"brz {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def popen(self, *args, cwd=None) -> subprocess.Popen:
        """Start ``brz args`` without waiting for it."""
        return subprocess.Popen(
            [BRZ, *map(str, args)], cwd=cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def make_branch(self, path: Path, revisions: int, files: int = 3) -> Path:
        """Create a local branch at ``path`` with ``revisions`` commits touching ``files`` files."""
        self.run("init", "-q", path)
        for number in range(revisions):
            for index in range(files):
                (path / f"file{index}.txt").write_text(f"revision {number} of file {index}\n" * (index + 1))
            if number == 0:
                self.run("add", "-q", cwd=path)
            self.run("commit", "-q", "-m", f"revision {number}", cwd=path)
        return path


class SmartserveProcess:
    """A `twistd -n smartserve` process on a private data folder.

    ``listening`` maps listener names (bzr, ssh, admin) to their TCP ports
    once ``start`` returns; ``port`` is the bzr:// one. With ``inherited``,
    a listening socket, the server gets it as systemd passes one (file
    descriptor 3, ``LISTEN_FDS=1``), for ``systemd:domain=INET:index=0``.
    """

    def __init__(self, data: Path, extra_args=(), *, inherited=None):
        self.inherited = inherited
        self.data = data
        self.log_path = data.parent / f"{data.name}.log"
        self.access_path = data / "access.log"
        self.args = [TWISTD, "-n", "--pidfile=", f"--logfile={self.log_path}", "smartserve", "--data", str(data), *extra_args]
        self.name = "smartserve"
        self.process = None
        self.listening = {}
        self.port = None
        self.admin_port = None

    def start(self, timeout: float = 30) -> "SmartserveProcess":
        """Start the server and wait until every listener, the control socket last, listens."""
        self.data.mkdir(parents=True, exist_ok=True)
        argv, pass_fds = self.args, ()
        if self.inherited is not None:
            argv, pass_fds = with_systemd_socket(self.args, self.inherited)
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=pass_fds)

        def ready():
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited early: {self.process.stderr.read().decode()}\n{self.log()}")
            return _CONTROL_READY in self.log()

        wait_for(ready, timeout, f"{self.name} to listen")
        self.listening = {name: int(port) for name, port in _LISTENER.findall(self.log())}
        self.port = self.listening.get("bzr")
        self.admin_port = self.listening.get("admin")
        return self

    @property
    def url(self) -> str:
        """The bzr:// URL of the served root."""
        return f"bzr://127.0.0.1:{self.port}"

    def log(self) -> str:
        """Everything the server has logged so far."""
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    def access_lines(self) -> str:
        """The server's access log file (by default ``DATA/access.log``) so far."""
        try:
            return self.access_path.read_text()
        except FileNotFoundError:
            return ""

    def access_records(self) -> list:
        """One dict (peer, user, verb, verb_class, outcome, conn) per request served so far."""
        return [match.groupdict() for match in _ACCESS.finditer(self.access_lines())]

    def access_log(self) -> list:
        """One (peer, user, verb, verb class, outcome) tuple per request served so far."""
        return [match.groups()[:5] for match in _ACCESS.finditer(self.access_lines())]

    def rss_kib(self) -> int:
        """The server process's resident memory now, in KiB."""
        return self._status_kib("VmRSS")

    def peak_rss_kib(self) -> int:
        """The server process's highest resident memory since it started or since ``reset_peak_rss``, in KiB."""
        return self._status_kib("VmHWM")

    def reset_peak_rss(self) -> None:
        """Make the server process's peak resident memory its resident memory now (Linux ``clear_refs`` 5)."""
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")

    def _status_kib(self, field: str) -> int:
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise AssertionError(f"no {field} in /proc/PID/status")

    def start_expecting_exit(self, timeout: float = 30) -> str:
        """Start a server that must exit before it is ready; return what it said (its stderr, then its log).

        Fails if it gets ready instead; the process is stopped either way.
        """
        try:
            self.start(timeout)
        except AssertionError as exited:
            said = str(exited)
            if " exited early: " not in said:
                raise
            return said.split(" exited early: ", 1)[1]
        finally:
            self.stop()
        raise AssertionError(f"{self.name} got ready, and was expected to exit")

    def stop(self) -> None:
        """Stop the server and wait for it to exit."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class TcpRelay:
    """A TCP relay on 127.0.0.1 to ``target_port``, a thread per direction of each connection.

    Subclasses decide the fate of each chunk in ``passes``: it may block,
    and returning False closes that connection's both sides instead of
    forwarding the chunk. ``server_receive_buffer`` shrinks the relay's
    receive buffer towards the server, so that holding a chunk backs the
    server up sooner.
    """

    def __init__(self, target_port: int, *, server_receive_buffer: int = 0):
        self.target_port = target_port
        self._server_receive_buffer = server_receive_buffer
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets = []
        self._connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def passes(self, data: bytes, to_server: bool, connection: int) -> bool:
        """Whether to forward ``data`` (from the client if ``to_server``) on the ``connection``-th connection."""
        return True

    def close(self) -> None:
        """Stop relaying and close every socket."""
        for sock in [self._listener, *self._sockets]:
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.socket()
            if self._server_receive_buffer:
                server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._server_receive_buffer)
            server.connect(("127.0.0.1", self.target_port))
            self._sockets += [client, server]
            connection, self._connections = self._connections, self._connections + 1
            threading.Thread(target=self._pipe, args=(client, server, True, connection), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False, connection), daemon=True).start()

    def _pipe(self, source: socket.socket, destination: socket.socket, to_server: bool, connection: int) -> None:
        try:
            while (data := source.recv(65536)) and self.passes(data, to_server, connection):
                destination.sendall(data)
        except OSError:
            pass
        for sock in (source, destination):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def recording_client():
    """A Twisted client protocol that keeps what it receives in ``received`` and sets ``closed`` when its connection ends."""
    from twisted.internet.protocol import Protocol

    class RecordingClient(Protocol):
        def __init__(self):
            self.received = b""
            self.closed = False

        def dataReceived(self, data):
            self.received += data

        def connectionLost(self, reason=None):
            self.closed = True

    return RecordingClient()


class StepPool:
    """A worker pool whose jobs run in the test's thread, one at a time, only when the test says so."""

    def __init__(self):
        self.jobs = []

    def callInThreadWithCallback(self, on_result, function, *args, **kwargs):
        self.jobs.append((on_result, function, args, kwargs))

    def run_next(self):
        from twisted.python.failure import Failure

        on_result, function, args, kwargs = self.jobs.pop(0)
        try:
            result = function(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class QueuedReactor:
    """A reactor whose calls from worker threads wait until the test runs them, as on a busy reactor."""

    def __init__(self):
        self.calls = []

    def callFromThread(self, function, *args, **kwargs):
        self.calls.append((function, args, kwargs))

    def run_calls(self):
        while self.calls:
            function, args, kwargs = self.calls.pop(0)
            function(*args, **kwargs)

"""Helpers shared by the test suite: real `brz` runs, a real smartserve process, waiting on conditions.

Import them as ``from support import ...``: the test folders each have a
``conftest.py``, so ``conftest`` names a different module in each.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
BRZ = str(VENV_BIN / "brz")
TWISTD = str(VENV_BIN / "twistd")

_LISTENING = re.compile(r"SmartServerFactory starting on (\d+)")
_ADMIN_LISTENING = re.compile(r"admin listening on .*port=(\d+)")
_ACCESS = re.compile(r"\[smartserve\.access#info\] (\S+) (\S+) (\S+) (\S+) (\S+) ")


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


class Brz:
    """Runs the real `brz` command with a private home folder."""

    def __init__(self, home: Path):
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.env = dict(
            os.environ,
            HOME=str(home),
            BRZ_HOME=str(home),
            BRZ_EMAIL="Test User <test@example.com>",
            BRZ_LOG=str(home / "brz.log"),
            BRZ_DISABLE_PLUGINS="launchpad",
        )

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
    """A `twistd -n smartserve` process on a private data folder."""

    def __init__(self, data: Path, extra_args=()):
        self.data = data
        self.log_path = data.parent / f"{data.name}.log"
        self.args = [TWISTD, "-n", "--pidfile=", f"--logfile={self.log_path}", "smartserve", "--data", str(data), *extra_args]
        self.process = None
        self.port = None
        self.admin_port = None

    def start(self, timeout: float = 30) -> "SmartserveProcess":
        """Start the server and wait until it listens."""
        self.data.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def listening():
            if self.process.poll() is not None:
                raise AssertionError(f"smartserve exited early: {self.process.stderr.read().decode()}\n{self.log()}")
            match = _LISTENING.search(self.log())
            return match and int(match.group(1))

        self.port = wait_for(listening, timeout, "smartserve to listen")
        if "--admin" in self.args:
            admin = lambda: (match := _ADMIN_LISTENING.search(self.log())) and int(match.group(1))
            self.admin_port = wait_for(admin, timeout, "the admin endpoint to listen")
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

    def access_log(self) -> list:
        """One (peer, user, verb, verb class, outcome) tuple per request served so far."""
        return [match.groups() for match in _ACCESS.finditer(self.log())]

    def stop(self) -> None:
        """Stop the server and wait for it to exit."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

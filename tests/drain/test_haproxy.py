"""Two smartserve backends behind the real haproxy: draining one loses no connection.

haproxy checks each backend's ``/health`` every 100 ms and sends PROXY
protocol v2 to backends listening on ``haproxy:`` endpoints.
"""

from __future__ import annotations

import csv
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from support import wait_for

from .conftest import ConnectionLoop, ServerProcess, free_port, start_smartserve_command

HAPROXY = shutil.which("haproxy") or (shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin"))

pytestmark = [
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy)"),
    pytest.mark.timeout(90),
]

GRACE = 1.5

CONFIG = """\
global
    stats socket {stats} mode 600 level admin

defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    # A check answered later than this marks the backend down; without it
    # the limit is `inter` (100 ms), too tight on a busy test machine.
    timeout check 2s

frontend bzr
    bind 127.0.0.1:{front}
    default_backend smartserve

backend smartserve
    balance roundrobin
    option httpchk GET /health
    default-server inter 100ms fall 1 rise 1 send-proxy-v2
    server a 127.0.0.1:{a_bzr} check port {a_admin}
    server b 127.0.0.1:{b_bzr} check port {b_admin}
"""


class HAProxy:
    """A foreground haproxy process with an admin stats socket."""

    def __init__(self, folder: Path, **ports):
        self.stats = folder / "haproxy.sock"
        self.config = folder / "haproxy.cfg"
        self.front = free_port()
        self.config.write_text(CONFIG.format(stats=self.stats, front=self.front, **ports))
        self.process = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(self.config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

    def server_states(self) -> dict:
        """``{server name: status}`` from haproxy's ``show stat``, such as ``UP`` or ``DOWN``."""
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(self.stats))
                sock.sendall(b"show stat\n")
                text = b"".join(iter(lambda: sock.recv(65536), b"")).decode()
        except (FileNotFoundError, ConnectionRefusedError):
            return {}
        rows = csv.DictReader(text.lstrip("# ").splitlines())
        return {row["svname"]: row["status"] for row in rows if row["pxname"] == "smartserve"}

    def stop(self) -> str:
        """Stop haproxy and return what it printed."""
        if self.process.poll() is None:
            self.process.terminate()
        out, _ = self.process.communicate(timeout=10)
        return out.decode(errors="replace")


def health(port: int) -> int:
    """The status of ``GET /health`` on ``port``."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def backend(tmp_path: Path, name: str) -> ServerProcess:
    options = [
        "--bzr", "haproxy:tcp:0:interface=127.0.0.1", "--admin", "tcp:0:interface=127.0.0.1",
        "--ssh", "none", "--drain-grace", str(GRACE), "--drain-timeout", "30",
    ]  # fmt: skip
    return ServerProcess(tmp_path / f"data-{name}", options, name=name).start()


def test_haproxy_drain_one_backend_loses_no_connection(tmp_path, connection_loop):
    """Draining backend a behind haproxy: no connection fails, none lands on a after haproxy saw it down, logs show real client ports."""
    a, b = backend(tmp_path, "a"), backend(tmp_path, "b")
    proxy = HAProxy(
        tmp_path,
        a_bzr=a.listening["bzr"], a_admin=a.listening["admin"],
        b_bzr=b.listening["bzr"], b_admin=b.listening["admin"],
    )  # fmt: skip
    try:
        wait_for(lambda: proxy.server_states() == {"a": "UP", "b": "UP", "BACKEND": "UP"}, 20, "both backends UP")
        loop = connection_loop(proxy.front)
        loop.wait_for_attempts(50)
        draining = start_smartserve_command("drain", "--control", a.control)
        wait_for(lambda: health(a.listening["admin"]) == 503, 20, "a's health to flip")
        flipped = time.monotonic()
        wait_for(lambda: proxy.server_states().get("a") == "DOWN", 10, "haproxy to mark a down")
        down = time.monotonic()
        out, err = draining.communicate(timeout=60)
        assert draining.returncode == 0, out + err
        assert a.wait_exit(30) == 0
        count = len(loop.attempts)
        loop.wait_for_attempts(count + 50)
        attempts = loop.stop()
    finally:
        proxy_output = proxy.stop()
        a.stop()
        b.stop()
    assert ConnectionLoop.failures(attempts) == [], proxy_output
    assert down - flipped < GRACE, "haproxy noticed the flip only after the listeners closed"
    on_a = {int(record["peer"].rsplit(":", 1)[1]) for record in a.access_records()}
    on_b = {int(record["peer"].rsplit(":", 1)[1]) for record in b.access_records()}
    client_ports = {attempt.source_port for attempt in attempts}
    assert on_a and on_b
    assert on_a | on_b == client_ports, "the backends' logs do not show the clients' own addresses"
    assert all(record["peer"].startswith("127.0.0.1:") for record in a.access_records())
    late = {attempt.source_port for attempt in attempts if attempt.started > down}
    assert late and not late & on_a, "a connection reached a after haproxy marked it down"

"""Two smartserve backends behind the real haproxy: draining one loses no connection.

haproxy checks each backend's ``/health`` every 100 ms and sends PROXY
protocol v2 to backends listening on ``haproxy:`` endpoints.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from support import free_port, make_key_pair, wait_for

from smartserve.testing import RawClient

from .conftest import (
    Attempt,
    ConnectionLoop,
    ServerProcess,
    needs_openssh,
    ssh_serve_argv,
    start_smartserve_command,
)

HAPROXY = shutil.which("haproxy") or (shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin"))

pytestmark = [
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy)"),
    pytest.mark.timeout(120),
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
    # rise 2, as doc/operator.md's configuration: one good check does not bring a server back.
    default-server inter 100ms fall 1 rise 2 send-proxy-v2
    # As doc/operator.md: a connection refused by a backend that has just closed goes to the other.
    option redispatch
    retries 3
    server a 127.0.0.1:{a_port} check port {a_admin}
    server b 127.0.0.1:{b_port} check port {b_admin}
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


def backend(tmp_path: Path, name: str, *listen) -> ServerProcess:
    """A backend listening as ``listen`` says, with /health, a drain grace and a short deadline."""
    options = [
        *listen, "--admin", "tcp:0:interface=127.0.0.1",
        "--drain-grace", str(GRACE), "--drain-timeout", "30",
    ]  # fmt: skip
    return ServerProcess(tmp_path / f"data-{name}", options, name=name).start()


def ports_in(server: ServerProcess) -> set:
    """The client ports in ``server``'s access log."""
    return {int(record["peer"].rsplit(":", 1)[1]) for record in server.access_records()}


def drain_behind_proxy(proxy: HAProxy, a: ServerProcess, loop: ConnectionLoop, settle: int) -> tuple:
    """Drain backend a while ``loop`` runs; returns (health flipped, haproxy saw a down) times."""
    loop.wait_for_attempts(settle)
    draining = start_smartserve_command("drain", "--control", a.control)
    wait_for(lambda: health(a.listening["admin"]) == 503, 20, "a's health to flip")
    flipped = time.monotonic()
    wait_for(lambda: proxy.server_states().get("a") == "DOWN", 10, "haproxy to mark a down")
    down = time.monotonic()
    out, err = draining.communicate(timeout=60)
    assert draining.returncode == 0, out + err
    assert a.wait_exit(30) == 0
    loop.wait_for_attempts(len(loop.attempts) + settle)
    return flipped, down


def check_no_loss(attempts: list, a: ServerProcess, b: ServerProcess, down: float, proxy_output: str) -> None:
    """Every attempt succeeded, each is in one backend's log under the client's own port, most made after ``down`` reached b."""
    assert ConnectionLoop.failures(attempts) == [], proxy_output
    on_a, on_b = ports_in(a), ports_in(b)
    assert on_a and on_b
    assert on_a | on_b == {attempt.source_port for attempt in attempts}, "the logs do not show the clients' own ports"
    assert all(record["peer"].startswith("127.0.0.1:") for record in a.access_records() + b.access_records())
    late = [attempt for attempt in attempts if attempt.started > down]
    assert late
    # haproxy's stats say DOWN before all of it stops choosing the server: on
    # a busy machine connections were seen reaching a up to 1.7 s later, all
    # answered (a still accepts until the grace ends). Most go to b.
    reached_a = [attempt for attempt in late if attempt.source_port in on_a]
    assert len(reached_a) * 5 < len(late), (
        f"{len(reached_a)} of the {len(late)} connections made after haproxy marked a down reached it: "
        + ", ".join(f"{attempt.started - down:.3f} s (port {attempt.source_port})" for attempt in reached_a)
        + "\nhaproxy said:\n" + proxy_output
    )


def test_haproxy_drain_one_backend_loses_no_connection(tmp_path, connection_loop):
    """Draining backend a behind haproxy: no bzr:// connection fails, most go to b once haproxy saw a down, logs show real client ports."""
    listen = ["--bzr", "haproxy:tcp:0:interface=127.0.0.1", "--ssh", "none"]
    a, b = backend(tmp_path, "a", *listen), backend(tmp_path, "b", *listen)
    proxy = HAProxy(
        tmp_path,
        a_port=a.listening["bzr"], a_admin=a.listening["admin"],
        b_port=b.listening["bzr"], b_admin=b.listening["admin"],
    )  # fmt: skip
    try:
        wait_for(lambda: proxy.server_states() == {"a": "UP", "b": "UP", "BACKEND": "UP"}, 20, "both backends UP")
        loop = connection_loop(proxy.front)
        flipped, down = drain_behind_proxy(proxy, a, loop, settle=50)
        attempts = loop.stop()
    finally:
        proxy_output = proxy.stop()
        a.stop()
        b.stop()
    assert down - flipped < GRACE, "haproxy noticed the flip only after the listeners closed"
    check_no_loss(attempts, a, b, down, proxy_output)


class SSHConnectionLoop(ConnectionLoop):
    """Runs real ``ssh`` smart sessions through ``port``: one ``hello`` each, then a clean end."""

    def __init__(self, port: int, key: Path, known_hosts: Path):
        super().__init__(port, limit=200, pace=0)
        self.argv = ssh_serve_argv(key, known_hosts, port)

    def _one(self) -> Attempt:
        started = time.monotonic()
        session = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        source_port = 0
        try:
            client = RawClient.over_pipes(session.stdin, session.stdout)
            reply = client.call(b"hello")
            source_port = _source_port(session.pid, self.port)
            session.stdin.close()
            code = session.wait(timeout=20)
            outcome = "ok" if reply.args == (b"ok", b"2") and code == 0 else f"error: exit {code}"
        except (ConnectionError, OSError) as exc:
            session.kill()
            outcome = f"error: {exc!r}, exit {session.wait()}, {session.stderr.read()!r}"
        return Attempt(started, source_port, outcome)


def _source_port(pid: int, remote_port: int) -> int:
    """The local port of process ``pid``'s TCP connection to ``remote_port``, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[9] in inodes and fields[2].endswith(f":{remote_port:04X}"):
            return int(fields[1].rsplit(":", 1)[1], 16)
    return 0


@needs_openssh
def test_haproxy_drain_one_ssh_backend_loses_no_session(tmp_path):
    """Draining backend a behind haproxy while real bzr+ssh sessions arrive: none fails, most go to b once haproxy saw a down."""
    key = make_key_pair(tmp_path / "id_ed25519", comment="alice")
    host_key = make_key_pair(tmp_path / "host_key", comment="host")
    for name in ("a", "b"):
        (tmp_path / f"data-{name}" / "keys").mkdir(parents=True)
        shutil.copy(key.with_suffix(".pub"), tmp_path / f"data-{name}" / "keys" / "alice.pub")
    listen = ["--ssh", "haproxy:tcp:0:interface=127.0.0.1", "--host-key", str(host_key)]
    a, b = backend(tmp_path, "a", *listen), backend(tmp_path, "b", *listen)
    proxy = HAProxy(
        tmp_path,
        a_port=a.listening["ssh"], a_admin=a.listening["admin"],
        b_port=b.listening["ssh"], b_admin=b.listening["admin"],
    )  # fmt: skip
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{proxy.front} {host_key.with_suffix('.pub').read_text()}")
    loop = SSHConnectionLoop(proxy.front, key, known_hosts)
    try:
        wait_for(lambda: proxy.server_states() == {"a": "UP", "b": "UP", "BACKEND": "UP"}, 20, "both backends UP")
        loop.start()
        flipped, down = drain_behind_proxy(proxy, a, loop, settle=5)
    finally:
        attempts = loop.stop()
        proxy_output = proxy.stop()
        a.stop()
        b.stop()
    check_no_loss(attempts, a, b, down, proxy_output)

"""Serving on IPv6 (::1): real `brz` and OpenSSH connect, and logs write the peer as [::1]:port."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess

import pytest
import pytest_twisted

from smartserve.testing import RawClient
from support import make_key_pair, wait_for, wait_until

pytestmark = pytest.mark.timeout(120)

LOOPBACK6 = r"tcp6:0:interface=\:\:1"


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")


def _serve_ssh_on_ipv6(start_smartserve, tmp_path):
    """smartserve's SSH on [::1] with user alice's new key: (server, port, key file, known_hosts naming [::1]:port)."""
    key = tmp_path / "id_ed25519"
    make_key_pair(key)
    keys = tmp_path / "server-data" / "keys"
    keys.mkdir(parents=True)
    (keys / "alice.pub").write_text(key.with_suffix(".pub").read_text())
    server = start_smartserve("--ssh", LOOPBACK6)
    port = server.listening["ssh"]
    host_key = (server.data / "ssh_host_ed25519_key.pub").read_text().split()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[::1]:{port} {host_key[0]} {host_key[1]}\n")
    return server, port, key, known_hosts


@needs_ipv6
def test_brz_over_bzr_on_ipv6(brz, start_smartserve, tmp_path):
    """A push and a branch over bzr://[::1]:PORT/ work, and the access log names the peer as [::1]:port."""
    server = start_smartserve("--bzr", LOOPBACK6, "--bzr-allow-writes", "--ssh", "none")
    url = f"bzr://[::1]:{server.port}/b"
    local = brz.make_branch(tmp_path / "local", revisions=2)
    brz.run("push", url, cwd=local)
    brz.run("branch", url, tmp_path / "copy")
    assert int(brz.run("revno", tmp_path / "copy").stdout.strip()) == 2
    records = wait_for(server.access_records, 10, "access lines")
    assert {record["peer"].rsplit(":", 1)[0] for record in records} == {"[::1]"}


@needs_ipv6
@pytest.mark.skipif(shutil.which("ssh") is None, reason="the OpenSSH client is not installed")
def test_openssh_session_on_ipv6(start_smartserve, tmp_path):
    """OpenSSH logs in over [::1] and runs a smart session; the session line names the peer as [::1]:port."""
    server, port, key, known_hosts = _serve_ssh_on_ipv6(start_smartserve, tmp_path)
    session = subprocess.Popen(
        [
            "ssh", "-F", "/dev/null", "-i", str(key), "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
            "-p", str(port), "alice@::1", "bzr", "serve", "--inet", "--directory=/", "--allow-writes",
        ],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        client = RawClient.over_pipes(session.stdin, session.stdout)
        assert client.call(b"hello").args == (b"ok", b"2")
        session.stdin.close()
        assert session.wait(timeout=30) == 0, session.stderr.read()
    finally:
        if session.poll() is None:
            session.kill()
        session.wait()
    log = wait_for(lambda: "ended by the server" in server.log() and server.log(), 10, "the session's end line")
    assert re.search(r"alice from \[::1\]:\d+ started a smart session", log)


@needs_ipv6
@pytest_twisted.ensureDeferred
async def test_smartserve_client_over_ssh_on_ipv6(start_smartserve, tmp_path):
    """The client reaches bzr+ssh://user@[::1]:PORT/, checking the host key under OpenSSH's [::1]:port name."""
    from smartserve.client import SmartClient, SSHOptions

    server, port, key, known_hosts = _serve_ssh_on_ipv6(start_smartserve, tmp_path)
    options = SSHOptions(identity_files=[str(key)], known_hosts=str(known_hosts), use_agent=False)
    client = SmartClient.from_url(f"bzr+ssh://alice@[::1]:{port}/", ssh=options)
    try:
        assert (await client.call(b"hello")).args == (b"ok", b"2")
    finally:
        await client.close()
    await wait_until(lambda: "started a smart session" in server.log(), 10, "the session's line")
    assert re.search(r"alice from \[::1\]:\d+ started a smart session", server.log())

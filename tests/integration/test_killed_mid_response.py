"""A server killed with SIGKILL while it makes a branch's revision stream, under an unmodified `brz branch`.

Two smartserve processes serve one folder; a relay sends the first
connection to the first and, once that one is dead, every new one to the
second (as a standby or a restarted server would take them). The relay
kills the first server the moment the first byte of its answer to
``Repository.get_stream`` reaches it.

Held (``--hold-response-bytes``), nothing of that answer leaves the server
before the stream has ended, so the kill cuts no response: `brz` has the
whole stream and goes on against the second server. Sent from its first
slice (the default), the answer's tuple is out before the stream is made,
and `brz` cannot resend a read whose body was cut: the branch fails.
"""

from __future__ import annotations

import os
import signal
import threading

from support import TcpRelay


class _KillingRelay(TcpRelay):
    """Kills ``victim`` at the first byte of its answer to a get_stream, then relays new connections to ``next_port``."""

    def __init__(self, victim, next_port: int):
        self.victim = victim
        self.next_port = next_port
        self.asked_for_stream = threading.Event()
        self.killed = threading.Event()
        super().__init__(victim.port)

    def passes(self, data: bytes, to_server: bool, connection: int) -> bool:
        if to_server and b"Repository.get_stream" in data:
            self.asked_for_stream.set()
        elif not to_server and self.asked_for_stream.is_set() and not self.killed.is_set():
            os.kill(self.victim.process.pid, signal.SIGKILL)
            self.victim.process.wait(30)
            self.target_port = self.next_port
            self.killed.set()
        return True


def _serve_killed_mid_stream(brz, start_smartserve, tmp_path, *hold_args):
    root = tmp_path / "root"
    root.mkdir()
    brz.make_branch(root / "trunk", revisions=6)
    options = ("--bzr", "tcp:0:interface=127.0.0.1", "--ssh", "none", "--root", str(root), *hold_args)
    first = start_smartserve(*options, name="first")
    second = start_smartserve(*options, name="second")
    relay = _KillingRelay(first, second.port)
    try:
        result = brz.run("branch", f"bzr://127.0.0.1:{relay.port}/trunk", tmp_path / "copy", check=False)
    finally:
        relay.close()
    assert relay.killed.is_set(), "the first server was never asked for the stream"
    assert first.process.returncode == -signal.SIGKILL
    return result


def test_brz_branch_survives_a_server_killed_while_making_the_stream(brz, start_smartserve, tmp_path):
    result = _serve_killed_mid_stream(brz, start_smartserve, tmp_path, "--hold-response-bytes", "65536")
    assert result.returncode == 0, result.stderr
    assert brz.run("revno", tmp_path / "copy").stdout.strip() == "6"
    brz.run("check", tmp_path / "copy")


def test_without_holding_the_same_kill_cuts_the_stream_under_brz(brz, start_smartserve, tmp_path):
    result = _serve_killed_mid_stream(brz, start_smartserve, tmp_path)
    assert result.returncode != 0
    assert "Unexpected end of message" in result.stderr or "Connection closed" in result.stderr, result.stderr

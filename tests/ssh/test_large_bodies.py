"""Large bodies over bzr+ssh://: a ``get`` larger than one slice arrives whole, a large ``put`` lands whole,
also while the client renegotiates the session keys."""

from __future__ import annotations

import os

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor

from smartserve.protocol import NEED_DATA, BodyChunk, Connection, EndOfMessage, Request, Response, Role
from smartserve.server.backends.bzr import LARGE_BODY_BYTES
from smartserve.ssh import show_conch_trace

from support import logged_events, wait_until

from .conftest import SSH, needs_openssh

SERVE = ("bzr", "serve", "--inet", "--directory=/", "--allow-writes")


class _SmartCall(protocol.ProcessProtocol):
    """Sends one request (with a body, if given) down ``ssh`` and collects the response until its end."""

    def __init__(self, request: Request, body: bytes | None = None):
        self._codec = Connection(Role.CLIENT)
        self._request = request
        self._body = body
        self.response = None
        self.body = bytearray()
        self.done = defer.Deferred()

    def connectionMade(self) -> None:
        message = self._codec.send(self._request)
        if self._body is not None:
            message += self._codec.send(BodyChunk(self._body))
        self.transport.write(message + self._codec.send(EndOfMessage()))

    def outReceived(self, data: bytes) -> None:
        self._codec.receive_data(data)
        while (event := self._codec.next_event()) is not NEED_DATA:
            if isinstance(event, Response):
                self.response = event
            elif isinstance(event, BodyChunk):
                self.body += event.data
            elif isinstance(event, EndOfMessage):
                self.transport.closeStdin()
                return

    def processEnded(self, reason) -> None:
        self.done.callback(reason.value.exitCode)


@needs_openssh
@pytest.mark.parametrize(
    "options",
    [(), ("-o", "RekeyLimit=256K")],
    ids=["one-key", "rekeyed-every-256K"],
)
@pytest_twisted.ensureDeferred
async def test_large_get_arrives_whole_over_ssh(ssh_server, ssh_client, options):
    """A body several slices long, paced by the SSH window, reaches the client byte for byte,
    also when the client renegotiates the session keys again and again while it flows."""
    content = os.urandom(5 * LARGE_BODY_BYTES + 12345)
    (ssh_server.root / "big.bin").write_bytes(content)
    show_conch_trace(True)
    try:
        with logged_events(lambda event: event.get("log_format") == "NEW KEYS") as key_exchanges:
            call = _SmartCall(Request((b"get", b"big.bin")))
            reactor.spawnProcess(
                call, SSH, ["ssh", *ssh_client.argv("alice", *SERVE, options=list(options))], env=ssh_client.env
            )
            exit_code = await call.done
    finally:
        show_conch_trace(False)
    if options:
        assert len(key_exchanges) >= 5  # rekeyed again and again while the 5 MiB body flowed (10-11 seen)
    else:
        assert len(key_exchanges) == 1
    assert call.response is not None and call.response.args == (b"ok",)
    assert bytes(call.body) == content
    assert exit_code == 0


@needs_openssh
@pytest_twisted.ensureDeferred
async def test_large_put_lands_whole_while_keys_are_renegotiated(ssh_server, ssh_client):
    """A 3 MiB request body sent while the client rekeys every 256 KiB is written byte for byte; the session
    counts the body in the server's request-body memory while it arrives and gives it all back as it ends."""
    content = os.urandom(3 * 1024 * 1024 + 4321)
    (ssh_server.root / "~alice").mkdir()
    memory = ssh_server.smart_factory.body_memory
    sums = []
    update = memory.update

    def noting_update(caller, before, now):
        answer = update(caller, before, now)
        sums.append(memory.held)
        return answer

    memory.update = noting_update
    call = _SmartCall(Request((b"put", b"~alice/up.bin", b"")), body=content)
    options = ["-o", "RekeyLimit=256K"]
    reactor.spawnProcess(call, SSH, ["ssh", *ssh_client.argv("alice", *SERVE, options=options)], env=ssh_client.env)
    exit_code = await call.done
    assert call.response is not None and call.response.args == (b"ok",)
    assert (ssh_server.root / "~alice" / "up.bin").read_bytes() == content
    assert exit_code == 0
    assert max(sums) >= len(content)
    await wait_until(lambda: memory.held == 0, 10, "the session's share of request-body memory to be given back")


class _HalfSentBody(protocol.ProcessProtocol):
    """Writes a put's opening and part of one body part down ``ssh``, then waits to be killed."""

    def __init__(self, path: bytes, sent: int):
        self._path = path
        self._sent = sent
        self.done = defer.Deferred()

    def connectionMade(self) -> None:
        codec = Connection(Role.CLIENT)
        head = codec.send(Request((b"put", self._path, b"")))
        part = codec.send(BodyChunk(b"x" * (2 * self._sent)))
        self.transport.write(head + part[: 5 + self._sent])

    def processEnded(self, reason) -> None:
        self.done.callback(None)


@needs_openssh
@pytest_twisted.ensureDeferred
async def test_session_lost_in_the_middle_of_a_body_gives_its_memory_back(ssh_server, ssh_client):
    """An SSH client killed while its put's body is half sent: the server held that half in its request-body
    memory, and gives it back when the channel goes, and nothing is written."""
    (ssh_server.root / "~alice").mkdir()
    memory = ssh_server.smart_factory.body_memory
    sent = 512 * 1024
    call = _HalfSentBody(b"~alice/half.bin", sent)
    reactor.spawnProcess(call, SSH, ["ssh", *ssh_client.argv("alice", *SERVE)], env=ssh_client.env)
    await wait_until(lambda: memory.held >= sent, 30, "the server to hold the half-sent body")
    call.transport.signalProcess("KILL")
    await call.done
    await wait_until(lambda: memory.held == 0, 30, "the lost session's share to be given back")
    assert not (ssh_server.root / "~alice" / "half.bin").exists()

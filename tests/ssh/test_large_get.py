"""A ``get`` of a file larger than one slice arrives whole over bzr+ssh://."""

from __future__ import annotations

import os

import pytest_twisted
from twisted.internet import defer, protocol, reactor

from smartserve.protocol import NEED_DATA, BodyChunk, Connection, EndOfMessage, Request, Response, Role
from smartserve.server.backends.bzr import LARGE_BODY_BYTES

from .conftest import SSH, needs_openssh

SERVE = ("bzr", "serve", "--inet", "--directory=/", "--allow-writes")


class _SmartCall(protocol.ProcessProtocol):
    """Sends one request down ``ssh`` and collects the response until its end."""

    def __init__(self, request: Request):
        self._codec = Connection(Role.CLIENT)
        self._request = request
        self.response = None
        self.body = bytearray()
        self.done = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self._codec.send(self._request) + self._codec.send(EndOfMessage()))

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
@pytest_twisted.ensureDeferred
async def test_large_get_arrives_whole_over_ssh(ssh_server, ssh_client):
    """A body several slices long, paced by the SSH window, reaches the client byte for byte."""
    content = os.urandom(5 * LARGE_BODY_BYTES + 12345)
    (ssh_server.root / "big.bin").write_bytes(content)
    call = _SmartCall(Request((b"get", b"big.bin")))
    reactor.spawnProcess(
        call, SSH, ["ssh", *ssh_client.argv("alice", *SERVE)], env=ssh_client.env
    )
    exit_code = await call.done
    assert call.response is not None and call.response.args == (b"ok",)
    assert bytes(call.body) == content
    assert exit_code == 0

"""A drain closing a bzr:// connection says ServerDraining first: a request written as it closed is known not to have run."""

from __future__ import annotations

import pytest

from smartserve.testing import RawClient
from support import wait_for

from .conftest import ControlConnection, ServerProcess

pytestmark = pytest.mark.timeout(60)


def test_request_written_as_a_drain_closes_the_connection_is_answered_server_draining_and_not_run(tmp_path):
    """An append sent after the drain closed an idle connection: the client reads ServerDraining, then the end; no file."""
    server = ServerProcess(
        tmp_path / "data", ["--bzr", "tcp:0:interface=127.0.0.1", "--bzr-allow-writes", "--ssh", "none"]
    ).start()
    client = RawClient.connect("127.0.0.1", server.port)
    control = ControlConnection(server.control)
    try:
        assert client.call(b"hello").args == (b"ok", b"2")
        assert "_answer" in control.call("Drain")
        wait_for(lambda: "Draining: " in server.log(), 30, "the drain to start")
        # Written before reading what the server said as it closed: the race the message is for.
        client.send_request([b"append", b"/journal", b""], body=b"x" * (256 * 1024))
        answer = client.read_reply()
        assert (answer.success, answer.args[0]) == (False, b"ServerDraining")
        assert client.wait_closed() == b""
    finally:
        client.close()
        control.close()
    assert server.wait_exit(30) == 0
    assert not (server.data / "branches" / "journal").exists()
    assert "(all closed); 0 aborted" in server.log()

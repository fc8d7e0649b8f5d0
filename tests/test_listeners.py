"""Sockets handed over by a takeover are checked against the addresses the new process is asked to listen on."""

from __future__ import annotations

import os
import socket

import pytest

from smartserve.listeners import ListenError, Listener, ListenerGroup, _address_mismatch


@pytest.fixture
def handed_over():
    """A socket listening on 127.0.0.1, as a process taking over receives it."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock


@pytest.mark.parametrize(
    "description",
    [
        "tcp:{port}:interface=127.0.0.1",
        "tcp:port={port}:interface=127.0.0.1:backlog=10",
        "tcp:0:interface=127.0.0.1",
        "tcp:{port}:interface=localhost",
        "haproxy:tcp:{port}:interface=127.0.0.1",
        "systemd:domain=INET:index=0",
    ],
)
def test_socket_on_the_address_asked_for_is_kept(handed_over, description):
    """The same port and interface match, as do port 0 and what cannot be told from the description alone."""
    port = handed_over.getsockname()[1]
    assert _address_mismatch(description.format(port=port), handed_over.fileno()) is None


@pytest.mark.parametrize(
    "description, asked",
    [
        ("tcp:{other}:interface=127.0.0.1", "127.0.0.1:{other}"),
        ("tcp:{port}", "0.0.0.0:{port}"),
        ("tcp6:{port}:interface=\\:\\:1", "[::1]:{port}"),
        ("haproxy:tcp:{other}:interface=127.0.0.1", "127.0.0.1:{other}"),
        ("unix:/run/smartserve.sock", "/run/smartserve.sock"),
    ],
)
def test_socket_on_another_address_is_a_mismatch_naming_both(handed_over, description, asked):
    port = handed_over.getsockname()[1]
    names = {"port": port, "other": port + 1 if port < 65535 else port - 1}
    mismatch = _address_mismatch(description.format(**names), handed_over.fileno())
    assert mismatch == f"asks for {asked.format(**names)} but the socket handed over listens on 127.0.0.1:{port}"


def test_listen_all_refuses_a_moved_socket_before_listening_and_closes_every_socket_handed_over(handed_over):
    """No listener listens, and none of the sockets received stays open in this process."""
    port = handed_over.getsockname()[1]
    group = ListenerGroup()
    group.add(Listener("bzr", f"tcp:{port + 1}:interface=127.0.0.1", None, None))
    group.add(Listener("admin", f"tcp:{port}:interface=127.0.0.1", None, None))
    adopted = {name: (os.dup(handed_over.fileno()), socket.AF_INET) for name in ("bzr", "admin", "ssh")}
    failures = []
    group.listen_all(adopted).addErrback(failures.append)
    [failure] = failures
    assert failure.check(ListenError)
    assert str(failure.value).startswith(
        f"--bzr tcp:{port + 1}:interface=127.0.0.1 asks for 127.0.0.1:{port + 1} "
        f"but the socket handed over listens on 127.0.0.1:{port}. A takeover keeps the listening sockets"
    )
    assert all(listener.port is None for listener in group.listeners.values())
    for descriptor, _ in adopted.values():
        with pytest.raises(OSError):
            os.fstat(descriptor)

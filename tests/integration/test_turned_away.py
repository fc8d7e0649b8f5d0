"""A bzr:// connection over --bzr-max-connections is told TooManyConnections, runs nothing, and clients cope."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest_twisted
from twisted.internet import defer

from smartserve.client import SmartClient
from smartserve.testing import RawClient
from support import wait_for

_OPTIONS = ("--bzr", "tcp:0:interface=127.0.0.1", "--bzr-allow-writes", "--ssh", "none")


def _served_root(server) -> Path:
    return server.data / "branches"


def test_connection_over_the_limit_is_told_too_many_connections_and_nothing_it_sent_runs(start_smartserve):
    """The error arrives whole although the client sent a large request first, the request is not run, the others are served."""
    server = start_smartserve(*_OPTIONS, "--bzr-max-connections", "1")
    first = RawClient.connect("127.0.0.1", server.port)
    second = None
    try:
        assert first.call(b"hello").args == (b"ok", b"2")
        second = RawClient.connect("127.0.0.1", server.port)
        # The server reads none of it; without its lingering close the unread
        # bytes would make the kernel reset the connection, error and all.
        second.send_request([b"append", b"/journal", b""], body=b"x" * (256 * 1024))
        refused = second.read_reply()
        assert (refused.success, refused.args[0]) == (False, b"TooManyConnections")
        assert b"1 bzr:// connections open" in refused.args[1]
        assert second.wait_closed() == b""
        assert first.call(b"hello").args == (b"ok", b"2")
    finally:
        first.close()
        if second is not None:
            second.close()
    assert not (_served_root(server) / "journal").exists()
    assert "refusing bzr:// connection" in server.log()
    # The slot frees once the server has seen the first connection close.
    wait_for(lambda: _hello_on_a_new_connection(server) == (b"ok", b"2"), 10, "a connection to be served again")


def _hello_on_a_new_connection(server) -> tuple:
    client = RawClient.connect("127.0.0.1", server.port)
    try:
        return client.call(b"hello").args
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_client_pool_larger_than_the_limit_applies_every_append_once(start_smartserve):
    """Twelve appends at once through six pooled connections to a server taking two: all succeed, none twice."""
    server = start_smartserve(*_OPTIONS, "--bzr-max-connections", "2")
    client = SmartClient.from_url(server.url, pool_size=6)
    lines = [b"entry %d\n" % index for index in range(12)]
    try:
        replies = await defer.gatherResults(
            [defer.ensureDeferred(client.call(b"append", b"/journal", b"", body=line)) for line in lines]
        )
    finally:
        await client.close()
    assert all(reply.args[0] == b"appended" for reply in replies)
    assert sorted((_served_root(server) / "journal").read_bytes().splitlines(keepends=True)) == sorted(lines)
    assert client.stats.outcome_unknown == 0
    assert client.stats.resends + client.stats.connect_failures >= 1, "no connection was turned away"
    assert "refusing bzr:// connection" in server.log()


def test_brz_against_a_full_server_names_the_error(start_smartserve, brz):
    """Stock brz turned away gets an error naming TooManyConnections; once a connection frees, it works."""
    server = start_smartserve(*_OPTIONS, "--bzr-max-connections", "1")
    brz.run("init", f"{server.url}/branch")
    holder = wait_for(lambda: _served_connection(server), 10, "brz init's connection to be closed")
    try:
        refused = brz.run("revno", f"{server.url}/branch", check=False)
    finally:
        holder.close()
    assert refused.returncode != 0
    assert "TooManyConnections" in refused.stderr, refused.stderr
    def revno():
        done = brz.run("revno", f"{server.url}/branch", check=False)
        return done.stdout if done.returncode == 0 else None

    assert wait_for(revno, 10, "brz to be served once the holder closed") == "0\n"


def _served_connection(server):
    """A new connection whose hello was answered, or None if it was turned away."""
    client = RawClient.connect("127.0.0.1", server.port)
    if client.call(b"hello").args == (b"ok", b"2"):
        return client
    client.close()
    return None


def _connect_from(server, source: str) -> RawClient:
    """A raw bzr:// client whose connection comes from ``source``, one of the loopback addresses."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10, source_address=(source, 0))
    return RawClient(sock)


def test_one_address_past_its_limit_is_turned_away_and_another_is_served(start_smartserve):
    """With --bzr-max-connections-per-address 2, a third connection from 127.0.0.1 is told TooManyConnections and
    its append never runs, while one from 127.0.0.2 is served; the log names the address."""
    server = start_smartserve(*_OPTIONS, "--bzr-max-connections-per-address", "2")
    held = [_connect_from(server, "127.0.0.1") for _ in range(2)]
    try:
        for client in held:
            assert client.call(b"hello").args == (b"ok", b"2")
        third = _connect_from(server, "127.0.0.1")
        third.send_request([b"append", b"/journal", b""], body=b"never run\n")
        refused = third.read_reply()
        assert (refused.success, refused.args[0]) == (False, b"TooManyConnections")
        assert b"open from your address" in refused.args[1]
        third.close()
        other = _connect_from(server, "127.0.0.2")
        assert other.call(b"append", b"/journal", b"", body=b"served\n").args[0] == b"appended"
        other.close()
    finally:
        for client in held:
            client.close()
    assert (_served_root(server) / "journal").read_bytes() == b"served\n"
    assert "refusing bzr:// connections from 127.0.0.1: 2 open from there" in server.log()
    wait_for(lambda: _hello_on_a_new_connection(server) == (b"ok", b"2"), 10, "127.0.0.1 to be served again")


def _via_proxy(server, client_address: str) -> RawClient:
    """A raw client on a new connection that starts with a PROXY header naming ``client_address``, as haproxy sends."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"PROXY TCP4 %s 127.0.0.1 40000 4155\r\n" % client_address.encode())
    return RawClient(sock)


def test_behind_haproxy_the_limit_counts_the_address_the_proxy_names(start_smartserve):
    """On a haproxy: endpoint every connection comes from the proxy's address; the limit counts the client address
    its PROXY header names instead."""
    server = start_smartserve(
        "--bzr", "haproxy:tcp:0:interface=127.0.0.1", "--ssh", "none", "--bzr-max-connections-per-address", "1"
    )
    first = _via_proxy(server, "192.0.2.1")
    second = _via_proxy(server, "192.0.2.2")
    third = _via_proxy(server, "192.0.2.1")
    try:
        assert first.call(b"hello").args == (b"ok", b"2")
        assert second.call(b"hello").args == (b"ok", b"2")
        refused = third.call(b"hello")
        assert (refused.success, refused.args[0]) == (False, b"TooManyConnections")
    finally:
        for client in (first, second, third):
            client.close()
    assert "refusing bzr:// connections from 192.0.2.1" in server.log()

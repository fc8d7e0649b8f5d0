"""Behind haproxy's PROXY protocol v2, requests are logged with the real client address."""

from __future__ import annotations

import socket
import struct

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory

from smartserve.testing import MemoryBackend, encode_request, serve_in_memory
from support import logged_events

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v2_header(source: tuple, destination: tuple) -> bytes:
    """A PROXY v2 header for a TCP over IPv4 connection from ``source`` to ``destination``."""
    addresses = socket.inet_aton(source[0]) + socket.inet_aton(destination[0])
    addresses += struct.pack("!HH", source[1], destination[1])
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


def test_protocol_peer_is_proxy_source():
    """A request that arrived through PROXY v2 is made by the client the header names, not by the proxy."""
    backend = MemoryBackend()
    factory, _, _ = serve_in_memory(backend)
    wrapped = HAProxyWrappingFactory(factory).buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
    wrapped.makeConnection(transport)
    wrapped.dataReceived(proxy_v2_header(("192.0.2.7", 40001), ("198.51.100.1", 4155)) + encode_request([b"hello"]))
    protocol = wrapped.wrappedProtocol
    assert protocol.caller.peer == "192.0.2.7:40001"
    assert protocol.requests_served == 1


def test_protocol_peer_without_proxy_is_transport_peer():
    """Without a proxy, the caller's address is the TCP peer's."""
    factory, _, _ = serve_in_memory(MemoryBackend())
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "203.0.113.5", 6000)))
    protocol.dataReceived(encode_request([b"hello"]))
    assert protocol.caller.peer == "203.0.113.5:6000"


def test_lines_before_any_request_name_the_proxy_source():
    """Clients behind the proxy that break the protocol, or idle out, before their first request are logged with their own address, not the proxy's."""
    factory, _, _ = serve_in_memory(MemoryBackend(), idle_timeout=10.0)
    connections = []
    for port in (40001, 40002):
        wrapped = HAProxyWrappingFactory(factory).buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        wrapped.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000)))
        connections.append(wrapped)
    with logged_events(lambda event: event.get("log_namespace") == "smartserve.server.protocol") as events:
        broken, idle = connections
        broken.dataReceived(proxy_v2_header(("192.0.2.7", 40001), ("198.51.100.1", 4155)) + b"GET / HTTP/1.0\r\n\r\n")
        idle.dataReceived(proxy_v2_header(("192.0.2.8", 40002), ("198.51.100.1", 4155)))
        factory.clock.advance(10.0)
    ours = {connection.wrappedProtocol.connection_id for connection in connections}
    assert [event["peer"] for event in events if event["connection_id"] in ours] == [
        "192.0.2.7:40001",
        "192.0.2.8:40002",
    ]

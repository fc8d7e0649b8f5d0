"""How a peer's address is written in logs and in ``Caller.peer``."""

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from smartserve.server.caller import peer_text


def test_peer_text_writes_host_and_port_with_ipv6_in_brackets():
    assert peer_text(IPv4Address("TCP", "127.0.0.1", 5022)) == "127.0.0.1:5022"
    assert peer_text(IPv6Address("TCP", "::1", 5022)) == "[::1]:5022"


def test_peer_text_of_an_address_without_host_is_its_text():
    address = UNIXAddress(b"/run/smartserve.sock")
    assert peer_text(address) == str(address)

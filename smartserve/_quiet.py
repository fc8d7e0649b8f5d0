"""Connections that add nothing to the log of the program making them.

A Twisted factory logs its start and stop at info, naming itself by
``repr``: two lines for every connection a client makes, in the log of
the service embedding it. smartserve logs what matters about its
connections itself.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory

__all__ = ["QuietFactory", "connect_quietly"]


class QuietFactory(Factory):
    """A factory that does not log its start and stop."""

    noisy = False


def connect_quietly(endpoint, protocol) -> Deferred:
    """Connect ``protocol`` through ``endpoint`` like ``connectProtocol``, without its factory's log lines."""
    return endpoint.connect(QuietFactory.forProtocol(lambda: protocol))

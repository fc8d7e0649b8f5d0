"""How hard the client tries: resend limits, backoff, deadlines, budget.

Everything here is plain data and arithmetic; the engine in ``_client``
asks ``smartserve.verbs.may_resend`` whether a resend is allowed at all,
and these limits whether it may still happen.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Optional

__all__ = ["RetryPolicy", "RetryBudget", "backoff_delay"]


@dataclass(frozen=True)
class RetryPolicy:
    """The client's limits; every one is a keyword with a default.

    ``resend`` switches resending off entirely when False (a reconnect
    forced by the probe still happens: nothing was sent).
    ``max_resends`` bounds how often one call's request is sent again.
    ``max_connect_attempts`` bounds connection attempts in one call.
    ``backoff_initial``, ``backoff_factor`` and ``backoff_max`` shape the
    wait before reconnecting after a failure, with full jitter (see
    ``backoff_delay``). ``deadline`` bounds a whole call, waits and resends
    included; ``request_timeout`` bounds one attempt from its first byte
    written to its last byte received (None: no limit). ``connect_timeout``
    bounds one connection attempt. ``keepalive_interval`` sends a ``hello``
    on a connection idle that long, so that a connection silently dropped by
    a NAT or proxy is noticed before a real request uses it (None: off).
    ``max_connection_age`` closes a connection, between calls, once it has
    been open that long (less up to a tenth, at random, so that a client's
    connections do not all go at once); the next call makes a new one,
    so connections spread again over servers that came back after a
    restart (None: connections live as long as the server keeps them).
    ``budget_tokens`` and ``budget_ratio`` configure the ``RetryBudget``
    shared by all calls of one client.
    """

    resend: bool = True
    max_resends: int = 3
    max_connect_attempts: int = 5
    backoff_initial: float = 0.1
    backoff_factor: float = 2.0
    backoff_max: float = 5.0
    deadline: float = 60.0
    request_timeout: Optional[float] = None
    connect_timeout: float = 10.0
    keepalive_interval: Optional[float] = None
    max_connection_age: Optional[float] = None
    budget_tokens: float = 10.0
    budget_ratio: float = 0.1


def backoff_delay(
    failures: int,
    policy: RetryPolicy,
    jitter: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before reconnecting after ``failures`` failures in a row.

    Full jitter: a uniform pick between 0 and the exponential ceiling
    ``backoff_initial * backoff_factor ** (failures - 1)``, capped at
    ``backoff_max``. Spreading the picks keeps clients that lost the same
    server at the same moment from reconnecting in lockstep.
    """
    if failures <= 0:
        return 0.0
    try:
        ceiling = policy.backoff_initial * policy.backoff_factor ** min(failures - 1, 100)
    except OverflowError:
        ceiling = policy.backoff_max
    return min(ceiling, policy.backoff_max) * jitter()


class RetryBudget:
    """A token bucket shared by all calls of a client, as gRPC's retry throttling.

    The bucket starts full with ``max_tokens``. Each failed attempt takes one
    token, each successful call gives back ``ratio`` of one. Retrying is
    allowed only while more than half the tokens are left, so a dead or
    overloaded server costs each client a bounded number of extra attempts
    instead of a storm.
    """

    def __init__(self, max_tokens: float = 10.0, ratio: float = 0.1):
        self.max_tokens = max_tokens
        self.ratio = ratio
        self.tokens = max_tokens

    def record_failure(self) -> None:
        """Take one token for a failed attempt."""
        self.tokens = max(0.0, self.tokens - 1)

    def record_success(self) -> None:
        """Give back part of a token for a call that succeeded."""
        if self.tokens < self.max_tokens:
            self.tokens = min(self.max_tokens, self.tokens + self.ratio)

    def allows_retry(self) -> bool:
        """Whether another attempt after a failure may be made now."""
        return self.tokens > self.max_tokens / 2

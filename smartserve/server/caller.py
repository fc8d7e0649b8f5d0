"""Who is making requests on a connection, and what they may change."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .jail import Writable

__all__ = ["Caller", "peer_text", "host_of"]


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated user (None over bzr://), their address, and where they may write."""

    user: Optional[str]
    peer: str
    writable: Writable

    @property
    def who(self) -> tuple:
        """Whom this caller's share of the server is counted for: the user, or over bzr:// the client's address."""
        if self.user is not None:
            return ("user", self.user)
        return ("address", host_of(self.peer))

    @property
    def read_only(self) -> bool:
        """True when the caller may run only ``read`` verbs."""
        return self.writable.is_nowhere

    def warn_about(self, logger, verb: bytes, what: str, **detail) -> None:
        """Warn on ``logger`` that this caller's ``verb`` request ``what`` (a format of ``detail``'s fields),
        as ``put from alice at 192.0.2.7:50318 refused: ...``."""
        logger.warn(
            "{verb} from {user} at {peer} " + what,
            verb=verb.decode("utf-8", "replace"),
            user=self.user or "-",
            peer=self.peer,
            **detail,
        )


def peer_text(address) -> str:
    """A transport's peer address as logs and ``Caller.peer`` show it: ``host:port``, ``[v6]:port``."""
    host = getattr(address, "host", None)
    if host is None:
        return str(address)
    return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"


def host_of(peer: str) -> str:
    """The host of a ``peer_text`` address (``host:port``, ``[v6]:port``); any other text as it is."""
    if peer.startswith("[") and "]:" in peer:
        return peer[1 : peer.index("]:")]
    if peer.count(":") == 1:
        return peer.split(":")[0]
    return peer

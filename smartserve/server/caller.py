"""Who is making requests on a connection, and what they may change."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .jail import Writable

__all__ = ["Caller"]


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated user (None over bzr://), their address, and where they may write."""

    user: Optional[str]
    peer: str
    writable: Writable

    @property
    def read_only(self) -> bool:
        """True when the caller may run only ``read`` verbs."""
        return self.writable.is_nowhere

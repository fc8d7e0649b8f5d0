"""Size limits that keep a peer from making us buffer without bound."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["Limits", "DEFAULT_LIMITS"]

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True, slots=True)
class Limits:
    """The largest part of each kind a connection accepts, in bytes.

    ``max_body_part_size`` must hold a whole file, since Breezy sends a
    ``get`` response or a ``put`` request body as one part.

    ``max_whole_part_size``, when set below ``max_body_part_size``, is for
    a peer that refuses larger body parts anyway (a server that keeps a
    request body only up to a smaller limit): a part larger than it is
    handed on in pieces as its bytes arrive instead of being held until it
    is whole, so what its receiver does not keep is never held at all.

    ``max_pipelined_size`` bounds what the peer may send beyond a complete
    message before ``start_next_cycle``: the start of its next message, sent
    before the answer to the last one. An adapter that stops reading while
    it answers holds at most one read there; the limit is for one that
    does not.
    """

    max_headers_size: int = 64 * KiB
    max_structure_size: int = 4 * MiB
    max_body_part_size: int = 256 * MiB
    max_whole_part_size: Optional[int] = None
    max_pipelined_size: int = 1 * MiB


DEFAULT_LIMITS = Limits()

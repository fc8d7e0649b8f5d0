"""What a user name may look like.

User names become file names (``KEYS/<user>.pub``) and path segments
(``/~<user>/``), so they are restricted to a portable, separator-free set.
"""

from __future__ import annotations

import re

__all__ = ["is_valid_username"]

_USERNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")


def is_valid_username(name: str) -> bool:
    """Return whether ``name`` is an acceptable user name.

    One to 64 characters from letters, digits, ``.``, ``_`` and ``-``, not
    starting with ``.`` or ``-``: no path separators, no ``..``, no hidden
    files, nothing an option parser could mistake for a flag.
    """
    return _USERNAME.fullmatch(name) is not None

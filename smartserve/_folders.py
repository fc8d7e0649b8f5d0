"""The folders the server makes as it starts: the folder itself, never its parents."""

from __future__ import annotations

import os

__all__ = ["make_folder"]


def make_folder(option: str, path: str) -> None:
    """Create the folder ``path`` given by ``--option`` if missing; ``OSError`` naming the option if it cannot be.

    Its parent is never created: a mistyped path is an error, not a new tree
    of folders.
    """
    try:
        os.mkdir(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise NotADirectoryError(f"--{option} {path} is not a folder") from None
    except FileNotFoundError:
        raise FileNotFoundError(
            f"--{option} {path}: its parent folder {os.path.dirname(path)} does not exist"
        ) from None
    except OSError as error:
        raise OSError(f"--{option} {path}: {error.strerror}") from None

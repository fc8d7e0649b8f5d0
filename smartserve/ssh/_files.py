"""Reading the small files operators hand the server (keys, access rules) without blocking the reactor."""

from __future__ import annotations

import os
import stat

__all__ = ["NotASmallFile", "read_small_file"]


class NotASmallFile(OSError):
    """The path is not a regular file (a FIFO, a device, a folder) or is larger than allowed.

    An ``OSError`` whose ``strerror`` says which, so that a caller with one
    message for every file it cannot use needs one ``except``.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.strerror = reason


def _check(info: os.stat_result, limit: int) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise NotASmallFile("not a regular file")
    if info.st_size > limit:
        raise NotASmallFile(f"larger than {limit} bytes")


def read_small_file(path: str, limit: int, info: os.stat_result | None = None) -> tuple[os.stat_result, bytes]:
    """Return the ``fstat`` and the whole content of ``path``, a regular file of at most ``limit`` bytes.

    Opening a FIFO would block the reactor until a writer came; reading a
    device or a huge file would never end or fill memory: anything but a
    small regular file raises ``NotASmallFile``, checked on ``info`` (a
    ``stat`` of ``path`` the caller made already) before it is opened and
    again on what was opened. Another ``OSError`` if it cannot be read.
    """
    _check(os.stat(path) if info is None else info, limit)
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        # Replaced between the stat and the open: check what was opened.
        opened = os.fstat(descriptor)
        _check(opened, limit)
        chunks = []
        left = limit + 1
        while left > 0 and (chunk := os.read(descriptor, left)):
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(descriptor)
    data = b"".join(chunks)
    if len(data) > limit:
        raise NotASmallFile(f"larger than {limit} bytes")
    return opened, data

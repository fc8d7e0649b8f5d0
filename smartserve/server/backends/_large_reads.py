"""Breezy's requests that answer with a whole file, sending a large one as it is read instead.

Breezy's own ``get``, ``readv`` and ``Repository.tarball`` read everything
they answer with into one ``bytes`` first, so a reader asking for a file
(or a repository) of gigabytes would make the server hold all of it.
These subclasses answer a read of more than ``LARGE_READ_BYTES``, and
every tarball, with a ``body_stream`` that reads the file
``FILE_READ_BYTES`` at a time as the connection takes it; on the wire that
is the same response, its body in several parts. Smaller reads, and every
read Breezy would refuse, go to Breezy's own code, so their replies and
errors are exactly ``brz serve``'s. The tarball is the exception: Breezy's
own fails every request (see ``StreamedTarballRequest``).

Imported only once Breezy is set up (see ``bzr._registry``).
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from typing import List, Tuple

from breezy.bzr.smart import repository, request, vfs
from breezy.errors import ShortReadvError

from .bzr import LARGE_BODY_BYTES

# A read of more than this many bytes is sent as it is read: a body the server would otherwise slice.
LARGE_READ_BYTES = LARGE_BODY_BYTES
# A large read reads its file this much at a time.
FILE_READ_BYTES = 1024 * 1024


class StreamedGetRequest(vfs.GetRequest):
    """``get``: a file over ``LARGE_READ_BYTES`` is read as it is sent."""

    def do(self, relpath):
        try:
            translated = self.translate_client_path(relpath)
        except Exception:
            translated = None  # Breezy's own code meets the same error and reports it
        if translated is not None and _size_of(self._backing_transport, translated) > LARGE_READ_BYTES:
            opened = _open_with_size(self._backing_transport, translated)
            if opened is not None:
                file, size = opened
                if size > LARGE_READ_BYTES:
                    return request.SuccessfulSmartServerResponse((b"ok",), body_stream=_Ranges(file, [(0, size)]))
                file.close()
        return super().do(relpath)


class StreamedReadvRequest(vfs.ReadvRequest):
    """``readv``: ranges adding up to more than ``LARGE_READ_BYTES`` are read as they are sent."""

    def do_body(self, body_bytes):
        offsets = self._deserialise_offsets(body_bytes)
        if sum(length for _, length in offsets) > LARGE_READ_BYTES:
            opened = _open_with_size(self._backing_transport, self._relpath)
            if opened is not None:
                file, size = opened
                if _readable_ranges(offsets, size):
                    return request.SuccessfulSmartServerResponse((b"readv",), body_stream=_Ranges(file, offsets))
                file.close()
        return super().do_body(body_bytes)


class StreamedTarballRequest(repository.SmartServerRepositoryTarball):
    """``Repository.tarball``: Breezy's tarball, sent from its temporary file as it is read.

    The file is unlinked as soon as it is written: nothing is left on disk
    however the response ends, and its space is freed when the stream closes.
    """

    COMPRESSIONS = ("", "gz", "bz2")

    def do_repository_request(self, repository, compression):
        # Breezy's own fails every request, after copying the repository: it hands tarfile bytes where str is due.
        mode = compression.decode("ascii", "replace") if isinstance(compression, bytes) else compression
        if mode not in self.COMPRESSIONS:
            raise ValueError(f"unknown tarball compression {mode!r}: use one of {self.COMPRESSIONS}")
        return super().do_repository_request(repository, mode)

    def _tarball_of_dir(self, dirname, compression, ofile):
        with tarfile.open(fileobj=ofile, mode="w|" + compression) as tarball:
            tarball.add(dirname, ".bzr")

    def _tarfile_response(self, tmp_dirname, compression):
        with tempfile.NamedTemporaryFile(prefix="smartserve-tarball-") as named:
            self._tarball_of_dir(tmp_dirname, compression, named.file)
            file = os.fdopen(os.dup(named.file.fileno()), "rb")
        size = os.fstat(file.fileno()).st_size
        return request.SuccessfulSmartServerResponse((b"ok",), body_stream=_Ranges(file, [(0, size)]))


def _readable_ranges(offsets: List[Tuple[int, int]], size: int) -> bool:
    """True if every range lies within ``size`` bytes and none overlaps another, as Breezy's ``readv`` requires."""
    end = 0
    for start, length in sorted(offsets):
        if start < end or length < 0 or start + length > size:
            return False
        end = start + length
    return True


def _size_of(transport, relpath: str) -> int:
    """The size of the file at ``relpath``, without opening it; 0 if there is none.

    A file that is not large is left to Breezy's own ``GetRequest`` (and
    the jail's fast ``get_bytes``) after this one ``stat``.
    """
    file_size = getattr(transport, "file_size", None)
    try:
        size = file_size(relpath) if file_size is not None else transport.stat(relpath).st_size
    except Exception:
        return 0
    return size or 0


def _open_with_size(transport, relpath: str):
    """``(file, size)`` for the file at ``relpath``, or None if it cannot be opened as a plain file.

    On None, Breezy's own code meets the same error and reports it.
    """
    try:
        file = transport.get(relpath)
    except Exception:
        return None
    try:
        return file, os.fstat(file.fileno()).st_size
    except Exception:
        file.close()
        return None


class _Ranges:
    """The bytes of ranges of an open binary file, in pieces of ``FILE_READ_BYTES`` (the last one shorter).

    Small ranges share a piece, so a ``readv`` of many short ranges costs
    a few body parts, not one per range. The file is closed after the last
    range or by ``close``, whether or not reading began. A file that shrank
    meanwhile ends the stream with ``ShortReadvError``, as Breezy's
    ``readv`` reports it.
    """

    def __init__(self, file, ranges: List[Tuple[int, int]]):
        self._file = file
        self._ranges = iter(ranges)
        self._start = self._left = 0

    def __iter__(self) -> "_Ranges":
        return self

    def __next__(self) -> bytes:
        pieces = []
        size = 0
        while size < FILE_READ_BYTES:
            if not self._left:
                next_range = next(self._ranges, None)
                if next_range is None:
                    break
                self._start, self._left = next_range
                self._file.seek(self._start)
                continue
            chunk = self._file.read(min(self._left, FILE_READ_BYTES - size))
            if not chunk:
                path = getattr(self._file, "name", "")
                self.close()
                raise ShortReadvError(path, self._start, self._left, 0)
            pieces.append(chunk)
            size += len(chunk)
            self._start += len(chunk)
            self._left -= len(chunk)
        if not pieces:
            self.close()
            raise StopIteration
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def close(self) -> None:
        self._file.close()

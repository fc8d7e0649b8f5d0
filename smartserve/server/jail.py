"""The served-root jail and per-caller write rights, as a Breezy transport.

Breezy's server-side request classes work on a "backing transport";
``backing_transport(root, writable)`` builds one per caller.  It keeps every
operation inside ``root`` and lets the caller write only where ``writable``
says.

Theory of operation
-------------------
Every path a method receives goes through one function, ``_segments``: the
relative URL is unescaped once (so ``%2e%2e`` and ``%2f`` become ``..`` and
``/``), joined to the transport's own position (or to the root if absolute),
and normalised segment by segment with ``..`` stopping at the root.  The
result, a tuple of names below the root, is the only form used afterwards:
the write check, the symlink check and the call into the local transport
all see the same path, so no second parser can disagree with the first.

Then, for every operation that touches a path:

1. A write (put, append, mkdir, rmdir, delete, rename, move, copy target,
   open_write_stream, lock_write, delete_tree, copy_tree) to a path that is
   not at or below a writable prefix raises (an atomic put also needs the
   parent writable, as its temporary file is written there)
   ``TransportNotPossible("readonly transport")``, which Breezy's smart
   server sends as ``ReadOnlyError``.  Nothing has been touched by then.
   A write that names the root itself raises ``ServedRoot``, a
   ``PermissionDenied``, whatever the rights: an atomic put of the root
   would write its temporary file outside it, and an rmdir would remove
   it for everyone.  ``mkdir`` of the root raises ``FileExists``.
2. The local path must resolve inside the real root (each name below
   the root is checked for being a symlink, and a path through one is
   resolved with ``os.path.realpath``); otherwise ``OutsideRoot``, a
   ``PermissionDenied``.  Directories and files found to be real ones
   (not symlinks) are remembered until the next request begins or a
   client renames or deletes something.  This refuses file and directory
   symlinks that leave the root at any depth, including dangling ones (a
   put through one would create a file outside).
   Symlinks that stay inside the root work normally.  Deleting or renaming
   a symlink that points outside is refused too, although it would not
   leave the root: the check is on the resolved path, always.
3. The operation runs on the shared ``LocalTransport`` of the root with the
   normalised path.  Path and operating-system errors are re-raised with
   the client path, so clients never learn where the root lives on the
   server's disk.

Operator symlinks that stay inside the root are trusted: the write check
uses the client path, not the resolved one.  Clients cannot create
symlinks (``symlink``/``hardlink`` are not offered), so only the operator's
tree can hold them.  The check and the operation are two system calls, so
an operator who swaps symlinks while serving can race them.

Cost per caller and the trade-off with Breezy's ChrootServer
-------------------------------------------------------------
``brz serve`` wraps the root in a ``ChrootServer``, whose ``start_server``
registers a new URL scheme for every instance and whose transports carry no
per-caller state.  Doing that per connection would grow Breezy's global
transport registry with every connection and still need a decorator for the
write rights.  Here instead:

- one ``LocalTransport`` and real root per root directory, cached;
- one URL scheme, ``smartserve-jail-``, registered once per process;
- per caller, a small ``_Caller`` record (root, rights, random token) kept
  in a weak dictionary, and the transport object itself: a few
  microseconds.

The token is part of every URL this transport hands out
(``smartserve-jail-<token>:///~alice/repo/``), so when Breezy opens a URL
it got from ``base`` or ``external_url()`` (``ControlDir`` opening, stacked
branches resolved relative to a branch) it gets a transport with the same
caller's rights, not an unrestricted one.  The token is random so one
caller cannot name another's rights in a URL it stores (a stacked-on URL,
say).  When the last transport of a caller goes away its token is
forgotten and its URLs stop resolving.

The cost: the jail normalises paths itself rather than reusing
``ChrootTransport``, and ``local_abspath`` is refused (``NotLocalUrl``) so
no Breezy code can bypass the checks with direct file-system calls.
"""

from __future__ import annotations

import functools
import os
import secrets
import weakref
from dataclasses import dataclass
from stat import S_ISDIR, S_ISLNK, S_ISREG
from typing import Optional, Tuple, Union

from breezy import errors, urlutils
from breezy import transport as breezy_transport
from breezy.transport import FileExists, Transport, register_transport
from breezy.transport.local import LocalTransport

__all__ = ["Writable", "backing_transport", "OutsideRoot", "ServedRoot"]


class OutsideRoot(errors.PermissionDenied):
    """A path resolves, through a symlink, to somewhere outside the served root.

    Breezy's smart server sends it as ``PermissionDenied``.  ``extra`` is
    kept free of the ": " that ``PathError`` adds, because the client adds
    its own when it rebuilds the error.
    """

    _fmt = 'Permission denied: "%(path)s": %(extra)s'

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.extra = "outside the served root"


class ServedRoot(errors.PermissionDenied):
    """A write would replace, remove or move the served root itself.

    An atomic put of the root would write its temporary file beside the
    root, outside it, and an rmdir of an empty root would remove it for
    every caller. Breezy's smart server sends it as ``PermissionDenied``.
    """

    _fmt = 'Permission denied: "%(path)s": %(extra)s'

    def __init__(self) -> None:
        super().__init__("/")
        self.extra = "the served root itself"


_READONLY = "readonly transport"
_SCHEME = "smartserve-jail-"

Segments = Tuple[str, ...]


# The longest path the jail takes, in characters once unescaped: Linux's
# PATH_MAX, so no path a file system could open is refused. A longer one
# costs work in proportion to its length (and more) for nothing.
MAX_PATH = 4096


def _unescape(relpath: str) -> str:
    """Unescape a relative URL once; raises InvalidURL for bad UTF-8, a NUL byte or a path over ``MAX_PATH``."""
    if len(relpath) > 3 * MAX_PATH:  # each escaped character is three
        raise _too_long(relpath)
    path = urlutils.unescape(relpath)
    if "\0" in path:
        raise urlutils.InvalidURL(relpath, "NUL in path")
    if len(path) > MAX_PATH:
        raise _too_long(relpath)
    return path


def _too_long(relpath: str) -> urlutils.InvalidURL:
    return urlutils.InvalidURL(relpath[:64] + "...", f"path longer than {MAX_PATH} characters")


def _normalise(path: str, start: Segments = ()) -> Segments:
    """Resolve an unescaped POSIX path against ``start``; ``..`` stops at the root."""
    parts = [] if path.startswith("/") else list(start)
    for part in path.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part and part != ".":
            parts.append(part)
    return tuple(parts)


def _read_whole(path: str) -> bytes:
    """The content of the file at ``path``, read to its end."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, _FIRST_READ)
        if len(data) < _FIRST_READ and not (data and os.read(fd, 1)):
            return data  # a small file: open, two reads and close
        # A larger file (or one growing): read whole into one buffer of its size.
        os.lseek(fd, 0, os.SEEK_SET)
        with open(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


# The first read of get_bytes takes a small file whole (inline reads are at most 64 KiB by default).
_FIRST_READ = 64 * 1024


# Paths up to this long are remembered by ``_parse_cached``, so what the cache holds stays small.
_CACHED_PATH = 256


@functools.lru_cache(maxsize=1024)
def _parse_cached(relpath: str, start: Segments) -> Segments:
    """``relpath`` unescaped and resolved against ``start``, for a short path: a request names the same
    paths several times."""
    return _normalise(_unescape(relpath), start)


@dataclass(frozen=True, slots=True)
class Writable:
    """Where a caller may write: everywhere, nowhere, or at and below some client-path prefixes.

    ``prefixes`` is None for everywhere, else a tuple of normalised prefixes
    (each a tuple of path segments).  Build values with the class methods.
    """

    prefixes: Optional[Tuple[Segments, ...]]

    @classmethod
    def everywhere(cls) -> Writable:
        """Return rights to write anywhere in the root."""
        return cls(None)

    @classmethod
    def nowhere(cls) -> Writable:
        """Return read-only rights."""
        return cls(())

    @classmethod
    def under(cls, *prefixes: str) -> Writable:
        """Return rights to write at and below each client path in ``prefixes``.

        Each prefix is an absolute client path such as ``"/~alice/"``; the
        directory itself is included (so ``/~alice`` may be created) but
        ``/~alicex`` is not.  ``under("/")`` equals ``everywhere()`` and
        ``under()`` equals ``nowhere()``.  Raises ValueError for a relative
        prefix or one containing ``..``.
        """
        normalised = []
        for prefix in prefixes:
            if not prefix.startswith("/") or ".." in prefix.split("/"):
                raise ValueError(f"not an absolute client path: {prefix!r}")
            segments = _normalise(prefix)
            if not segments:
                return cls.everywhere()
            if segments not in normalised:
                normalised.append(segments)
        return cls(tuple(normalised))

    @property
    def is_nowhere(self) -> bool:
        """True when nothing may be written."""
        return self.prefixes == ()

    def allows_segments(self, segments: Segments) -> bool:
        """Return whether the normalised path ``segments`` may be written."""
        if self.prefixes is None:
            return True
        return any(segments[: len(p)] == p for p in self.prefixes)

    def allows(self, client_path: str) -> bool:
        """Return whether the client path (unescaped, absolute from the root) may be written."""
        return self.allows_segments(_normalise(client_path))


class _Root:
    """One served directory: its resolved path and the local transport shared by all callers.

    ``check`` remembers the directories and files it found to be real
    ones (not symlinks). The memory is dropped when a request begins
    (``forget_checked``), so each request sees the operator's symlinks as
    they are then, and whenever a client renames or deletes something in
    the root, which could put another entry at a remembered path.
    """

    __slots__ = ("real", "local", "_inside", "_checked")

    def __init__(self, root: str) -> None:
        self.real = os.path.realpath(root)
        if not os.path.isdir(self.real):
            raise errors.NotADirectory(root)
        self.local = LocalTransport(urlutils.local_path_to_url(self.real))
        self._inside = self.real.rstrip("/") + "/"
        self._checked: set = set()

    def forget_checked(self) -> None:
        """Forget every remembered path (the set is replaced, so a check running meanwhile fills the old one)."""
        self._checked = set()

    def check(self, segments: Segments):
        """Raise OutsideRoot unless the path resolves inside the root.

        The root itself is already resolved, so only the names below it are
        looked at, one ``lstat`` each, starting below the deepest path
        already checked; a full ``realpath`` runs only when one of them is a
        symlink. A missing name ends the walk: nothing below it exists, so
        nothing below it can lead outside. Returns the ``lstat`` of the path
        itself when the walk reached it, else None.
        """
        checked = self._checked
        if segments in checked:
            return None
        depth = len(segments)
        start = _deepest_checked(segments, checked)
        path = "/".join((self.real, *segments[:start]))
        st = None
        for index in range(start, depth):
            path = f"{path}/{segments[index]}"
            try:
                st = os.lstat(path)
            except OSError:
                return None
            mode = st.st_mode
            if S_ISDIR(mode) or S_ISREG(mode):
                checked.add(segments[: index + 1])
            elif S_ISLNK(mode):
                real = os.path.realpath(self._inside + "/".join(segments))
                if real != self.real and not real.startswith(self._inside):
                    raise OutsideRoot(_client_path(segments))
                return None
        return st


def _deepest_checked(segments: Segments, checked: set) -> int:
    """How many of ``segments`` lead to a path in ``checked`` (``segments`` itself is not in it).

    The parent is tried first, the common case; else a binary search,
    which is right because every prefix of a checked path was checked
    before it. Walking up one level at a time would slice and hash a
    prefix per level: quadratic in the depth.
    """
    depth = len(segments)
    if depth > 1 and segments[: depth - 1] in checked:
        return depth - 1
    found, missing = 0, depth - 1 if depth > 1 else depth
    while missing - found > 1:
        middle = (found + missing) // 2
        if segments[:middle] in checked:
            found = middle
        else:
            missing = middle
    return found


@functools.lru_cache(maxsize=64)
def _served_root(root: str) -> _Root:
    return _Root(root)


class _Caller:
    """A caller's root and rights, found again from the token in its URLs."""

    __slots__ = ("root", "writable", "url_prefix", "__weakref__")

    def __init__(self, root: _Root, writable: Writable, token: str) -> None:
        self.root = root
        self.writable = writable
        self.url_prefix = f"{_SCHEME}{token}://"


_callers: "weakref.WeakValueDictionary[str, _Caller]" = weakref.WeakValueDictionary()


def backing_transport(root: Union[str, os.PathLike], writable: Writable) -> Transport:
    """Return a transport on ``root`` for one caller with the rights ``writable``.

    The transport's client path ``/`` is ``root``.  Raises NotADirectory if
    ``root`` is not a directory.  Cheap enough to call per connection.
    """
    served = _served_root(os.fspath(root))
    token = secrets.token_hex(8)
    caller = _Caller(served, writable, token)
    _callers[token] = caller
    return JailTransport(caller, ())


def _file_mode(mode: Optional[int]) -> Optional[int]:
    """A client's file mode without setuid, setgid, sticky and write for others.

    Breezy sends the modes of the repository's own files, so group write
    is kept; a file that ran with the server account's rights, or that
    anyone on the host could change, is never what a client should make.
    """
    return None if mode is None else mode & 0o775


def _dir_mode(mode: Optional[int]) -> Optional[int]:
    """A client's directory mode without setuid, sticky and write for others; setgid stays.

    A setgid directory gives new entries its group: Breezy asks for it
    when the repository's directory has it, for a group-shared repository.
    """
    return None if mode is None else mode & 0o2775


def _client_path(segments: Segments) -> str:
    return "/" + "/".join(segments)


def _os_error(error: OSError, segments: Segments) -> errors.TransportError:
    """A TransportError for ``error`` that names the client path, and no local one.

    The error's own text is not used: it may quote local paths (Breezy's
    rename adds both names to ``strerror``).
    """
    reason = os.strerror(error.errno) if error.errno else type(error).__name__
    return errors.TransportError(f"{_client_path(segments)}: {reason}")


def _open_url(url: str) -> JailTransport:
    """Transport factory for ``smartserve-jail-<token>:///path`` URLs."""
    token, sep, path = url[len(_SCHEME) :].partition("://")
    caller = _callers.get(token)
    if not sep or caller is None:
        raise errors.PathError(url, "not a served location")
    raw_path, parameters = urlutils.split_segment_parameters(path)
    segments = _normalise(_unescape(raw_path))
    caller.root.check(segments)
    transport = JailTransport(caller, segments)
    for name, value in parameters.items():
        transport.set_segment_parameter(name, value)
    return transport


register_transport(_SCHEME, _open_url)


class JailTransport(Transport):
    """A transport confined to a served root, writing only where its caller may.

    See the module docstring for the checks every method makes.
    """

    def __init__(self, caller: _Caller, segments: Segments) -> None:
        self._caller = caller
        self._segments_here = segments
        path = urlutils.escape(_client_path(segments))
        super().__init__(caller.url_prefix + path.rstrip("/") + "/")

    def _segments(self, relpath: Optional[str]) -> Segments:
        relpath = relpath or "."
        if len(relpath) <= _CACHED_PATH:
            return _parse_cached(relpath, self._segments_here)
        return _normalise(_unescape(relpath), self._segments_here)

    def _resolve(
        self, relpath: Optional[str], *, write: bool = False, sibling: bool = False
    ) -> Segments:
        """Normalise ``relpath`` and apply the write and symlink checks.

        ``sibling`` is for atomic puts, which write a temporary file beside
        the target: the parent directory must be writable too. No write
        may name the root itself (ServedRoot).
        """
        segments = self._segments(relpath)
        writable = self._caller.writable
        if write and not writable.allows_segments(segments):
            raise errors.TransportNotPossible(_READONLY)
        if write and not segments:
            raise ServedRoot()
        if sibling and not writable.allows_segments(segments[:-1]):
            raise errors.TransportNotPossible(_READONLY)
        self._caller.root.check(segments)
        return segments

    def _local(self, method: str, segments: Segments, *args, **kwargs):
        """Run a LocalTransport method on the normalised path, reporting the client path on errors."""
        local_relpath = urlutils.escape("/".join(segments)) or "."
        try:
            return getattr(self._caller.root.local, method)(
                local_relpath, *args, **kwargs
            )
        except errors.PathError as e:
            e.path = _client_path(segments)
            e.extra = ""
            raise
        except errors.TransportError as e:
            # LocalTransport's generic error (ENAMETOOLONG, EISDIR...) quotes the local path.
            if not isinstance(e.orig_error, OSError):
                raise
            raise _os_error(e.orig_error, segments) from None
        except OSError as e:
            # Errors LocalTransport leaves untranslated (EISDIR on put, ENOSPC...).
            path = _client_path(segments)
            self._translate_error(e, path, raise_generic=False)
            raise _os_error(e, segments) from None

    def _changing_names(self, method: str, segments: Segments, *args):
        """Run a method that removes or moves a name, then forget the checked directories."""
        try:
            return self._local(method, segments, *args)
        finally:
            self._caller.root.forget_checked()

    def forget_checked(self) -> None:
        """Look at the file system afresh for the next checks; called as each request begins."""
        self._caller.root.forget_checked()

    # Locations

    def abspath(self, relpath):
        """Return this transport's URL for ``relpath``; it reopens with the same rights."""
        return self._caller.url_prefix + urlutils.escape(
            _client_path(self._segments(relpath))
        )

    def clone(self, offset=None):
        """Return a transport at ``offset`` with the same rights; refused if it resolves outside."""
        return JailTransport(self._caller, self._resolve(offset))

    def external_url(self):
        """Return ``base``: Breezy can reopen it, and it keeps the caller's rights."""
        return self.base

    def local_abspath(self, relpath):
        """Refuse: a local path would let callers bypass the checks."""
        raise errors.NotLocalUrl(self.abspath(relpath))

    def is_readonly(self):
        """True when the caller may write nowhere."""
        return self._caller.writable.is_nowhere

    def listable(self):
        """The jail can list directories."""
        return True

    def _can_roundtrip_unix_modebits(self):
        return self._caller.root.local._can_roundtrip_unix_modebits()

    # Reads

    def has(self, relpath):
        """See Transport.has."""
        return self._local("has", self._resolve(relpath))

    def _direct_path(self, segments: Segments) -> Optional[str]:
        """The local path of checked ``segments`` to read directly, or None to go through LocalTransport.

        LocalTransport flushes this process's open write streams before a
        read, so with any open the read goes through it; so does the root.
        A direct read that fails goes through it again, so that errors (and
        a directory's late error) come out exactly as Breezy's.
        """
        if not segments or getattr(breezy_transport, "_file_streams", True):
            return None
        return "/".join((self._caller.root.real, *segments))

    def get(self, relpath):
        """See Transport.get; ``readv`` goes through it."""
        segments = self._resolve(relpath)
        path = self._direct_path(segments)
        if path is not None:
            try:
                return open(path, "rb")
            except OSError:
                pass
        return self._local("get", segments)

    def _seek_and_read(self, fp, offsets, relpath="<unknown>"):
        """See Transport._seek_and_read; a directory is a ``ReadError``, as for ``get``.

        ``get`` of a directory hands back Breezy's ``LateReadError``, which
        raises only when read and cannot seek: ``readv`` of a directory
        failed with an ``AttributeError`` inside the server instead.
        """
        if isinstance(fp, breezy_transport.LateReadError):
            fp.read()  # raises ReadError
        return super()._seek_and_read(fp, offsets, relpath)

    def get_bytes(self, relpath):
        """See Transport.get_bytes, with plain system calls where possible.

        A Python file object costs four system calls more than the read
        itself (fstat, isatty, two lseeks); a small ``get`` is mostly these.
        """
        path = self._direct_path(self._resolve(relpath))
        if path is not None:
            try:
                return _read_whole(path)
            except OSError:
                pass
        return super().get_bytes(relpath)

    def stat(self, relpath):
        """See Transport.stat."""
        return self._local("stat", self._resolve(relpath))

    def file_size(self, relpath) -> Optional[int]:
        """The size of the regular file at ``relpath``, or None if there is none the caller may read."""
        try:
            segments = self._segments(relpath)
            root = self._caller.root
            st = root.check(segments)
            if st is None and segments:
                st = os.stat("/".join((root.real, *segments)))
        except (OSError, errors.BzrError):
            return None
        return st.st_size if st is not None and S_ISREG(st.st_mode) else None

    def list_dir(self, relpath):
        """See Transport.list_dir."""
        return self._local("list_dir", self._resolve(relpath))

    def iter_files_recursive(self):
        """Yield the escaped relative paths of files below here, skipping entries that leave the root."""
        queue = list(self.list_dir("."))
        while queue:
            relpath = queue.pop(0)
            try:
                st = self.stat(relpath)
            except OutsideRoot:
                continue
            if S_ISDIR(st.st_mode):
                for i, name in enumerate(self.list_dir(relpath)):
                    queue.insert(i, relpath + "/" + name)
            else:
                yield relpath

    def lock_read(self, relpath):
        """See Transport.lock_read."""
        return self._local("lock_read", self._resolve(relpath))

    # Writes

    def put_file(self, relpath, f, mode=None):
        """See Transport.put_file."""
        segments = self._resolve(relpath, write=True, sibling=True)
        return self._local("put_file", segments, f, _file_mode(mode))

    def put_bytes(self, relpath, raw_bytes, mode=None):
        """See Transport.put_bytes."""
        segments = self._resolve(relpath, write=True, sibling=True)
        return self._local("put_bytes", segments, raw_bytes, _file_mode(mode))

    def _put_non_atomic(self, method, relpath, data, mode, create_parent_dir, dir_mode):
        segments = self._resolve(relpath, write=True)
        # Creating the parent is a write of its own, allowed only where the parent is writable.
        create_parent_dir = create_parent_dir and self._caller.writable.allows_segments(
            segments[:-1]
        )
        return self._local(
            method,
            segments,
            data,
            mode=_file_mode(mode),
            create_parent_dir=create_parent_dir,
            dir_mode=_dir_mode(dir_mode),
        )

    def put_file_non_atomic(
        self, relpath, f, mode=None, create_parent_dir=False, dir_mode=None
    ):
        """See Transport.put_file_non_atomic."""
        return self._put_non_atomic(
            "put_file_non_atomic", relpath, f, mode, create_parent_dir, dir_mode
        )

    def put_bytes_non_atomic(
        self, relpath, raw_bytes, mode=None, create_parent_dir=False, dir_mode=None
    ):
        """See Transport.put_bytes_non_atomic."""
        return self._put_non_atomic(
            "put_bytes_non_atomic", relpath, raw_bytes, mode, create_parent_dir, dir_mode
        )

    def append_file(self, relpath, f, mode=None):
        """See Transport.append_file."""
        return self._local("append_file", self._resolve(relpath, write=True), f, _file_mode(mode))

    def append_bytes(self, relpath, data, mode=None):
        """See Transport.append_bytes."""
        segments = self._resolve(relpath, write=True)
        return self._local("append_bytes", segments, data, _file_mode(mode))

    def open_write_stream(self, relpath, mode=None):
        """See Transport.open_write_stream."""
        segments = self._resolve(relpath, write=True)
        return self._local("open_write_stream", segments, _file_mode(mode))

    def mkdir(self, relpath, mode=None):
        """See Transport.mkdir; the root exists, as ``ensure_base`` expects to be told."""
        segments = self._segments(relpath)
        if not segments and self._caller.writable.allows_segments(segments):
            raise FileExists("/")
        return self._local("mkdir", self._resolve(relpath, write=True), _dir_mode(mode))

    def rmdir(self, relpath):
        """See Transport.rmdir."""
        return self._changing_names("rmdir", self._resolve(relpath, write=True))

    def delete(self, relpath):
        """See Transport.delete."""
        return self._changing_names("delete", self._resolve(relpath, write=True))

    def lock_write(self, relpath):
        """See Transport.lock_write."""
        return self._local("lock_write", self._resolve(relpath, write=True))

    def _two_paths(self, method, rel_from, rel_to):
        source = self._resolve(rel_from, write=True)
        target = self._resolve(rel_to, write=True)
        to_local = urlutils.escape("/".join(target)) or "."
        return self._changing_names(method, source, to_local)

    def rename(self, rel_from, rel_to):
        """See Transport.rename; both paths must be writable."""
        return self._two_paths("rename", rel_from, rel_to)

    def move(self, rel_from, rel_to):
        """See Transport.move; both paths must be writable."""
        return self._two_paths("move", rel_from, rel_to)

    def copy(self, rel_from, rel_to):
        """See Transport.copy: a checked get and put.

        LocalTransport's copy would copy into ``rel_to`` when it is a
        directory, following a symlink found there.
        """
        self._resolve(rel_from)
        self._resolve(rel_to, write=True, sibling=True)
        return super().copy(rel_from, rel_to)

    def delete_tree(self, relpath):
        """See Transport.delete_tree; refused before anything is deleted."""
        self._resolve(relpath, write=True)
        try:
            return super().delete_tree(relpath)
        finally:
            self._caller.root.forget_checked()

    def copy_tree(self, from_relpath, to_relpath):
        """See Transport.copy_tree; refused before anything is copied."""
        self._resolve(from_relpath)
        self._resolve(to_relpath, write=True)
        return super().copy_tree(from_relpath, to_relpath)

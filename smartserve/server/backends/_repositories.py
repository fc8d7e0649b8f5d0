"""The repositories a request opens, freed once the request is done with them.

Every Breezy pack repository (format 2a and the older pack formats) keeps a
``vcsgraph`` ``CachingParentsProvider`` in ``_unstacked_provider`` that
refers back to the repository through a bound method, or the repository
itself. The provider is compiled code: the garbage collector tracks it but
cannot see what it refers to, so the cycle repository, provider, repository
is never collected, and every request that opens a repository would keep
it, its indices and their caches (tens of KiB, some 250 KiB after a
``Repository.get_stream_1.19`` of 60 revisions) for the life of the
process. ``brz serve`` leaks alike, but smartserve serves every
connection from one process.

Breezy's server keeps nothing of a request in memory once it has answered
(a lock or a write group outlives a request on disk, as a token), so a
repository a request opened is of no more use once its reply is made, its
response stream is closed, or its connection is lost. The request's
``OpenedRepositories`` notes each repository made in a thread while it
``collects``, and ``release`` then drops their providers, which leaves a
cycle the collector frees. Repositories are noted where they are made,
``PackRepository.__init__``, which ``track_opened_repositories`` wraps
once per process: Breezy offers no hook on opening a repository, and a
repository is opened by many paths (a request's path, a branch's, the
fallbacks of a stacked branch). Outside a request the wrapper does nothing.
"""

from __future__ import annotations

import functools
import threading
import weakref

__all__ = ["OpenedRepositories", "track_opened_repositories"]

_running = threading.local()


class OpenedRepositories:
    """The repositories made by one request, held weakly until ``release``."""

    __slots__ = ("_opened",)

    def __init__(self) -> None:
        self._opened: list = []

    def collecting(self) -> "_Collecting":
        """Note every repository made in this thread inside the ``with`` block."""
        return _Collecting(self)

    def release(self) -> None:
        """Break the provider cycle of each repository noted so far; call once nothing uses them any more."""
        opened, self._opened = self._opened, []
        for ref in opened:
            repository = ref()
            if repository is not None:
                repository._unstacked_provider = None


class _Collecting:
    """The context of ``OpenedRepositories.collecting``: a class, as it runs around every step of a request."""

    __slots__ = ("_opened", "_previous")

    def __init__(self, opened: OpenedRepositories) -> None:
        self._opened = opened

    def __enter__(self) -> OpenedRepositories:
        self._previous = getattr(_running, "opened", None)
        _running.opened = self._opened
        return self._opened

    def __exit__(self, *exc_info) -> None:
        _running.opened = self._previous


def _note(repository) -> None:
    opened = getattr(_running, "opened", None)
    if opened is not None:
        opened._opened.append(weakref.ref(repository))


def track_opened_repositories() -> None:
    """Make every Breezy pack repository made inside ``OpenedRepositories.collecting`` noted there."""
    from breezy.bzr.pack_repo import PackRepository

    made = PackRepository.__init__
    if getattr(made, "_notes_opened", False):
        return

    @functools.wraps(made)
    def __init__(self, *args, **kwargs):
        made(self, *args, **kwargs)
        _note(self)

    __init__._notes_opened = True
    PackRepository.__init__ = __init__

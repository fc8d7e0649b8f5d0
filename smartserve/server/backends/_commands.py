"""Breezy's request registry, with smartserve's subclasses in place of the requests they replace.

Imported only once Breezy is set up (see ``bzr._registry``).
"""

from __future__ import annotations

from breezy.bzr.smart import request

from ._large_reads import StreamedGetRequest, StreamedReadvRequest, StreamedTarballRequest
from ._repairs import PackingPackRequest


class Commands:
    """Looks a verb up in Breezy's registry, unless smartserve has its own request for it."""

    _OVERRIDES = {
        b"get": StreamedGetRequest,
        b"readv": StreamedReadvRequest,
        b"Repository.tarball": StreamedTarballRequest,
        b"Repository.pack": PackingPackRequest,
    }

    def get(self, verb: bytes):
        override = self._OVERRIDES.get(verb)
        return override if override is not None else request.request_handlers.get(verb)


COMMANDS = Commands()

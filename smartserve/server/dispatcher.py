"""Verb to request run, after checking the caller may use the verb."""

from __future__ import annotations

from typing import Tuple

from ..verbs import VerbClass, classify
from .caller import Caller
from .interfaces import IBackend, IRequestRun
from .reply import Reply

__all__ = ["Dispatcher", "Refusal"]


class Refusal(Exception):
    """A request the server will not run; ``reply`` is the error response."""

    def __init__(self, reply: Reply):
        super().__init__(reply.outcome)
        self.reply = reply


class Dispatcher:
    """Routes requests to a backend and enforces rights by verb class.

    A read-only caller may run only ``read`` verbs: anything else is refused
    before it runs, with the error ``brz`` shows for a read-only transport.
    """

    def __init__(self, backend: IBackend):
        self._backend = backend

    def start(self, caller: Caller, args: Tuple) -> IRequestRun:
        """Return the run of request ``args``; raises ``Refusal`` if it may not run."""
        verb = args[0]
        if not self._backend.knows(verb):
            raise Refusal(Reply((b"UnknownMethod", verb), success=False))
        if caller.read_only and classify(verb) is not VerbClass.READ:
            raise Refusal(Reply((b"ReadOnlyError",), success=False))
        return self._backend.start(caller, args)

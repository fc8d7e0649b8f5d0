"""Breezy's requests that do not do what they say over the smart protocol, made to.

Imported only once Breezy is set up (see ``bzr._registry``).
"""

from __future__ import annotations

from breezy.bzr.smart import repository, request


class PackingPackRequest(repository.SmartServerRepositoryPack):
    """``Repository.pack`` that packs.

    Breezy's own takes "no hint" (pack everything) to be a ``str`` body
    that is empty, and its hint's pack names as ``bytes`` where the pack
    collection names them with ``str``: over the smart protocol, whose
    bodies are ``bytes``, it packs nothing, whatever it is asked, and says
    ``ok`` (``brz pack bzr://...`` leaves every pack as it was). Pack names
    are ASCII (hex digests), as Breezy's client encodes them; a body that
    is not is answered with an error.
    """

    def do_body(self, body_bytes):
        try:
            body = body_bytes.decode("ascii")
        except UnicodeDecodeError:
            return request.FailedSmartServerResponse((b"error", b"ValueError", b"pack names must be ASCII"))
        return super().do_body(body)

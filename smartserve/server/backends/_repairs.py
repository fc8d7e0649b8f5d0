"""Breezy's requests that do not do what they say over the smart protocol, made to, and its request handler
made to answer text that is not UTF-8 with an error reply.

Imported only once Breezy is set up (see ``bzr._registry``).
"""

from __future__ import annotations

from breezy.bzr.smart import repository, request

# How much of the text that failed an error reply quotes, and how much of that comes before the failure.
_QUOTED = 64
_QUOTED_BEFORE = 16


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


class RequestHandler(request.SmartServerRequestHandler):
    """Breezy's request handler, with an error reply for text that is not in its encoding.

    Breezy's translation of a ``UnicodeError`` into an error reply is left
    from Python 2 and raises ``AttributeError``: a request whose path (or
    other text argument) is not UTF-8 failed inside the server, with a
    traceback in the log each time, instead of getting an error reply.
    """

    def _call_converting_errors(self, callable, args, kwargs):
        def call(*args, **kwargs):
            try:
                return callable(*args, **kwargs)
            except UnicodeError as exc:
                return request.FailedSmartServerResponse(unicode_error_args(exc))

        return super()._call_converting_errors(call, args, kwargs)


def translate_error(exc: Exception) -> tuple:
    """Breezy's error reply arguments for ``exc``, which Breezy's own translation fails to make for a ``UnicodeError``."""
    if isinstance(exc, UnicodeError):
        return unicode_error_args(exc)
    return request._translate_error(exc)


def unicode_error_args(exc: UnicodeError) -> tuple:
    """The error reply for ``exc``: Breezy's generic error, quoting the text that failed around the failure.

    As ``("error", b"UnicodeDecodeError", b"not valid utf-8: b'\\xff\\xfe' (invalid start byte at 0)")``.
    """
    if isinstance(exc, (UnicodeDecodeError, UnicodeEncodeError)):
        what = "not valid" if isinstance(exc, UnicodeDecodeError) else "not encodable as"
        text = exc.object
        begin = max(0, exc.start - _QUOTED_BEFORE)
        end = begin + _QUOTED
        quoted = ("..." if begin else "") + repr(text[begin:end]) + ("..." if len(text) > end else "")
        message = f"{what} {exc.encoding}: {quoted} ({exc.reason} at {exc.start})"
    else:
        message = str(exc)
    return (b"error", type(exc).__name__.encode("ascii"), message.encode("utf-8", "backslashreplace"))

"""The seams of the server: what a backend must provide."""

from zope.interface import Attribute, Interface

__all__ = ["IBackend", "IRequestRun", "IBodyStream", "IDrainable"]


class IBackend(Interface):
    """Executes smart requests on behalf of callers."""

    def knows(verb):
        """Return True if ``verb`` (bytes) is a verb this backend can run."""

    def start(caller, args):
        """Return an ``IRequestRun`` for request ``args`` made by ``caller``.

        Cheap and synchronous: nothing runs until ``IRequestRun.advance``.
        Only called for verbs the backend ``knows``.
        """


class IRequestRun(Interface):
    """One request being executed by a backend."""

    def advance(chunks, finished):
        """Run the request further, in the backend's worker pool (or at once, for a cheap request).

        The first call starts it. ``chunks`` are the request body chunks
        received since the previous call; ``finished`` is True once the
        request message has ended. Returns a Deferred that fires with a
        ``Reply`` as soon as the request has produced one (always when
        ``finished``), or with None while it still wants body. A Deferred is
        never started while another is pending. Failures of the request
        itself are Replies, never errbacks.
        """

    def abort():
        """The request goes no further (its connection is gone, or the server refused it): release what it holds."""

    held_body_bytes = Attribute(
        "Bytes of the request body the run holds now (a body kept whole for its handler), read between steps;"
        " counted against the server's memory for request bodies."
    )


class IBodyStream(Interface):
    """A response body produced piece by piece, read with back-pressure."""

    def pull(max_bytes):
        """Return a Deferred firing with the next chunks, about ``max_bytes`` in all.

        The list holds bytes, and may end with one ``StreamFailure`` after
        which nothing follows. An empty list means the stream has ended.
        """

    def close():
        """Stop early and release the stream's resources."""

    description = Attribute("A short text for logs, such as the verb.")


class IDrainable(Interface):
    """A set of connections that can be drained: closed once their work is done.

    Counts are of client connections, and each is counted by one drainable
    only, so that the sum over drainables counts every client once: a smart
    session carried inside an SSH connection is the SSH connection's, and
    counts with it.
    """

    client_connections = Attribute("How many client connections of this set are open now.")
    busy_client_connections = Attribute("How many of those are running a request now.")

    def drain():
        """Close idle connections now and busy ones after their current response.

        From now on no request that has not begun is started, and new
        connections are closed as soon as they are made.
        """

    def wait_closed():
        """Return a Deferred that fires once no connection is open."""

    def abort():
        """Abort every connection still open; return how many client connections that was, counted as above."""

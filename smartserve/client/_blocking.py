"""A blocking facade over ``SmartClient`` for programs that do not run a reactor.

``BlockingClient`` starts Twisted's global reactor in a daemon thread the
first time one is made (unless the reactor already runs in another thread)
and runs each call there, waiting for its result.

Trade-offs:

- There is one reactor per process and it cannot be restarted: once a
  ``BlockingClient`` started it in a thread, the program cannot later run
  the reactor itself in the main thread. Programs that use Twisted
  directly should use ``SmartClient`` instead.
- Calls must come from threads other than the reactor's; a call from the
  reactor thread would wait for itself, so it raises ``RuntimeError``.
- Calls from several threads are fine: they share the pool, each waiting
  for a free connection.
- ``on_chunk`` callbacks run in the reactor thread, not the caller's: keep
  them short and thread-safe, or collect the whole body instead.
- The reactor thread installs no signal handlers, so Ctrl-C reaches the
  main thread as usual; a call in progress is then abandoned, not
  cancelled on the wire.
- A daemon thread dies with the process without a clean shutdown; call
  ``close`` to close connections politely first.
"""

from __future__ import annotations

import threading
from typing import Any

from twisted.internet.threads import blockingCallFromThread
from twisted.python.threadable import isInIOThread

from ._client import SmartClient
from ._protocol import Reply

__all__ = ["BlockingClient"]

_start_lock = threading.Lock()
_reactor_thread = None


def _running_reactor():
    """The global reactor, running in a thread of its own."""
    global _reactor_thread
    from twisted.internet import reactor

    with _start_lock:
        if not reactor.running and _reactor_thread is None:
            _reactor_thread = threading.Thread(
                target=reactor.run, kwargs={"installSignalHandlers": False}, name="smartserve-reactor", daemon=True
            )
            _reactor_thread.start()
    return reactor


class BlockingClient:
    """``SmartClient`` with methods that block until the answer is there.

    Takes the same arguments as ``SmartClient.from_url``. ``call`` returns
    the ``Reply`` or raises what the Deferred would have failed with.
    """

    def __init__(self, url: str, **kwargs: Any):
        self._reactor = _running_reactor()
        self._client: SmartClient = self._in_reactor(lambda: SmartClient.from_url(url, reactor=self._reactor, **kwargs))

    @property
    def client(self) -> SmartClient:
        """The underlying ``SmartClient`` (use it only from the reactor thread)."""
        return self._client

    def call(self, verb: bytes, *args: Any, **kwargs: Any) -> Reply:
        """Call ``verb`` like ``SmartClient.call`` and wait for the ``Reply``."""
        return self._in_reactor(self._client.call, verb, *args, **kwargs)

    def close(self) -> None:
        """Close the client's connections and wait until they are; the reactor thread keeps running."""
        self._in_reactor(self._client.close)

    def __enter__(self) -> "BlockingClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _in_reactor(self, function, *args, **kwargs):
        if isInIOThread():
            raise RuntimeError("BlockingClient cannot be used from the reactor thread; use SmartClient")
        return blockingCallFromThread(self._reactor, function, *args, **kwargs)

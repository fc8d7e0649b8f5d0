"""A blocking facade over ``SmartClient`` for programs that do not run a reactor.

``BlockingClient`` starts Twisted's global reactor in a daemon thread the
first time one is made (unless the reactor already runs in another thread)
and runs each call there, waiting for its result.

Trade-offs:

- There is one reactor per process and it cannot be restarted: once a
  ``BlockingClient`` started it in a thread, the program cannot later run
  the reactor itself in the main thread. Programs that use Twisted
  directly should use ``SmartClient`` instead.
- If the reactor ran and stopped before the first ``BlockingClient``,
  or stops later, ``BlockingClient`` and a call in progress raise
  ``RuntimeError`` instead of waiting for it forever.
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
from queue import Queue
from typing import Any, Set

from twisted.internet.defer import maybeDeferred
from twisted.python.failure import Failure
from twisted.python.threadable import isInIOThread

from ._client import SmartClient
from ._protocol import Reply

__all__ = ["BlockingClient"]

_lock = threading.Lock()
_reactor_thread = None
_watching = False
_reactor_stopped = False
_waiting: Set[Queue] = set()  # one per call waiting for the reactor


def _run_reactor(reactor, ended: threading.Event, errors: list) -> None:
    try:
        reactor.run(installSignalHandlers=False)
    except Exception as exc:  # ReactorNotRestartable: it ran and stopped before
        errors.append(exc)
    finally:
        ended.set()


def _stopped() -> None:
    """The reactor stopped: the calls waiting for it fail instead of waiting forever."""
    global _reactor_stopped
    with _lock:
        _reactor_stopped = True
        waiting = list(_waiting)
    for queue in waiting:
        queue.put(Failure(RuntimeError("the reactor stopped before the call ended")))


def _running_reactor():
    """The global reactor, running in a thread of its own unless it already runs.

    Raises ``RuntimeError`` if it cannot run: it ran before in this process
    and stopped, and a reactor cannot be restarted.
    """
    global _reactor_thread, _watching
    from twisted.internet import reactor

    with _lock:
        if _reactor_stopped:
            raise RuntimeError("the reactor stopped; BlockingClient needs it running")
        if reactor.running:
            if not _watching:
                reactor.callFromThread(reactor.addSystemEventTrigger, "after", "shutdown", _stopped)
                _watching = True
        elif _reactor_thread is None:
            if not _watching:
                reactor.addSystemEventTrigger("after", "shutdown", _stopped)
                _watching = True
            running, errors = threading.Event(), []
            reactor.callWhenRunning(running.set)
            thread = threading.Thread(
                target=_run_reactor, args=(reactor, running, errors), name="smartserve-reactor", daemon=True
            )
            thread.start()
            running.wait()
            if errors:
                raise RuntimeError(
                    f"BlockingClient cannot start the reactor ({type(errors[0]).__name__}): "
                    "it ran before in this process, and a reactor cannot be restarted"
                ) from errors[0]
            _reactor_thread = thread
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
        """``function``'s result, or its Deferred's, computed in the reactor thread."""
        answer: Queue = Queue()
        with _lock:
            if _reactor_stopped:
                raise RuntimeError("the reactor stopped; BlockingClient needs it running")
            if isInIOThread():
                raise RuntimeError("BlockingClient cannot be used from the reactor thread; use SmartClient")
            _waiting.add(answer)
        try:
            self._reactor.callFromThread(lambda: maybeDeferred(function, *args, **kwargs).addBoth(answer.put))
            result = answer.get()
        finally:
            with _lock:
                _waiting.discard(answer)
        if isinstance(result, Failure):
            result.raiseException()
        return result

"""A blocking smart-protocol client for the soak: one OpenSSH session, resends by the table.

Each ``SoakClient`` talks v3 through a real ``ssh ... bzr serve --inet``
process, reading and writing its pipes with smartserve's sans-IO codec.
A new session starts with a ``hello`` so that a failure to connect is never
mistaken for a request lost in flight. Before each request the session is
probed: an EOF already waiting means the server closed it (a drain), so a
new session is made and nothing is counted.

When a session dies under a request, ``smartserve.verbs.may_resend``
decides, from the verb's class, how far the request got and whether the
server sent exit status 75 (it was draining and did not start the request),
whether to send it again. A verb that may not be resent fails with
``OutcomeUnknown``: the soak then neither counts it as acknowledged nor as
lost.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import random
import select
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

from smartserve.protocol import (
    NEED_DATA,
    PAUSED,
    BodyChunk,
    BodyError,
    Connection,
    ConnectionClosed,
    EndOfMessage,
    ProtocolError,
    Request,
    Response,
    Role,
)
from smartserve.verbs import FailurePoint, classify, may_resend

__all__ = ["SoakClient", "LibraryClient", "RawWorker", "RawProcess", "Call", "CallFailed", "OutcomeUnknown", "Lost",
           "DRAIN_EXIT_STATUS"]

DRAIN_EXIT_STATUS = 75
_SERVE = "bzr serve --inet --directory=/ --allow-writes"


class CallFailed(Exception):
    """A call that did not succeed; ``reason`` is a short word for the report."""

    reason = "failed"


class OutcomeUnknown(CallFailed):
    """The request may have run, and its verb may not be sent again."""

    reason = "outcome-unknown"


class GaveUp(CallFailed):
    """Resends or reconnects ran out before the call's deadline."""

    reason = "gave-up"


class Refused(CallFailed):
    """The server answered with an error."""

    reason = "error-reply"


class Lost(Exception):
    """The session ended under a request, at ``point``; ``drained`` if exit status was 75."""

    def __init__(self, point: FailurePoint, drained: bool, why: str):
        super().__init__(why)
        self.point = point
        self.drained = drained


class _Session:
    """One ``ssh`` process speaking the smart protocol on its pipes."""

    def __init__(self, ssh_command: List[str], stderr):
        self.process = subprocess.Popen(
            [*ssh_command, _SERVE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, bufsize=0
        )
        self.codec = Connection(Role.CLIENT)
        self._eof = False

    def probe_closed(self) -> bool:
        """True if the server has already closed the session (EOF waiting, or ssh gone)."""
        if self.process.poll() is not None:
            return True
        readable, _, _ = select.select([self.process.stdout], [], [], 0)
        return bool(readable)  # between requests, anything readable is an EOF

    def call(self, args: Tuple, body: Optional[bytes], timeout: float) -> Tuple[Tuple, bytes, bool]:
        """Send one request, return ``(args, body, success)``; raises ``Lost``."""
        data = self.codec.send(Request(args))
        if body is not None:
            data += self.codec.send(BodyChunk(body))
        data += self.codec.send(EndOfMessage())
        try:
            self.process.stdin.write(data)
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            raise Lost(FailurePoint.DURING_WRITE, False, "ssh gone while writing") from None
        deadline = time.monotonic() + timeout
        response = None
        chunks = []
        received_any = False
        while True:
            try:
                event = self.codec.next_event()
            except ProtocolError as exc:
                raise Lost(FailurePoint.DURING_RESPONSE, False, f"protocol error: {exc}") from None
            if event is NEED_DATA or event is PAUSED:
                remaining = deadline - time.monotonic()
                readable, _, _ = select.select([self.process.stdout], [], [], max(remaining, 0))
                if not readable:
                    raise Lost(FailurePoint.DURING_RESPONSE if received_any else FailurePoint.AFTER_WRITE,
                               False, "no response before the deadline")
                piece = os.read(self.process.stdout.fileno(), 65536)
                if piece:
                    received_any = True
                    self.codec.receive_data(piece)
                    continue
                self.codec.receive_data(b"")
                if not received_any:
                    drained = self._exit_status() == DRAIN_EXIT_STATUS
                    raise Lost(FailurePoint.AFTER_WRITE, drained, f"EOF before the response (exit {self._exit_status()})")
                continue
            kind = type(event)
            if kind is Response:
                response = event
            elif kind is BodyChunk:
                chunks.append(event.data)
            elif kind is BodyError:
                response = Response(event.args, success=False)
            elif kind is EndOfMessage:
                self.codec.start_next_cycle()
                return response.args, b"".join(chunks), response.success
            elif kind is ConnectionClosed:
                raise Lost(FailurePoint.DURING_RESPONSE, False, "EOF in the middle of the response")

    def _exit_status(self) -> Optional[int]:
        try:
            return self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
            except OSError:
                pass
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pipe in (self.process.stdout, self.process.stdin):
            try:
                pipe.close()
            except OSError:
                pass


class SoakClient:
    """Calls through one session at a time, reconnecting and resending by the table.

    ``stats`` counts reconnects after a probe, resends by reason, and new
    sessions that failed their ``hello``.
    """

    def __init__(self, ssh_command: List[str], *, stderr=subprocess.DEVNULL, call_timeout: float = 60.0,
                 max_resends: int = 6, rng: Optional[random.Random] = None):
        self.ssh_command = ssh_command
        self.stderr = stderr
        self.call_timeout = call_timeout
        self.max_resends = max_resends
        self.rng = rng or random.Random()
        self.session: Optional[_Session] = None
        self.stats = {"probe_reconnects": 0, "connect_failures": 0, "resends": 0, "drain_resends": 0}

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    def _connected(self, deadline: float) -> _Session:
        attempt = 0
        while True:
            if self.session is not None and not self.session.probe_closed():
                return self.session
            if self.session is not None:
                self.session.close()
                self.session = None
                self.stats["probe_reconnects"] += 1
            session = _Session(self.ssh_command, self.stderr)
            try:
                session.call((b"hello",), None, timeout=max(deadline - time.monotonic(), 0.1))
            except Lost:
                session.close()
                self.stats["connect_failures"] += 1
                attempt += 1
                delay = min(0.05 * 2 ** attempt, 1.0) * (0.5 + self.rng.random())
                if time.monotonic() + delay > deadline:
                    raise GaveUp("could not connect before the deadline") from None
                time.sleep(delay)  # backoff between connection attempts
                continue
            self.session = session
            return session

    def call(self, args: Tuple, body: Optional[bytes] = None) -> Tuple[Tuple, bytes]:
        """Run one request; return ``(args, body)`` of a successful reply.

        Raises ``Refused`` for an error reply, ``OutcomeUnknown`` when the
        request may have run and may not be resent, ``GaveUp`` otherwise.
        """
        verb_class = classify(args[0])
        deadline = time.monotonic() + self.call_timeout
        resends = 0
        while True:
            session = self._connected(deadline)
            try:
                reply, reply_body, success = session.call(args, body, max(deadline - time.monotonic(), 0.1))
            except Lost as lost:
                session.close()
                self.session = None
                if not may_resend(verb_class, lost.point, not_run=lost.drained):
                    raise OutcomeUnknown(f"{args[0].decode()} lost {lost.point.name}: {lost}") from None
                if resends >= self.max_resends or time.monotonic() > deadline:
                    raise GaveUp(f"{args[0].decode()}: {resends} resends, last {lost}") from None
                resends += 1
                self.stats["resends"] += 1
                if lost.drained:
                    self.stats["drain_resends"] += 1
                continue
            if not success:
                raise Refused(repr(reply))
            return reply, reply_body


class NotRun(CallFailed):
    """The client says the request surely did not run, and it could not be sent again."""

    reason = "not-run"


class LibraryClient:
    """The same ``call`` as ``SoakClient``, made by ``smartserve.client.BlockingClient`` over its own SSH.

    ``max_connection_age`` is the client's ``RetryPolicy`` setting. ``metrics`` is a ``smartserve.metrics.ClientMetrics`` that the client
    feeds with its reconnects and resends.
    """

    def __init__(self, url: str, identity_file: str, known_hosts: str, max_connection_age: Optional[float], metrics,
                 *, call_timeout: float = 60.0):
        from smartserve.client import BlockingClient, RetryPolicy
        from smartserve.client import SSHOptions

        policy = RetryPolicy(max_resends=6, max_connect_attempts=12, backoff_max=1.0, deadline=call_timeout,
                             max_connection_age=max_connection_age)
        ssh = SSHOptions(identity_files=[identity_file], use_agent=False, known_hosts=known_hosts)
        self._client = BlockingClient(url, policy=policy, ssh=ssh, metrics=metrics)
        self.stats = self._client.client.stats

    def call(self, args: Tuple, body: Optional[bytes] = None) -> Tuple[Tuple, bytes]:
        """Run one request; raise a ``CallFailed`` subclass named after the client's error."""
        from smartserve.client import DeadlineExceeded, RemoteError, TransportFailure
        from smartserve.client import OutcomeUnknown as ClientOutcomeUnknown

        try:
            reply = self._client.call(args[0], *args[1:], body=body)
        except ClientOutcomeUnknown as exc:
            raise OutcomeUnknown(str(exc)) from None
        except RemoteError as exc:
            raise Refused(str(exc)) from None
        except TransportFailure as exc:
            raise NotRun(f"{type(exc).__name__}: {exc}") from None
        except DeadlineExceeded as exc:
            raise GaveUp(str(exc)) from None
        except Exception as exc:
            failure = CallFailed(f"{type(exc).__name__}: {exc}")
            failure.reason = type(exc).__name__
            raise failure from None
        return reply.args, reply.body or b""

    def close(self) -> None:
        self._client.close()


# The raw clients' load ----------------------------------------------------


@dataclass
class Call:
    """One client call: what, when, how long, and how it ended."""

    client: str
    kind: str  # get / put / append / brz-push / brz-pull / brz-branch
    verb_class: str
    started: float  # time.monotonic(), which every process on the host shares
    finished: float
    ok: bool
    reason: str = ""

    @property
    def seconds(self) -> float:
        return self.finished - self.started


class RawWorker(threading.Thread):
    """Small gets, puts of unique files and appends of unique journal lines, one call at a time.

    ``record`` takes each ``Call`` (``record.call``) and a line for each
    failure (``record.note``); ``stop`` ends the loop.
    """

    def __init__(self, index: int, make_client, record, stop, seed: int):
        super().__init__(name=f"raw-{index}", daemon=True)
        self.name_ = f"client-{index}"
        self.record, self.stopping = record, stop
        self.rng = random.Random(seed)
        self.client = make_client(self.name_, self.rng)
        self.acked_appends: List[bytes] = []
        self.unknown_appends: List[bytes] = []
        self.not_run_appends: List[bytes] = []
        self.acked_puts: dict = {}
        self.seq = 0

    def run(self) -> None:
        journal = f"soak/journal-{self.name_}".encode()
        while not self.stopping.is_set():
            self.seq += 1
            roll = self.rng.random()
            if roll < 0.5:
                kind, args, body = "get", (b"get", b"soak/small.txt"), None
            elif roll < 0.75:
                kind = "put"
                path = f"soak/put-{self.name_}-{self.seq}".encode()
                content = f"{self.name_} put {self.seq}\n".encode()
                args, body = (b"put", path, b""), content
            else:
                kind = "append"
                line = f"{self.name_} seq-{self.seq}\n".encode()
                args, body = (b"append", journal, b""), line
            verb_class = classify(args[0]).value
            started = time.monotonic()
            try:
                self.client.call(args, body)
            except CallFailed as failure:
                self.record.call(Call(self.name_, kind, verb_class, started, time.monotonic(), False, failure.reason))
                if kind == "append":
                    (self.not_run_appends if failure.reason == "not-run" else self.unknown_appends).append(body)
                self.record.note(f"{self.name_} {kind} failed: {failure.reason}: {failure}")
                self.stopping.wait(0.5)  # a failed client backs off before its next call
            else:
                self.record.call(Call(self.name_, kind, verb_class, started, time.monotonic(), True))
                if kind == "append":
                    self.acked_appends.append(body)
                elif kind == "put":
                    self.acked_puts[args[1]] = body
            self.stopping.wait(self.rng.uniform(0.01, 0.1))
        self.client.close()


class _PipeRecord:
    """A child process's record: each call and note goes to the parent as it happens."""

    def __init__(self, pipe):
        self._pipe = pipe

    def call(self, call: Call) -> None:
        self._pipe.send(("call", call))

    def note(self, text: str) -> None:
        self._pipe.send(("note", text))


def _run_raw_process(index: int, seed: int, library_args: tuple, stop, pipe) -> None:
    """The body of a ``RawProcess``: one ``RawWorker`` on a ``LibraryClient`` with its own reactor."""

    def make_client(name, rng):
        return LibraryClient(*library_args, None)

    worker = RawWorker(index, make_client, _PipeRecord(pipe), stop, seed)
    try:
        worker.run()
    finally:
        pipe.send(("done", {
            "acked_appends": worker.acked_appends,
            "unknown_appends": worker.unknown_appends,
            "not_run_appends": worker.not_run_appends,
            "acked_puts": worker.acked_puts,
            "stats": dataclasses.asdict(worker.client.stats),
        }))
        pipe.close()


class RawProcess:
    """A ``RawWorker`` on the library client in a process of its own, as a real client would be.

    In one process, every client's SSH logins and calls share one reactor
    thread, so one client's reconnect holds up the others' calls. The
    attributes the checks read (``acked_appends``, ``client.stats``, ...)
    are filled in when the process ends. ``stop`` must come from
    ``CONTEXT``.
    """

    CONTEXT = multiprocessing.get_context("spawn")

    def __init__(self, index: int, seed: int, library_args: tuple, record, stop):
        self.name_ = f"client-{index}"
        self.record = record
        self.acked_appends: List[bytes] = []
        self.unknown_appends: List[bytes] = []
        self.not_run_appends: List[bytes] = []
        self.acked_puts: dict = {}
        self.client = type("Finished", (), {"stats": {}})()
        self._pipe, self._child_end = self.CONTEXT.Pipe(duplex=False)
        self._process = self.CONTEXT.Process(target=_run_raw_process, name=f"raw-{index}", daemon=True,
                                             args=(index, seed, library_args, stop, self._child_end))
        self._reader = threading.Thread(target=self._read, name=f"raw-{index}-pipe", daemon=True)

    def start(self) -> None:
        self._process.start()
        self._child_end.close()  # so that the reader sees EOF if the child dies
        self._reader.start()

    def join(self, timeout: Optional[float] = None) -> None:
        self._reader.join(timeout)

    def is_alive(self) -> bool:
        return self._reader.is_alive()

    def _read(self) -> None:
        while True:
            try:
                kind, payload = self._pipe.recv()
            except EOFError:
                self.record.note(f"{self.name_}: its process ended without its results")
                return
            if kind == "call":
                self.record.call(payload)
            elif kind == "note":
                self.record.note(payload)
            else:
                for name, value in payload.items():
                    if name == "stats":
                        self.client.stats = value
                    else:
                        setattr(self, name, value)
                return

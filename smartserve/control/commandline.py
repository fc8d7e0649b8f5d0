"""``smartserve drain`` and ``smartserve status``: the control socket for people and deploy scripts."""

from __future__ import annotations

import json
import os
import sys
from typing import TextIO

from twisted.internet import defer, task

from . import DEFAULT_ANSWER_TIMEOUT, client
from .commands import BadTimeout

__all__ = [
    "run_drain",
    "run_status",
    "EXIT_DRAINED",
    "EXIT_TIMED_OUT",
    "EXIT_NO_SERVER",
    "EXIT_USAGE",
    "EXIT_LOST",
]

EXIT_DRAINED = 0
EXIT_TIMED_OUT = 1
EXIT_NO_SERVER = 2
EXIT_USAGE = 2  # a bad command line, as argparse exits; here one that the server refused
EXIT_LOST = 3
EXIT_BROKEN_PIPE = 141  # as a shell reports a command killed by SIGPIPE

POLL_SECONDS = 0.25


def _progress_line(status: dict) -> str:
    return f"{status['state']}: {status['connections']} connections open, {status['busy']} busy"


def _no_server(command: str, exc: client.NoServer) -> int:
    if isinstance(exc, client.NotAControlSocket):
        why = "is --control the server's control socket?"
    elif isinstance(exc, client.NoAnswer):
        why = "is its process stopped or stuck?"
    else:
        why = "is the server running?"
    print(f"smartserve {command}: {exc} ({why})", file=sys.stderr)
    return EXIT_NO_SERVER


async def drain(
    reactor, path: str, timeout: float | None, out: TextIO, answer_timeout: float = DEFAULT_ANSWER_TIMEOUT
) -> int:
    """Drain the server on ``path`` showing progress; returns the exit status.

    The server has ``answer_timeout`` seconds to answer the drain request
    and each progress poll; the drain itself may take as long as it takes.
    """
    try:
        protocol = await client.connect(reactor, path, timeout=answer_timeout, answer_timeout=answer_timeout)
    except client.NoServer as exc:
        return _no_server("drain", exc)
    done = defer.ensureDeferred(client.wait_drained(protocol))
    finished = []

    def note_finished(result):
        finished.append(True)
        return result

    done.addBoth(note_finished)
    try:
        try:
            await client.drain(protocol, timeout)
        except BadTimeout as exc:
            print(f"smartserve drain: the server refused the request: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except client.NoServer as exc:
            return _no_server("drain", exc)
        interactive = out.isatty()
        shown = None
        while not finished:
            try:
                status = await client.status(protocol)
            except client.NoAnswer:
                raise
            except Exception:
                break  # the connection closed: the answer to WaitDrained says how
            line = _progress_line(status)
            if line != shown:
                if interactive:
                    out.write("\r\x1b[K" + line)
                else:
                    out.write(line + "\n")
                out.flush()
                shown = line
            if finished:
                break
            await task.deferLater(reactor, POLL_SECONDS, lambda: None)
        result = await done
    except Exception as exc:
        print(f"\nsmartserve drain: lost contact with the server: {exc}", file=sys.stderr)
        return EXIT_LOST
    finally:
        done.addErrback(lambda _: None)  # when leaving early, nothing waits on it any more
        if protocol.transport is not None:
            protocol.transport.loseConnection()
    if out.isatty():
        out.write("\n")
    if result["aborted"]:
        print(
            f"smartserve drain: timed out: aborted {result['aborted']} connections still busy at the deadline",
            file=sys.stderr,
        )
        return EXIT_TIMED_OUT
    out.write("drained\n")
    return EXIT_DRAINED


async def status(
    reactor, path: str, as_json: bool, out: TextIO, answer_timeout: float = DEFAULT_ANSWER_TIMEOUT
) -> int:
    """Print the server's status once; returns the exit status (``EXIT_NO_SERVER`` with no answer in ``answer_timeout`` s)."""
    try:
        protocol = await client.connect(reactor, path, timeout=answer_timeout, answer_timeout=answer_timeout)
        try:
            answer = await client.status(protocol)
        finally:
            protocol.transport.loseConnection()
    except client.NoServer as exc:
        return _no_server("status", exc)
    if as_json:
        out.write(json.dumps(answer, sort_keys=True) + "\n")
    else:
        out.write(f"pid {answer['pid']}: {_progress_line(answer)}, {answer['aborted']} aborted\n")
        for entry in answer["requests"]:
            out.write(f"  {entry['verb_class']:8} {entry['count']} requests\n")
    return 0


def _react(coroutine_function, *args) -> int:
    codes = []

    async def main(reactor):
        try:
            codes.append(await coroutine_function(reactor, *args))
        except BrokenPipeError:
            # Nothing reads the output any more (`| head`): end as SIGPIPE would, without a traceback.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            codes.append(EXIT_BROKEN_PIPE)

    try:
        task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
    except SystemExit as exit:
        if exit.code not in (0, None):
            raise
    return codes[0] if codes else EXIT_LOST


def run_drain(
    path: str, timeout: float | None, out: TextIO = sys.stdout, answer_timeout: float = DEFAULT_ANSWER_TIMEOUT
) -> int:
    """Blocking entry point of ``smartserve drain``."""
    return _react(drain, path, timeout, out, answer_timeout)


def run_status(
    path: str, as_json: bool, out: TextIO = sys.stdout, answer_timeout: float = DEFAULT_ANSWER_TIMEOUT
) -> int:
    """Blocking entry point of ``smartserve status``."""
    return _react(status, path, as_json, out, answer_timeout)

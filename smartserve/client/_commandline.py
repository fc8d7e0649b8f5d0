"""``smartserve call URL VERB [ARG ...]``: one request, for people.

Prints the response tuple on the first line as Python bytes literals, then
the body (if any) with non-printable bytes escaped as ``\\xNN``. Exit
status: 0 the server answered with success, 1 it answered with an error
(printed on stderr), 2 bad usage, 3 no answer: the connection failed, the
outcome is unknown or the deadline passed; 141 (128 + SIGPIPE, as a
command killed by it) when standard output is closed before the answer is
written (``| head``); 130 when interrupted (``smartserve.cli.main``).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from typing import Optional

__all__ = [
    "add_call_arguments",
    "run_call",
    "escape_bytes",
    "EXIT_OK",
    "EXIT_REMOTE_ERROR",
    "EXIT_USAGE",
    "EXIT_NO_ANSWER",
    "EXIT_BROKEN_PIPE",
]

EXIT_OK = 0
EXIT_REMOTE_ERROR = 1
EXIT_USAGE = 2
EXIT_NO_ANSWER = 3
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE

_PRINTABLE = frozenset(range(0x20, 0x7F)) | {0x0A, 0x09}


def escape_bytes(data: bytes) -> str:
    """``data`` as text: printable ASCII, newlines and tabs kept, backslash doubled, the rest ``\\xNN``."""
    out = []
    for byte in data:
        if byte == 0x5C:
            out.append("\\\\")
        elif byte in _PRINTABLE:
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def _deadline(text: str) -> float:
    """The ``--timeout`` value: a finite number of seconds, more than 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, more than 0, not {text}")
    return value


def add_call_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``smartserve call``."""
    parser.add_argument("url", help="bzr://host[:port]/path or bzr+ssh://[user@]host[:port]/path")
    parser.add_argument("verb", help="the verb to call, e.g. hello, get, Branch.last_revision_info")
    parser.add_argument("args", nargs="*", help="the verb's arguments, sent as the bytes given (UTF-8 for text)")
    body = parser.add_mutually_exclusive_group()
    body.add_argument("--body", help="request body, sent as the bytes given")
    body.add_argument("--body-file", help="request body read from a file ('-' for stdin)")
    parser.add_argument("--raw", action="store_true", help="write the response body unescaped to stdout")
    parser.add_argument("--timeout", type=_deadline, default=30.0, help="overall deadline in seconds [default: 30]")
    parser.add_argument("--no-resend", action="store_true", help="never send the request twice")
    parser.add_argument(
        "-v", "--verbose", action="store_true",
        help="log to stderr what the client does: connections, resends, and over SSH each step of the handshake",
    )  # fmt: skip
    ssh = parser.add_argument_group("bzr+ssh:// options")
    ssh.add_argument("-i", "--identity", action="append", default=[], help="private key file (repeatable)")
    ssh.add_argument("--known-hosts", help="known_hosts file [default: ~/.ssh/known_hosts]")
    ssh.add_argument("--trust-on-first-use", action="store_true", help="accept and record an unknown host key")
    ssh.add_argument("--no-agent", action="store_true", help="do not use the ssh-agent")
    ssh.add_argument("--remote-command", help="command run on the SSH server [default: bzr serve --inet ...]")


def _read_body(args: argparse.Namespace) -> Optional[bytes]:
    if args.body is not None:
        return os.fsencode(args.body)
    if args.body_file == "-":
        return sys.stdin.buffer.read()
    if args.body_file is not None:
        with open(args.body_file, "rb") as body_file:
            return body_file.read()
    return None


def _write_all(out, data: bytes) -> None:
    """Write all of ``data``: a pipe whose reader left takes part of a large write and raises on the next."""
    view = memoryview(data)
    while view:
        view = view[out.write(view) :]


def run_call(args: argparse.Namespace) -> int:
    """Make the call described by ``args``; print the answer; return the exit status."""
    from . import BlockingClient, ClientError, RemoteError, RetryPolicy, SSHOptions
    from ._ssh import DEFAULT_REMOTE_COMMAND, show_ssh_trace

    try:
        body = _read_body(args)
    except OSError as exc:
        print(f"smartserve call: cannot read the body: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.verbose:
        from twisted.logger import globalLogBeginner, textFileLogObserver

        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
        show_ssh_trace(True)
    policy = RetryPolicy(deadline=args.timeout, resend=not args.no_resend)
    ssh = SSHOptions(
        identity_files=tuple(args.identity),
        known_hosts=args.known_hosts,
        trust_on_first_use=args.trust_on_first_use,
        use_agent=not args.no_agent,
        remote_command=args.remote_command or DEFAULT_REMOTE_COMMAND,
    )
    try:
        client = BlockingClient(args.url, policy=policy, ssh=ssh)
    except Exception as exc:  # a bad URL, a missing or unreadable key file
        print(f"smartserve call: {exc}", file=sys.stderr)
        return EXIT_USAGE
    verb = os.fsencode(args.verb)
    try:
        reply = client.call(verb, *map(os.fsencode, args.args), body=body)
    except RemoteError as exc:
        print(f"error: {exc.error_args!r}", file=sys.stderr)
        if exc.body:
            print(escape_bytes(exc.body), file=sys.stderr)
        return EXIT_REMOTE_ERROR
    except ClientError as exc:
        print(f"smartserve call: {exc}", file=sys.stderr)
        return EXIT_NO_ANSWER
    finally:
        client.close()
    try:
        print(repr(tuple(reply.args)))
        if reply.body:
            if args.raw:
                sys.stdout.flush()
                _write_all(sys.stdout.buffer, reply.body)
            else:
                print(escape_bytes(reply.body))
        sys.stdout.flush()
    except BrokenPipeError:
        # Nothing reads the output any more (`| head`): end as a command killed by SIGPIPE
        # would, and keep the interpreter's own flush at exit from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return EXIT_OK

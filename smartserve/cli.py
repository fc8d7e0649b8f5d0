"""The ``smartserve`` command: one function per subcommand, registered in ``COMMANDS``."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from typing import Callable, Dict, Optional, Sequence

from .control import DEFAULT_ANSWER_TIMEOUT

DEFAULT_CONTROL = os.path.join("smartserve-data", "control.sock")


def _seconds(text: str) -> float:
    """A number of seconds from the command line: finite, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, 0 or more, not {text}")
    return value


def _positive_seconds(text: str) -> float:
    """A number of seconds from the command line: finite, more than 0."""
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def _add_control_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--control", default=DEFAULT_CONTROL, help=f"the server's control socket [default: {DEFAULT_CONTROL}]"
    )
    parser.add_argument(
        "--answer-timeout",
        type=_positive_seconds,
        default=DEFAULT_ANSWER_TIMEOUT,
        metavar="S",
        help="seconds to wait for each answer of the server; exit 2 if it does not answer in time "
        f"(a stopped or stuck process) [default: {DEFAULT_ANSWER_TIMEOUT:g}]",
    )


def _drain_parser(parser: argparse.ArgumentParser) -> None:
    _add_control_option(parser)
    parser.add_argument(
        "--timeout", type=_seconds, default=None, help="seconds before busy connections are aborted [server default]"
    )


def _drain(args: argparse.Namespace) -> int:
    from .control.commandline import run_drain

    return run_drain(args.control, args.timeout, answer_timeout=args.answer_timeout)


def _status_parser(parser: argparse.ArgumentParser) -> None:
    _add_control_option(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")


def _status(args: argparse.Namespace) -> int:
    from .control.commandline import run_status

    return run_status(args.control, args.json, answer_timeout=args.answer_timeout)


def _call_parser(parser: argparse.ArgumentParser) -> None:
    from .client._commandline import add_call_arguments

    add_call_arguments(parser)


def _call(args: argparse.Namespace) -> int:
    from .client._commandline import run_call

    return run_call(args)


# name -> (help, add arguments, run)
COMMANDS: Dict[str, tuple] = {
    "drain": ("drain a running server: exit 0 once drained, 1 on timeout, 2 if no server answers", _drain_parser, _drain),
    "status": ("print a running server's state once: exit 0, or 2 if no server answers", _status_parser, _status),
    "call": (
        "call one verb on a smart server and print the answer: exit 0 ok, 1 remote error, 2 usage, 3 no answer",
        _call_parser,
        _call,
    ),
}


def register(name: str, help_text: str, add_arguments: Callable, run: Callable) -> None:
    """Add a subcommand."""
    COMMANDS[name] = (help_text, add_arguments, run)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="smartserve")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


EXIT_INTERRUPTED = 128 + signal.SIGINT
"""What a shell reports for a command stopped by Ctrl-C."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``smartserve`` command; returns the exit status (130 when interrupted, without a traceback)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

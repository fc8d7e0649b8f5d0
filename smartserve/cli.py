"""The ``smartserve`` command."""

import sys


def main(argv=None) -> int:
    """Run the ``smartserve`` command; returns the exit status."""
    print("smartserve: no subcommands yet", file=sys.stderr)
    return 2

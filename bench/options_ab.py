"""Paired A/B of two smartserve option sets: ``brz branch`` over bzr://, alternating.

Two smartserve processes serve their own copy of the same 2a branch, one
with ``--a`` options and one with ``--b`` options; ``brz branch`` runs
against each in turn, the first of each pair alternating. Each pair's
ratio (B's time over A's, taken next to each other) is what is averaged,
so drift on the machine cancels. Prints the mean ratio with its standard
error and both medians.

Example: the cost of holding back the start of a streamed response:

    python bench/options_ab.py --a=--hold-response-bytes=0 --b=--hold-response-bytes=262144
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import _common  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", default="", help="smartserve options of A (one string, split as a shell would)")
    parser.add_argument("--b", default="", help="smartserve options of B")
    parser.add_argument("--pairs", type=int, default=40, help="branches per server")
    parser.add_argument("--revisions", type=int, default=300)
    parser.add_argument("--files", type=int, default=200)
    args = parser.parse_args(argv)
    print("$ " + _common.command_line())
    print(_common.machine())

    source = _common.branch(args.revisions, args.files)
    work = _common.fresh_dir("ab-")
    servers = []
    try:
        for name, options in (("A", args.a), ("B", args.b)):
            data = work / name
            _common.populate(data / "branches", source)
            server = _common.start_smartserve(data, extra=shlex.split(options))
            print(f"{name}: $ {server.command}")
            servers.append(server)
        env = _common.brz_env(work / "client-home")

        def branch_time(server) -> float:
            return _common.time_branch(f"bzr://127.0.0.1:{server.ports['bzr']}/branch", env, work)

        for server in servers:
            branch_time(server)  # warm-up
        times, _ = _common.alternating(servers, args.pairs, branch_time)
        for server in servers:
            server.check_alive()
    finally:
        for server in servers:
            server.stop()
    print(f"at the end: {_common.load()}")
    print(f"brz branch, {args.revisions} revisions: A median {_common.median(times[0]):.3f} s, "
          f"B median {_common.median(times[1]):.3f} s")
    print(f"B / A per pair over {args.pairs} pairs: {_common.paired_ratio(*times)} (mean ± standard error)")
    _common.shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

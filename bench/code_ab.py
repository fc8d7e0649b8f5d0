"""Paired A/B of two revisions of smartserve: small ``get``s over bzr://, the servers taking turns.

Each revision is checked out into a folder of its own and run by its own
``twistd smartserve``; Breezy's client makes ``--gets`` sequential
``get``s of a 1 KiB file on one warmed connection to each in turn, the
first of each pair alternating. Reports, per revision, the server's CPU
per call (from ``/proc/PID/stat``: barely moved by what else the machine
runs) and the wall time per call, medians over ``--rounds``, and the mean
per-pair ratio B / A of each with its standard error. It answers "did
this change cost the request path anything?" when whole-benchmark
figures move with the machine.

    python bench/code_ab.py --a 2f19fd1 --b HEAD
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import _common  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]


def checkout(revision: str, into: Path) -> Path:
    """A checkout of ``revision`` of this repository at ``into``."""
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(REPOSITORY), str(into)], check=True)
    subprocess.run(["git", "-C", str(into), "checkout", "-q", revision], check=True)
    return into


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="revision A (anything git checkout takes)")
    parser.add_argument("--b", required=True, help="revision B")
    parser.add_argument("--rounds", type=int, default=12, help="connections per revision")
    parser.add_argument("--gets", type=int, default=3000, help="small gets per connection")
    args = parser.parse_args(argv)
    print("$ " + _common.command_line())
    print(_common.machine())

    import breezy
    from breezy.bzr.smart import client, medium

    work = _common.fresh_dir("code-ab-")
    source = _common.branch(10, 5)
    servers = []
    with breezy.initialize(setup_ui=False):
        try:
            for name, revision in (("A", args.a), ("B", args.b)):
                code = checkout(revision, work / f"code-{name}")
                data = work / f"data-{name}"
                _common.populate(data / "branches", source)
                server = _common.start_smartserve(data, code=code)
                server.name = f"{name} ({revision})"
                print(f"{server.name}: $ PYTHONPATH={code} {server.command}")
                servers.append(server)
            path = _common.SMALL_FILE.encode()

            def wall_per_get(server) -> float:
                port = server.ports["bzr"]
                connection = medium.SmartTCPClientMedium("127.0.0.1", port, f"bzr://127.0.0.1:{port}/")
                try:
                    smart_client = client._SmartClient(connection)
                    _common.small_gets(smart_client, path, 1)
                    return _common.small_gets(smart_client, path, args.gets)
                finally:
                    connection.disconnect()

            walls, cpu = _common.alternating(servers, args.rounds, wall_per_get)
            for server in servers:
                server.check_alive()
        finally:
            for server in servers:
                server.stop()
    cpu_per_get = [[seconds / (args.gets + 1) * 1e6 for seconds in runs] for runs in cpu]
    print(f"at the end: {_common.load()}")
    for server, wall, used in zip(servers, walls, cpu_per_get):
        print(
            f"{server.name}: server CPU per get {_common.median(used):.0f} µs, "
            f"wall per get {_common.median(wall):.0f} µs (medians of {args.rounds})"
        )
    print(
        f"B / A per pair: server CPU {_common.paired_ratio(*cpu_per_get)}, wall {_common.paired_ratio(*walls)} "
        "(mean ± standard error)"
    )
    _common.shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

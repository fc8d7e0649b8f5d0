"""Small-call round trip: smartserve's client against Breezy's own, in one run.

Both clients make ``--gets`` sequential ``get``s of a 1 KiB file on one
warmed bzr:// connection, against ``brz serve`` and against smartserve, the
clients taking turns so drift on the machine hits both alike. Breezy's
client is ``SmartTCPClientMedium`` + ``_SmartClient`` (blocking sockets);
ours is ``SmartClient`` in this process's reactor. Figure: microseconds per
call, median of ``--runs`` connections. The blocking facade's cost (a hop to
the reactor thread and back per call) is shown on its own line.

Goal (issue 6): our client's time at most 1.0 times Breezy's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import _common  # noqa: E402
from _common import Row  # noqa: E402


def breezy_figure(port: int, count: int) -> float:
    """Microseconds per ``get`` with Breezy's client on one warmed connection."""
    from breezy.bzr.smart import client, medium

    connection = medium.SmartTCPClientMedium("127.0.0.1", port, f"bzr://127.0.0.1:{port}/")
    try:
        smart_client = client._SmartClient(connection)
        _common.small_gets(smart_client, _common.SMALL_FILE.encode(), 1)
        return _common.small_gets(smart_client, _common.SMALL_FILE.encode(), count)
    finally:
        connection.disconnect()


async def ours_figure(reactor, port: int, count: int) -> float:
    """Microseconds per ``get`` with smartserve's client on one warmed connection."""
    from smartserve.client import SmartClient

    client = SmartClient.from_url(f"bzr://127.0.0.1:{port}/", reactor=reactor)
    path = b"/" + _common.SMALL_FILE.encode()
    try:
        reply = await client.call(b"get", path)
        if reply.args != (b"ok",) or len(reply.body) != _common.SMALL_SIZE:
            raise RuntimeError(f"get answered {reply.args!r} with {len(reply.body)} bytes")
        started = time.perf_counter()
        for _ in range(count):
            await client.call(b"get", path)
        return (time.perf_counter() - started) / count * 1e6
    finally:
        await client.close()


def blocking_figure(port: int, count: int) -> float:
    """Microseconds per ``get`` through ``BlockingClient`` from the main thread."""
    from smartserve.client import BlockingClient

    path = b"/" + _common.SMALL_FILE.encode()
    with BlockingClient(f"bzr://127.0.0.1:{port}/") as client:
        client.call(b"get", path)
        started = time.perf_counter()
        for _ in range(count):
            client.call(b"get", path)
        return (time.perf_counter() - started) / count * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="connections per figure (median)")
    parser.add_argument("--gets", type=int, default=1000, help="small gets per connection")
    args = parser.parse_args(argv)
    print("$ " + _common.command_line())
    print(_common.machine())

    import breezy
    from twisted.internet import reactor

    source = _common.branch(10, 5)
    work = _common.fresh_dir("client-")
    smart_data = work / "smartserve"
    _common.populate(smart_data / "branches", source)
    _common.populate(work / "reference", source)
    servers = []
    results: dict = {}
    with breezy.initialize(setup_ui=False):
        try:
            servers.append(_common.start_smartserve(smart_data))
            servers.append(_common.start_brz_serve(work / "reference", work / "reference-home"))
            for server in servers:
                print(f"{server.name}: $ {server.command}")
            for server in servers:
                port = server.ports["bzr"]
                results[server.name] = {"ours": [], "breezy": []}
                for run in range(args.runs):
                    order = ("ours", "breezy") if run % 2 == 0 else ("breezy", "ours")
                    for which in order:
                        if which == "breezy":
                            figure = breezy_figure(port, args.gets)
                        else:
                            figure = _common.run_in_reactor(lambda: ours_figure(reactor, port, args.gets))
                        results[server.name][which].append(figure)
            results["blocking"] = blocking_figure(servers[1].ports["bzr"], args.gets)
        finally:
            for server in servers:
                server.stop()
    print()
    rows = []
    for server in servers:
        figures = results[server.name]
        print(
            f"against {server.name}: ours (µs) {', '.join(f'{t:.0f}' for t in figures['ours'])}; "
            f"Breezy's (µs) {', '.join(f'{t:.0f}' for t in figures['breezy'])}"
        )
        rows.append(
            Row(
                f"{args.gets} small gets against {server.name}, µs per call",
                _common.median(figures["ours"]),
                _common.median(figures["breezy"]),
                goal=1.0,
                unit_format="{:,.0f}",
            )
        )
    brz_serve_breezy = _common.median(results[servers[1].name]["breezy"])
    rows.append(
        Row(
            "same through BlockingClient, against brz serve",
            results["blocking"],
            brz_serve_breezy,
            unit_format="{:,.0f}",
        )
    )
    print()
    _common.print_table(rows, ours="our client", reference="Breezy's")
    _common.shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""bzr:// side by side: smartserve against ``brz serve`` over TCP, in one run.

Both servers serve their own copy of the same tree: a 2a branch (300
revisions over 200 files by default) and a 1 KiB file. Figures:

- ``brz branch`` of the branch: wall time of the ``brz`` subprocess, median
  of ``--runs`` runs after one warm-up run each, the two servers taking
  turns so drift on the machine hits both alike;
- 1,000 sequential ``get``s of the 1 KiB file on one connection, with the
  same client for both (Breezy's ``SmartTCPClientMedium`` and
  ``_SmartClient``): microseconds per call, median of ``--runs``
  connections, each warmed by one untimed ``get``;
- peak server RSS while serving the branch runs: the process's RSS
  high-water mark, reset just before the first branch (both servers are
  one process; ``brz serve`` uses a thread per connection);
- one ``get`` of a ``--bulk-mib`` file with the same client: MB/s, and how
  far the server's RSS high-water mark rose above its RSS before the get.

Goal (issue 3): smartserve's time at most 1.0 times the reference's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import _common  # noqa: E402
from _common import Row  # noqa: E402


def tcp_client(port: int):
    """Breezy's own smart client on a new bzr:// connection to 127.0.0.1:``port``."""
    from breezy.bzr.smart import client, medium

    connection = medium.SmartTCPClientMedium("127.0.0.1", port, f"bzr://127.0.0.1:{port}/")
    return connection, client._SmartClient(connection)


def small_get_figure(port: int, count: int) -> float:
    """Microseconds per ``get`` over one warmed bzr:// connection."""
    connection, client = tcp_client(port)
    try:
        _common.small_gets(client, _common.SMALL_FILE.encode(), 1)
        return _common.small_gets(client, _common.SMALL_FILE.encode(), count)
    finally:
        connection.disconnect()


def bulk_get_figure(server, size: int) -> tuple[float, float]:
    """(MB/s, MiB the server's peak RSS rose) for one ``get`` of the bulk file on a new connection."""
    connection, client = tcp_client(server.ports["bzr"])
    try:
        _common.small_gets(client, _common.SMALL_FILE.encode(), 1)
        before = _common.rss_kib(server.pid)
        _common.reset_peak_rss(server.pid)
        started = time.perf_counter()
        response, protocol = client.call_expecting_body(b"get", b"bulk.bin")
        received = len(protocol.read_body_bytes())
        elapsed = time.perf_counter() - started
        risen = (_common.peak_rss_kib(server.pid) - before) / 1024
    finally:
        connection.disconnect()
    if response != (b"ok",) or received != size:
        raise RuntimeError(f"bulk get answered {response!r} with {received} bytes")
    return size / 1e6 / elapsed, risen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="runs per figure (median)")
    parser.add_argument("--gets", type=int, default=1000, help="small gets per connection")
    parser.add_argument("--revisions", type=int, default=300)
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--bulk-mib", type=int, default=128, help="size of the file of the bulk get, in MiB")
    args = parser.parse_args(argv)
    print("$ " + _common.command_line())
    print(_common.machine())

    import breezy

    source = _common.branch(args.revisions, args.files)
    work = _common.fresh_dir("tcp-")
    smart_data = work / "smartserve"
    bulk_size = args.bulk_mib << 20
    _common.populate(smart_data / "branches", source, bulk_size=bulk_size)
    _common.populate(work / "reference", source, bulk_size=bulk_size)
    servers = []
    with breezy.initialize(setup_ui=False):
        try:
            servers.append(_common.start_smartserve(smart_data))
            servers.append(_common.start_brz_serve(work / "reference", work / "reference-home"))
            for server in servers:
                print(f"{server.name}: $ {server.command}")
            print(f"branch: {args.revisions} revisions over {args.files} files, 2a")
            rows = measure(servers, args, work)
        finally:
            for server in servers:
                server.stop()
    _common.report(rows, "brz serve", work)


def measure(servers, args, work: Path) -> list[Row]:
    """Run every figure on both servers; the first server is smartserve."""
    env = _common.brz_env(work / "client-home")
    urls = {server.pid: f"bzr://127.0.0.1:{server.ports['bzr']}/branch" for server in servers}
    idle_rss = []
    for server in servers:
        idle_rss.append(_common.rss_kib(server.pid))
        _common.reset_peak_rss(server.pid)
        _common.time_branch(urls[server.pid], env, work)
    branch, branch_cpu = _common.alternating(
        servers, args.runs, lambda server: _common.time_branch(urls[server.pid], env, work)
    )
    peak_rss = []
    for server in servers:
        server.check_alive()
        peak_rss.append(_common.peak_rss_kib(server.pid))
    gets, gets_cpu = _common.alternating(
        servers, args.runs, lambda server: small_get_figure(server.ports["bzr"], args.gets)
    )
    bulk = [bulk_get_figure(server, args.bulk_mib << 20) for server in servers]
    for index, server in enumerate(servers):
        print(
            f"{server.name}: branch runs (s) {', '.join(f'{t:.3f}' for t in branch[index])}; "
            f"get runs (µs) {', '.join(f'{t:.0f}' for t in gets[index])}; "
            f"RSS idle {idle_rss[index] / 1024:.1f} MiB"
        )
    median = _common.median
    per_get = args.gets + 1
    return [
        Row(
            f"brz branch, {args.revisions} revisions (s)",
            median(branch[0]),
            median(branch[1]),
            goal=1.0,
            unit_format="{:.3f}",
        ),
        Row(f"{args.gets} small gets, µs per call", median(gets[0]), median(gets[1]), goal=1.0, unit_format="{:,.0f}"),
        Row("peak server RSS serving branch (MiB)", peak_rss[0] / 1024, peak_rss[1] / 1024),
        Row("server RSS before (MiB)", idle_rss[0] / 1024, idle_rss[1] / 1024),
        Row(f"{args.bulk_mib} MiB get (MB/s)", bulk[0][0], bulk[1][0], lower_is_better=False),
        Row(f"server peak RSS rise during the {args.bulk_mib} MiB get (MiB)", bulk[0][1], bulk[1][1]),
        Row("server CPU per branch (ms)", median(branch_cpu[0]) * 1e3, median(branch_cpu[1]) * 1e3, unit_format="{:,.0f}"),
        Row(
            "server CPU per small get (µs)",
            median(gets_cpu[0]) / per_get * 1e6,
            median(gets_cpu[1]) / per_get * 1e6,
            unit_format="{:,.0f}",
        ),
    ]


if __name__ == "__main__":
    main()

"""Does a long-running server keep growing? smartserve's RSS over many connections, beside `brz serve`'s.

Both servers serve copies of the same small tree over bzr:// (TCP). Each
round makes ``--per-round`` connections to each server in turn with
Breezy's own client, each doing ``hello`` and a ``get`` of a 1 KiB file
before it disconnects; smartserve also gets as many SSH sessions in the
round (smartserve's client over its own SSH, the same two calls). After
each round both servers' RSS is read. The first round is warm-up (caches,
the allocator's arenas); the figure is what the remaining rounds added.

A server that leaks a few hundred bytes per connection shows it here as
megabytes; the reference, a thread per connection in one process, shows
what Breezy's own serving costs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import _common  # noqa: E402
from _common import Row  # noqa: E402

USER = "bench"


def bzr_connection(port: int) -> None:
    """One bzr:// connection with Breezy's client: hello, a small get, disconnect."""
    from breezy.bzr.smart import client, medium

    connection = medium.SmartTCPClientMedium("127.0.0.1", port, f"bzr://127.0.0.1:{port}/")
    try:
        smart_client = client._SmartClient(connection)
        if smart_client.call(b"hello")[0] != b"ok":
            raise RuntimeError("hello failed")
        _common.small_gets(smart_client, _common.SMALL_FILE.encode(), 1)
    finally:
        connection.disconnect()


def ssh_sessions(url: str, ssh, count: int) -> None:
    """``count`` SSH sessions in a row with smartserve's client, each: hello, a small get, close."""
    from twisted.internet import reactor

    from smartserve.client import SmartClient

    async def sessions():
        for _ in range(count):
            client = SmartClient.from_url(url, reactor=reactor, ssh=ssh)
            try:
                await client.call(b"hello")
                await client.call(b"get", b"/" + _common.SMALL_FILE.encode())
            finally:
                await client.close()

    _common.run_in_reactor(sessions)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds, the first one warm-up")
    parser.add_argument("--per-round", type=int, default=1000, help="connections per server per round")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2: the first is warm-up")
    print("$ " + _common.command_line())
    print(_common.machine())

    import breezy

    from smartserve.client import SSHOptions

    source = _common.branch(5, 5)
    work = _common.fresh_dir("memory-")
    keys = _common.ssh_client(work / "client")
    data = work / "smartserve"
    _common.populate(data / "branches", source)
    (data / "keys").mkdir()
    (data / "keys" / f"{USER}.pub").write_text(keys.public_key + "\n")
    _common.populate(work / "reference", source)
    servers = []
    with breezy.initialize(setup_ui=False):
        try:
            smart = _common.start_smartserve(data, ssh_keys=data / "keys")
            servers.append(smart)
            reference = _common.start_brz_serve(work / "reference", work / "reference-home")
            servers.append(reference)
            keys.trust(smart.ports["ssh"])
            ssh = SSHOptions(
                identity_files=[str(keys.key)], use_agent=False, known_hosts=str(keys.folder / "known_hosts")
            )
            ssh_url = f"bzr+ssh://{USER}@127.0.0.1:{smart.ports['ssh']}/"
            for server in servers:
                print(f"{server.name}: $ {server.command}")
            rss = {server.name: [] for server in servers}
            started = time.perf_counter()
            for round_number in range(args.rounds):
                for server in servers:
                    for _ in range(args.per_round):
                        bzr_connection(server.ports["bzr"])
                ssh_sessions(ssh_url, ssh, args.per_round)
                for server in servers:
                    rss[server.name].append(_common.rss_kib(server.pid))
                print(
                    f"round {round_number + 1}: RSS (KiB) "
                    + ", ".join(f"{name} {figures[-1]:,}" for name, figures in rss.items()),
                    flush=True,
                )
            print(f"{args.rounds} rounds in {time.perf_counter() - started:.0f} s")
        finally:
            for server in servers:
                server.stop()
    ours, theirs = rss[smart.name], rss[reference.name]
    served = (args.rounds - 1) * args.per_round
    print(
        f"growth after warm-up, per 1,000 bzr:// connections (smartserve: plus as many SSH sessions): "
        f"smartserve {(ours[-1] - ours[0]) * 1000 / served:,.0f} KiB, "
        f"brz serve {(theirs[-1] - theirs[0]) * 1000 / served:,.0f} KiB"
    )
    rows = [
        Row("server RSS after warm-up (KiB)", ours[0], theirs[0], unit_format="{:,.0f}"),
        Row(f"server RSS after {served:,} more connections (KiB)", ours[-1], theirs[-1], unit_format="{:,.0f}"),
    ]
    _common.report(rows, "brz serve", work)


if __name__ == "__main__":
    main()

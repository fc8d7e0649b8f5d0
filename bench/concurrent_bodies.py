"""Many request bodies at once: what they make a server hold, smartserve beside ``brz serve``, in one run.

``--clients`` connections to each server each begin a ``put`` and send
``--body-mib`` MiB of its body in 1 MiB parts, every body sent before any
request ends, as many clients uploading at the same moment would. Then each
request is ended and its answer read. smartserve runs with
``--max-request-memory`` at ``--limit-mib`` and ``--max-request-body`` at the
body's size, so each body alone is allowed. Figures: how far each server's
RSS high-water mark rose over the run, and how many of the puts it ran and
how many it refused (``ServerBusy``, nothing of them run). No goal: this is
the figure ``doc/operator.md`` gives for ``--max-request-memory``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import _common  # noqa: E402
from _common import Row  # noqa: E402

MIB = 1024 * 1024


def upload_all(server, clients: int, body_mib: int) -> tuple[float, dict]:
    """(MiB the server's peak RSS rose, count of each answer) for ``clients`` puts sent at once."""
    from smartserve.testing import RawClient

    port = server.ports["bzr"]
    part = os.urandom(MIB)
    warm = RawClient.connect("127.0.0.1", port, timeout=600)
    warm.call(b"hello")
    warm.close()
    before = _common.rss_kib(server.pid)
    _common.reset_peak_rss(server.pid)
    connections = []
    try:
        for index in range(clients):
            client = RawClient.connect("127.0.0.1", port, timeout=600)
            connections.append(client)
            client.begin_request([b"put", b"/upload-%d" % index, b""])
            for _ in range(body_mib):
                client.send_body_part(part)
        answers: dict = {}
        for client in connections:
            client.end_request()
            reply = client.read_reply()
            name = "ok" if reply.success else reply.args[0].decode()
            answers[name] = answers.get(name, 0) + 1
    finally:
        for client in connections:
            client.close()
    risen = (_common.peak_rss_kib(server.pid) - before) / 1024
    return risen, answers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16, help="connections, each with one put")
    parser.add_argument("--body-mib", type=int, default=32, help="MiB of each put's body")
    parser.add_argument("--limit-mib", type=int, default=128, help="smartserve's --max-request-memory, in MiB")
    args = parser.parse_args(argv)
    print("$ " + _common.command_line())
    print(_common.machine())

    source = _common.branch(10, 10)
    work = _common.fresh_dir("bodies-")
    _common.populate(work / "smartserve" / "branches", source)
    _common.populate(work / "reference", source)
    options = [
        "--max-request-memory", str(args.limit_mib * MIB),
        "--max-request-body", str(max(args.body_mib, args.limit_mib) * MIB),
    ]
    servers = []
    figures = []
    try:
        servers.append(_common.start_smartserve(work / "smartserve", extra=options))
        servers.append(_common.start_brz_serve(work / "reference", work / "reference-home"))
        for server in servers:
            print(f"{server.name}: $ {server.command}")
        for server in servers:
            risen, answers = upload_all(server, args.clients, args.body_mib)
            print(f"{server.name}: answers {answers}, peak RSS rise {risen:.1f} MiB")
            figures.append((risen, answers))
    finally:
        for server in servers:
            server.stop()
    label = f"{args.clients} puts of {args.body_mib} MiB at once"
    rows = [
        Row(f"{label}: peak RSS rise (MiB)", figures[0][0], figures[1][0]),
        Row(f"{label}: puts run", figures[0][1].get("ok", 0), figures[1][1].get("ok", 0), unit_format="{:,.0f}"),
    ]
    _common.report(rows, "brz serve", work)


if __name__ == "__main__":
    main()

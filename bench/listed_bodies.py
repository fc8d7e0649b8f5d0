"""What a request body that lists keys costs a server: smartserve beside ``brz serve``, in one run.

Breezy splits the bodies of ``Repository.iter_files_bytes`` (a lightweight
checkout's files), ``Repository.iter_revisions``,
``VersionedFileRepository.get_inventories`` and
``Repository.get_stream_for_missing_keys`` into one entry per line. Each
verb gets a body of ``--lines`` keys, once of a few bytes each and once of
the size Breezy's own ids have (about 50 bytes), on one bzr:// connection
to each server; the keys name nothing, so the answer is short. Figures: how
far the server's RSS high-water mark rose during the request, and the
request's time. smartserve runs with ``--max-request-entries`` set to
``--lines``, so that Breezy parses the same body in both servers. Each
request goes to a new pair of servers.

The last rows send twice the default ``--max-request-entries`` of short keys
to a smartserve at its default, which refuses them, beside ``brz serve``
taking them. No goal: these are the figures ``doc/operator.md`` gives for
``--max-request-entries``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import _common  # noqa: E402
from _common import Row  # noqa: E402

_FORMAT_2A = b"Bazaar repository format 2a (needs bzr 1.16 or later)\n"
_FILE_ID = b"some-file-name.txt-20231115031320-kmffkxvrj6v1ql93-%d"
_REVISION_ID = b"bench@example.com-20231115031320-kmffkxvrj6v1ql93%06d"

# verb arguments, a short line and a line of Breezy's size, for key number i
VERBS = {
    "iter_files_bytes": (
        (b"Repository.iter_files_bytes", b"branch/"),
        lambda i: b"%x\0r" % i,
        lambda i: (_FILE_ID % i) + b"\0" + (_REVISION_ID % i),
    ),
    "iter_revisions": (
        (b"Repository.iter_revisions", b"branch/"),
        lambda i: b"%x" % i,
        lambda i: _REVISION_ID % i,
    ),
    "get_inventories": (
        (b"VersionedFileRepository.get_inventories", b"branch/", b"unordered"),
        lambda i: b"%x" % i,
        lambda i: _REVISION_ID % i,
    ),
    "get_stream_for_missing_keys": (
        (b"Repository.get_stream_for_missing_keys", b"branch/", _FORMAT_2A),
        lambda i: b"inventories\t%x" % i,
        lambda i: b"inventories\t" + (_REVISION_ID % i),
    ),
}


def request_cost(server, port: int, args: tuple, body: bytes) -> tuple[float, float, bool]:
    """(MiB the server's peak RSS rose, seconds, whether it answered success) for one request on a new connection."""
    from smartserve.testing import RawClient

    client = RawClient.connect("127.0.0.1", port, timeout=600)
    try:
        client.call(b"hello")
        before = _common.rss_kib(server.pid)
        _common.reset_peak_rss(server.pid)
        started = time.perf_counter()
        reply = client.call(*args, body=body)
        elapsed = time.perf_counter() - started
        risen = (_common.peak_rss_kib(server.pid) - before) / 1024
    finally:
        client.close()
    return risen, elapsed, reply.success


def on_fresh_servers(work: Path, source: Path, options: list, args: tuple, body: bytes) -> list:
    """``request_cost`` of one request on a new smartserve (with ``options``) and a new ``brz serve``.

    New servers each time: a server's heap keeps what an earlier request
    freed, and a later one would reuse it without raising RSS.
    """
    folder = Path(tempfile.mkdtemp(prefix="servers-", dir=work))
    _common.populate(folder / "smartserve" / "branches", source)
    _common.populate(folder / "reference", source)
    servers = []
    try:
        servers.append(_common.start_smartserve(folder / "smartserve", extra=options))
        servers.append(_common.start_brz_serve(folder / "reference", folder / "reference-home"))
        return [request_cost(server, server.ports["bzr"], args, body) for server in servers]
    finally:
        for server in servers:
            server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=250_000, help="keys in each body")
    args = parser.parse_args(argv)
    print("$ " + _common.command_line())
    print(_common.machine())

    from smartserve.server.backends.bzr import DEFAULT_MAX_BODY_ENTRIES

    source = _common.branch(10, 10)
    work = _common.fresh_dir("listed-")
    rows = []
    for name, (verb_args, short, breezy_sized) in VERBS.items():
        for kind, line in (("short", short), ("id-sized", breezy_sized)):
            body = b"\n".join(line(index) for index in range(args.lines))
            label = f"{name}, {args.lines:,} {kind} keys ({len(body) / 2**20:.1f} MiB)"
            figures = on_fresh_servers(work, source, ["--max-request-entries", str(args.lines)], verb_args, body)
            print(f"{label}: answered {[ok for _, _, ok in figures]}")
            rows.append(Row(f"{label}: RSS rise (MiB)", figures[0][0], figures[1][0]))
            rows.append(Row(f"{label}: time (s)", figures[0][1], figures[1][1], unit_format="{:,.2f}"))
    lines = 2 * DEFAULT_MAX_BODY_ENTRIES
    verb_args, short, _ = VERBS["iter_files_bytes"]
    body = b"\n".join(short(index) for index in range(lines))
    figures = on_fresh_servers(work, source, [], verb_args, body)
    print(f"at the default limit, {lines:,} short keys: answered {[ok for _, _, ok in figures]}")
    label = f"iter_files_bytes, {lines:,} short keys, smartserve at its default limit"
    rows.append(Row(f"{label}: RSS rise (MiB)", figures[0][0], figures[1][0]))
    rows.append(Row(f"{label}: time (s)", figures[0][1], figures[1][1], unit_format="{:,.2f}"))
    _common.report(rows, "brz serve", work)


if __name__ == "__main__":
    main()

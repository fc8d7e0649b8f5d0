"""bzr+ssh:// side by side: smartserve's SSH server against OpenSSH ``sshd`` + ``brz serve --inet``.

One key pair and one tree (each server its own copy: the 300-revision
branch, a 1 KiB file and a 64 MiB file). The reference is OpenSSH's
``sshd`` on 127.0.0.1 (own host key and authorized_keys, run as root)
whose key forces ``brz serve --inet --directory=/ --allow-writes``, the way
a plain OpenSSH host serves ``bzr+ssh://``. The client side is the same
for both: OpenSSH's ``ssh`` driven by Breezy (``BRZ_SSH=openssh``), either
through Breezy's ``SmartSSHClientMedium`` and ``_SmartClient`` or as the
``brz`` command. Figures, medians of ``--runs`` runs with the servers
taking turns:

- connect + first ``hello`` reply: from creating the medium (which starts
  ``ssh``) to the reply, in ms, median of ``--connects`` connections;
  the server CPU per connection is their mean (a login costs smartserve
  a few ms, under the clock tick the kernel counts CPU time in);
- 1,000 sequential ``get``s of the 1 KiB file on one warmed session, µs per
  call;
- one ``get`` of the 64 MiB file on a warmed session, MB/s of body;
- ``brz branch`` of the branch, wall time of the ``brz`` subprocess;
- server memory per idle authenticated session: sessions are opened by
  ``ssh`` processes that each get a ``hello`` reply, then sit idle. For
  smartserve, the growth of its one process's RSS over ``--sessions``
  sessions, divided by their number; for the reference, the RSS of every
  process ``sshd`` runs for the sessions (its privileged and unprivileged
  children and ``brz serve``), summed over ``--reference-sessions``
  sessions and divided by their number. Measured first, on servers that
  have only served a few warm-up sessions.

Goals (issue 4): connect ≤ 0.2×, small-call round trip ≤ 0.8×, bulk
≥ 1.0× the reference MB/s, branch ≤ 1.0×, under 200 KB of server RSS per
idle session.
"""

from __future__ import annotations

import argparse
import os
import resource
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import _common  # noqa: E402
from _common import Row  # noqa: E402

BULK_SIZE = 64 << 20
USER = "bench"
SERVE = ["bzr", "serve", "--inet", "--directory=/", "--allow-writes"]
SESSION_WAVE = 20


@dataclass
class Target:
    """One server as the benchmark reaches it: port, login name, paths."""

    server: _common.Server
    port: int
    user: str
    prefix: str  # where the served tree starts, as a client path

    @property
    def pid(self) -> int:
        return self.server.pid

    def url(self, name: str) -> str:
        return f"bzr+ssh://{self.user}@127.0.0.1:{self.port}{self.prefix}/{name}"

    def path(self, name: str) -> bytes:
        return f"{self.prefix}/{name}".encode()


def open_client(target: Target):
    """Breezy's smart client on a new, not yet connected bzr+ssh:// medium."""
    from breezy.bzr.smart import client, medium
    from breezy.transport import ssh

    params = medium.SSHParams("127.0.0.1", target.port, target.user)
    connection = medium.SmartSSHClientMedium(
        f"bzr+ssh://{target.user}@127.0.0.1:{target.port}/", params, ssh._get_ssh_vendor()
    )
    return connection, client._SmartClient(connection)


def connect_figure(target: Target) -> float:
    """Milliseconds from starting ``ssh`` to the first ``hello`` reply."""
    started = time.perf_counter()
    connection, client = open_client(target)
    try:
        reply = client.call(b"hello")
        elapsed = time.perf_counter() - started
    finally:
        connection.disconnect()
    if reply[0] != b"ok":
        raise RuntimeError(f"hello answered {reply!r}")
    return elapsed * 1000


def small_get_figure(target: Target, count: int) -> float:
    """Microseconds per 1 KiB ``get`` on one warmed session."""
    connection, client = open_client(target)
    try:
        path = target.path(_common.SMALL_FILE)
        _common.small_gets(client, path, 1)
        return _common.small_gets(client, path, count)
    finally:
        connection.disconnect()


def bulk_figure(target: Target) -> float:
    """MB/s of one 64 MiB ``get`` on a warmed session."""
    connection, client = open_client(target)
    try:
        _common.small_gets(client, target.path(_common.SMALL_FILE), 1)
        started = time.perf_counter()
        response, protocol = client.call_expecting_body(b"get", target.path("bulk.bin"))
        size = len(protocol.read_body_bytes())
        elapsed = time.perf_counter() - started
    finally:
        connection.disconnect()
    if response != (b"ok",) or size != BULK_SIZE:
        raise RuntimeError(f"bulk get answered {response!r} with {size} bytes")
    return size / 1e6 / elapsed


class IdleSessions:
    """Smart sessions held open by ``ssh`` processes after one ``hello`` each.

    Sessions are opened in waves, each waiting for every ``hello`` reply,
    so neither server sees more than a wave of logins at once (smartserve
    limits unauthenticated connections, ``sshd`` has MaxStartups).
    """

    def __init__(self, client: _common.SSHClient, target: Target):
        self._argv = [str(client.ssh), "-p", str(target.port), "-l", target.user, "127.0.0.1", *SERVE]
        self.processes: list[subprocess.Popen] = []

    def open(self, count: int, deadline: float = 120.0) -> None:
        for start in range(0, count, SESSION_WAVE):
            self._open_wave(min(SESSION_WAVE, count - start), deadline)

    def _open_wave(self, count: int, deadline: float) -> None:
        from smartserve.protocol import NEED_DATA, Connection, EndOfMessage, Request, Role

        selector = selectors.DefaultSelector()
        for _ in range(count):
            process = subprocess.Popen(
                self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0
            )
            self.processes.append(process)
            codec = Connection(Role.CLIENT)
            process.stdin.write(codec.send(Request((b"hello",))) + codec.send(EndOfMessage()))
            selector.register(process.stdout, selectors.EVENT_READ, codec)
        end = time.monotonic() + deadline
        while selector.get_map():
            if time.monotonic() > end:
                raise RuntimeError("idle sessions: no hello reply in time")
            for key, _ in selector.select(1.0):
                data = os.read(key.fd, 65536)
                if not data:
                    raise RuntimeError("idle sessions: a session closed before its hello reply")
                codec = key.data
                codec.receive_data(data)
                while (event := codec.next_event()) is not NEED_DATA:
                    if isinstance(event, EndOfMessage):
                        selector.unregister(key.fileobj)
                        break
        selector.close()

    def close(self) -> None:
        for process in self.processes:
            process.stdin.close()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            process.stdout.close()
        self.processes = []


def smartserve_session_kib(client, target: Target, count: int) -> float:
    """Growth of smartserve's RSS per idle session, in KiB."""
    warm = IdleSessions(client, target)
    warm.open(SESSION_WAVE)
    warm.close()
    before = _common.rss_kib(target.server.pid)
    sessions = IdleSessions(client, target)
    try:
        sessions.open(count)
        target.server.check_alive()
        after = _common.rss_kib(target.server.pid)
    finally:
        sessions.close()
    return (after - before) / count


def reference_session_kib(client, target: Target, count: int) -> tuple[float, float]:
    """RSS and PSS of the processes ``sshd`` runs per idle session, in KiB."""
    warm = IdleSessions(client, target)
    warm.open(2)
    warm.close()
    _common.wait_for(lambda: not _common.descendants(target.server.pid), "sshd's sessions to end")
    sessions = IdleSessions(client, target)
    try:
        sessions.open(count)
        rss = pss = 0
        for pid in _common.descendants(target.server.pid):
            rss += _common.rss_kib(pid)
            pss += _common.pss_kib(pid)
    finally:
        sessions.close()
    return rss / count, pss / count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per figure (median)")
    parser.add_argument("--connects", type=int, default=30, help="connections per server for connect + hello")
    parser.add_argument("--bulk-runs", type=int, default=3, help="runs of the 64 MiB get (median)")
    parser.add_argument("--gets", type=int, default=1000, help="small gets per session")
    parser.add_argument("--sessions", type=int, default=1000, help="idle sessions on smartserve")
    parser.add_argument("--reference-sessions", type=int, default=100, help="idle sessions on sshd")
    parser.add_argument("--revisions", type=int, default=300)
    parser.add_argument("--files", type=int, default=200)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("error: the reference sshd must run as root")
    print("$ " + _common.command_line())
    print(_common.machine())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    import breezy

    source = _common.branch(args.revisions, args.files)
    work = _common.fresh_dir("ssh-")
    client = _common.ssh_client(work / "client")
    data = work / "smartserve"
    _common.populate(data / "branches", source, bulk_size=BULK_SIZE)
    (data / "keys").mkdir()
    (data / "keys" / f"{USER}.pub").write_text(client.public_key + "\n")
    reference_root = work / "reference"
    _common.populate(reference_root, source, bulk_size=BULK_SIZE)
    os.environ.update(client.env(work / "client-home"))
    servers = []
    with breezy.initialize(setup_ui=False):
        try:
            smart = _common.start_smartserve(
                data, ssh_keys=data / "keys", extra=[f"--max-sessions-per-user={args.sessions + SESSION_WAVE}"]
            )
            servers.append(smart)
            sshd = _common.start_sshd(work / "sshd", client, work / "reference-home")
            servers.append(sshd)
            targets = [
                Target(smart, smart.ports["ssh"], USER, ""),
                Target(sshd, sshd.ports["ssh"], "root", str(reference_root)),
            ]
            for target in targets:
                client.trust(target.port)
                print(f"{target.server.name}: $ {target.server.command}")
            print(f"sshd's forced command: {(work / 'sshd' / 'authorized_keys').read_text().split(',')[0]}")
            print(f"branch: {args.revisions} revisions over {args.files} files, 2a; ssh: OpenSSH client")
            rows = measure(client, targets, args, work)
        finally:
            for server in servers:
                server.stop()
    _common.report(rows, "sshd + brz", work)


def measure(client, targets: list[Target], args, work: Path) -> list[Row]:
    """Every figure on both servers; the first target is smartserve."""
    smart, reference = targets
    started = time.perf_counter()
    ours_kib = smartserve_session_kib(client, smart, args.sessions)
    reference_kib, reference_pss = reference_session_kib(client, reference, args.reference_sessions)
    print(
        f"idle sessions: smartserve {args.sessions}, reference {args.reference_sessions} "
        f"(reference PSS {reference_pss * 1.024:,.0f} kB per session), in {time.perf_counter() - started:.0f} s"
    )

    env = client.env(work / "client-home")

    def alternating(servers, runs, figure):
        # sshd's children are counted in its CPU time once reaped: wait for that.
        def settled(target):
            result = figure(target)
            _common.wait_for(lambda: not _common.descendants(target.pid), "the session's processes to end")
            return result

        return _common.alternating(servers, runs, settled)

    connect, connect_cpu = alternating(targets, args.connects, connect_figure)
    gets, gets_cpu = alternating(targets, args.runs, lambda target: small_get_figure(target, args.gets))
    bulk, bulk_cpu = alternating(targets, args.bulk_runs, bulk_figure)
    for target in targets:
        _common.time_branch(target.url("branch"), env, work)
    branch, branch_cpu = alternating(
        targets, args.runs, lambda target: _common.time_branch(target.url("branch"), env, work)
    )
    for index, target in enumerate(targets):
        print(
            f"{target.server.name}: connect (ms) {', '.join(f'{t:.0f}' for t in connect[index])}; "
            f"get (µs) {', '.join(f'{t:.0f}' for t in gets[index])}; "
            f"bulk (MB/s) {', '.join(f'{t:.0f}' for t in bulk[index])}; "
            f"branch (s) {', '.join(f'{t:.3f}' for t in branch[index])}"
        )
    median = _common.median
    per_get = args.gets + 2  # the timed gets, the warm-up get and the session's start
    return [
        Row("connect + hello (ms)", median(connect[0]), median(connect[1]), goal=0.2, unit_format="{:,.1f}"),
        Row(f"{args.gets} small gets, µs per call", median(gets[0]), median(gets[1]), goal=0.8, unit_format="{:,.0f}"),
        Row("64 MiB get (MB/s)", median(bulk[0]), median(bulk[1]), goal=1.0, lower_is_better=False),
        Row(
            f"brz branch, {args.revisions} revisions (s)",
            median(branch[0]),
            median(branch[1]),
            goal=1.0,
            unit_format="{:.3f}",
        ),
        Row(
            "server RSS per idle session (kB)",
            ours_kib * 1.024,
            reference_kib * 1.024,
            absolute_goal=200,
            unit_format="{:,.0f}",
        ),
        Row("server CPU per connect + hello (ms)", _mean(connect_cpu[0]) * 1e3, _mean(connect_cpu[1]) * 1e3),
        Row(
            "server CPU per small get (µs)",
            median(gets_cpu[0]) / per_get * 1e6,
            median(gets_cpu[1]) / per_get * 1e6,
            unit_format="{:,.0f}",
        ),
        Row("server CPU per 64 MiB get (ms)", median(bulk_cpu[0]) * 1e3, median(bulk_cpu[1]) * 1e3, unit_format="{:,.0f}"),
        Row("server CPU per branch (ms)", median(branch_cpu[0]) * 1e3, median(branch_cpu[1]) * 1e3, unit_format="{:,.0f}"),
    ]



def _mean(samples: list) -> float:
    return sum(samples) / len(samples)

if __name__ == "__main__":
    main()

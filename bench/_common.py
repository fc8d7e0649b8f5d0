"""What the server benchmarks share: test data, servers to race, clients, figures.

The branch the benchmarks clone is built once per parameter set with
Breezy's API and kept under ``$TMPDIR/smartserve-bench``; each server then
gets its own copy of it, so neither serves files the other has cached in
its process. Servers run as subprocesses, and every command that starts
one is recorded so the benchmark can print exactly what it ran.
"""

from __future__ import annotations

import os
import random
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, List, Optional

BIN = Path(sys.executable).parent
WORK = Path(tempfile.gettempdir()) / "smartserve-bench"
EMAIL = "Bench <bench@example.com>"
SMALL_FILE = "small.txt"
SMALL_SIZE = 1024
START_DEADLINE = 30.0

# Bump when the branch recipe changes, so a stale cached branch is rebuilt.
_RECIPE = 1


def command_line() -> str:
    """The command that started this benchmark, as a user would type it."""
    return shlex.join(["python", *sys.argv])


def machine() -> str:
    """One line about the machine the figures come from."""
    import breezy

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores, {cpu}; "
        f"python {sys.version.split()[0]}, breezy {breezy.__version__}; {load()}"
    )


def load() -> str:
    """The machine's load averages: other work running beside the benchmark skews it."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f}, {five:.1f}, {fifteen:.1f}"


def brz_env(home: Path, **extra: str) -> dict:
    """Environment for ``brz`` subprocesses: a private home, no user config."""
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        HOME=str(home),
        BRZ_HOME=str(home),
        BRZ_EMAIL=EMAIL,
        BRZ_LOG=str(home / "brz.log"),
        BRZ_DISABLE_PLUGINS="launchpad",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    env.update(extra)
    return env


# Test data --------------------------------------------------------------


def _text(rng: random.Random, lines: int) -> bytes:
    words = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
    return b"".join(
        (" ".join(rng.choice(words) for _ in range(8)) + f" {rng.random():.12f}\n").encode()
        for _ in range(lines)
    )


def _build_branch(path: Path, revisions: int, files: int) -> None:
    """Commit ``revisions`` revisions touching ``files`` files into a new 2a branch."""
    import breezy
    from breezy import bzr, controldir  # noqa: F401 (bzr registers the 2a format)

    rng = random.Random(f"{revisions}/{files}")
    names = [f"dir{n % 10}/file{n:04d}.txt" for n in range(files)]
    with breezy.initialize(setup_ui=False):
        tree = controldir.ControlDir.create_standalone_workingtree(
            str(path), format=controldir.format_registry.make_controldir("2a")
        )
        with tree.lock_write():
            dirs = sorted({name.split("/")[0] for name in names})
            for directory in dirs:
                (path / directory).mkdir()
            contents = {name: _text(rng, 40) for name in names}
            for name, data in contents.items():
                (path / name).write_bytes(data)
            tree.add(dirs + names)
            tree.commit("Initial import", committer=EMAIL, timestamp=1_700_000_000, timezone=0)
            for revno in range(2, revisions + 1):
                changed = rng.sample(names, 3)
                for name in changed:
                    contents[name] += _text(rng, 2)
                    (path / name).write_bytes(contents[name])
                tree.commit(
                    f"Change {revno}",
                    specific_files=changed,
                    committer=EMAIL,
                    timestamp=1_700_000_000 + revno * 60,
                    timezone=0,
                )


def branch(revisions: int = 300, files: int = 200) -> Path:
    """A 2a standalone branch with ``revisions`` revisions over ``files`` files (cached)."""
    path = WORK / f"branch-r{revisions}-f{files}-v{_RECIPE}"
    if (path / ".bzr" / "branch" / "last-revision").exists():
        return path
    partial = Path(tempfile.mkdtemp(prefix="building-", dir=_work()))
    target = partial / "branch"
    target.mkdir()
    started = time.perf_counter()
    try:
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; sys.path.insert(0, sys.argv[1]); import _common; "
                "_common._build_branch(_common.Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))",
                str(Path(__file__).parent),
                str(target),
                str(revisions),
                str(files),
            ],
            check=True,
            env=brz_env(partial / "home"),
            stdout=subprocess.DEVNULL,
        )
        shutil.rmtree(path, ignore_errors=True)
        target.rename(path)
    finally:
        shutil.rmtree(partial)
    print(f"(built {path} in {time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return path


def _work() -> Path:
    WORK.mkdir(parents=True, exist_ok=True)
    return WORK


def fresh_dir(prefix: str) -> Path:
    """A new empty folder under the benchmark work folder."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=_work()))


def populate(root: Path, source: Path, *, bulk_size: int = 0) -> None:
    """Fill a served root: a copy of the branch, the small file, optionally a bulk file."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, root / "branch", symlinks=True)
    (root / SMALL_FILE).write_bytes(bytes(range(256)) * (SMALL_SIZE // 256))
    if bulk_size:
        with open(root / "bulk.bin", "wb") as out:
            block = random.Random(0).randbytes(1 << 20)
            for _ in range(bulk_size >> 20):
                out.write(block)


# Servers ----------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], object], what: str, deadline: float = START_DEADLINE):
    """Poll ``condition`` until it returns something true; fail after ``deadline`` s."""
    end = time.monotonic() + deadline
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > end:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


def accepts(port: int) -> bool:
    """True if something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@dataclass
class Server:
    """A server process started for a benchmark."""

    name: str
    argv: List[str]
    process: subprocess.Popen
    ports: dict = field(default_factory=dict)
    log: Optional[Path] = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def command(self) -> str:
        return shlex.join(self.argv)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            tail = self.log.read_text()[-2000:] if self.log and self.log.exists() else ""
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}\n{tail}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_smartserve(
    data: Path, *, ssh_keys: Optional[Path] = None, extra: Iterable[str] = (), code: Optional[Path] = None
) -> Server:
    """``twistd smartserve`` serving ``data``/branches over bzr:// (and SSH if keys given).

    Both listen on ports chosen by the kernel; they are read back from the
    log lines the listeners write when they start. ``code``, a checkout of
    smartserve, runs that code rather than the installed one.
    """
    log = data / "twistd.log"
    argv = [
        str(BIN / "twistd"),
        "-n",
        f"--logfile={log}",
        "--pidfile=",
        "smartserve",
        f"--data={data}",
        "--bzr=tcp:0:interface=127.0.0.1",
        "--bzr-allow-writes",
    ]
    if ssh_keys is not None:
        argv += ["--ssh=tcp:0:interface=127.0.0.1", f"--keys={ssh_keys}"]
    else:
        argv += ["--ssh=none"]
    argv += list(extra)
    data.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    env = brz_env(data / "home") if code is None else brz_env(data / "home", PYTHONPATH=str(code))
    process = subprocess.Popen(argv, cwd=data, env=env, stdin=subprocess.DEVNULL)
    server = Server("smartserve", argv, process, log=log)
    wanted = {"bzr", "ssh"} if ssh_keys is not None else {"bzr"}

    def ports():
        server.check_alive()
        found = _listening_ports(log.read_text())
        return found if wanted <= set(found) else None

    server.ports = wait_for(ports, "smartserve to listen")
    return server


def _listening_ports(text: str) -> dict:
    """Listener name to port, from twistd's log."""
    found = {name: int(port) for name, port in re.findall(r"\] (\w+) listening on .*?port=(\d+)", text)}
    for factory, port in re.findall(r"\] (\S+) starting on (\d+)", text):
        found.setdefault("bzr" if factory == "SmartServerFactory" else "ssh", int(port))
    return found


def start_brz_serve(root: Path, home: Path) -> Server:
    """The reference: ``brz serve`` over TCP on the same kind of tree."""
    port = free_port()
    argv = [
        str(BIN / "brz"),
        "serve",
        "--listen=127.0.0.1",
        f"--port={port}",
        f"--directory={root}",
        "--allow-writes",
    ]
    log = home / "serve.out"
    home.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv, env=brz_env(home), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    server = Server("brz serve", argv, process, {"bzr": port}, log)

    def listening():
        server.check_alive()
        return accepts(port)

    wait_for(listening, "brz serve to listen")
    return server


# SSH -------------------------------------------------------------------


@dataclass
class SSHClient:
    """A key pair and an ``ssh`` wrapper that uses it, for Breezy and for us.

    OpenSSH reads its files from the passwd home, not ``$HOME``, so the
    wrapper passes a config file naming the key and known_hosts; putting
    ``bin`` first on ``PATH`` makes ``brz`` (``BRZ_SSH=openssh``) use it.
    """

    folder: Path

    @property
    def key(self) -> Path:
        return self.folder / "id_ed25519"

    @property
    def bin(self) -> Path:
        return self.folder / "bin"

    @property
    def ssh(self) -> Path:
        return self.bin / "ssh"

    @property
    def public_key(self) -> str:
        return (self.folder / "id_ed25519.pub").read_text().strip()

    def env(self, home: Path) -> dict:
        """``brz_env`` plus what makes ``brz`` reach the servers with this key."""
        env = brz_env(home, BRZ_SSH="openssh")
        env["PATH"] = f"{self.bin}{os.pathsep}{env['PATH']}"
        return env

    def trust(self, port: int) -> None:
        """Add the host key of the server on 127.0.0.1:``port`` to known_hosts."""
        found = subprocess.run(
            ["ssh-keyscan", "-p", str(port), "-t", "ed25519", "127.0.0.1"],
            capture_output=True,
            check=True,
        ).stdout
        with open(self.folder / "known_hosts", "ab") as out:
            out.write(found)


def ssh_client(folder: Path) -> SSHClient:
    """A new ed25519 key and ``ssh`` wrapper in ``folder``."""
    client = SSHClient(folder)
    client.bin.mkdir(parents=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f", str(client.key)], check=True
    )
    (folder / "known_hosts").write_text("")
    (folder / "ssh_config").write_text(
        "Host *\n"
        f"  IdentityFile {client.key}\n"
        "  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {folder / 'known_hosts'}\n"
        "  StrictHostKeyChecking yes\n"
        "  BatchMode yes\n"
        "  LogLevel ERROR\n"
    )
    client.ssh.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {folder / "ssh_config"} "$@"\n')
    client.ssh.chmod(0o755)
    return client


def start_sshd(folder: Path, client: SSHClient, home: Path) -> Server:
    """OpenSSH ``sshd`` on 127.0.0.1 whose only use of the key runs ``brz serve --inet``.

    It runs as root with its own host key and authorized_keys; the key's
    forced command is what ``bzr+ssh://`` users of a plain OpenSSH host
    get. ``brz`` runs with ``home`` as its home so it reads no user config.
    """
    folder.mkdir(parents=True)
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    host_key = folder / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    home.mkdir(parents=True, exist_ok=True)
    command = f"{BIN / 'brz'} serve --inet --directory=/ --allow-writes"
    environment = ",".join(
        f'environment="{name}={value}"'
        for name, value in (("HOME", home), ("BRZ_HOME", home), ("BRZ_LOG", home / "brz.log"))
    )
    (folder / "authorized_keys").write_text(
        f'command="{command}",{environment},no-port-forwarding,no-X11-forwarding,'
        f"no-agent-forwarding,no-pty {client.public_key}\n"
    )
    port = free_port()
    config = folder / "sshd_config"
    config.write_text(
        f"Port {port}\n"
        "ListenAddress 127.0.0.1\n"
        f"HostKey {host_key}\n"
        f"PidFile {folder / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\n"
        "UsePAM no\n"
        "StrictModes no\n"
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PermitUserEnvironment yes\n"
        "MaxStartups 200\n"
        "PrintMotd no\n"
        "UseDNS no\n"
        "LogLevel ERROR\n"
    )
    argv = ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)]
    log = folder / "sshd.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    server = Server("sshd + brz serve --inet", argv, process, {"ssh": port}, log)

    def listening():
        server.check_alive()
        return accepts(port)

    wait_for(listening, "sshd to listen")
    return server


# Process memory ---------------------------------------------------------


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def rss_kib(pid: int) -> int:
    """Resident set size of a process now, in KiB."""
    return _status_kib(pid, "VmRSS")


def peak_rss_kib(pid: int) -> int:
    """Highest resident set size of a process since it started or since ``reset_peak_rss``."""
    return _status_kib(pid, "VmHWM")


def reset_peak_rss(pid: int) -> None:
    """Make the process's peak RSS its current RSS (Linux ``clear_refs`` 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def pss_kib(pid: int) -> int:
    """Proportional set size: RSS with shared pages split between their users."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise KeyError("Pss")


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and of its children it has waited for, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def alternating(servers: list, runs: int, figure: Callable) -> tuple[list, list]:
    """Run ``figure(server)`` ``runs`` times per server, the servers taking turns.

    Each server needs a ``pid``. Returns, per server, the figures and the
    server CPU seconds each run cost: unlike wall time, CPU time barely
    depends on what else the machine runs.
    """
    samples: list = [[] for _ in servers]
    cpu: list = [[] for _ in servers]
    for run in range(runs):
        order = list(enumerate(servers))
        for index, server in order if run % 2 == 0 else order[::-1]:
            before = cpu_seconds(server.pid)
            samples[index].append(figure(server))
            cpu[index].append(cpu_seconds(server.pid) - before)
    return samples, cpu


def descendants(pid: int) -> List[int]:
    """Every process below ``pid`` in the process tree (children first found first)."""
    children: dict = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


# Clients and figures ----------------------------------------------------


def run_brz(args: Iterable[str], env: dict, cwd: Path) -> float:
    """Wall time in seconds of one ``brz`` command; fails loudly if it fails."""
    argv = [str(BIN / "brz"), *args]
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True)
    elapsed = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"{shlex.join(argv)} failed:\n{done.stderr.decode(errors='replace')}")
    return elapsed


def time_branch(url: str, env: dict, scratch: Path) -> float:
    """Seconds for ``brz branch URL`` into a new folder, which is then removed."""
    target = Path(tempfile.mkdtemp(prefix="clone-", dir=scratch))
    try:
        return run_brz(["branch", "-q", url, str(target / "b")], env, scratch)
    finally:
        shutil.rmtree(target)


def small_gets(client, path: bytes, count: int) -> float:
    """Microseconds per ``get`` for ``count`` sequential gets of ``path`` on one client."""
    expected = None
    started = time.perf_counter()
    for _ in range(count):
        response, protocol = client.call_expecting_body(b"get", path)
        body = protocol.read_body_bytes()
        if expected is None:
            if response != (b"ok",) or len(body) != SMALL_SIZE:
                raise RuntimeError(f"get {path!r} answered {response!r} with {len(body)} bytes")
            expected = body
    return (time.perf_counter() - started) / count * 1e6


def run_in_reactor(make_coroutine: Callable):
    """Run the coroutine ``make_coroutine()`` makes in Twisted's reactor, started in a thread on
    first use, and return its result.

    The Breezy measurements block, so they run in the main thread while the
    reactor waits idle in its own.
    """
    from twisted.internet import defer
    from twisted.internet.threads import blockingCallFromThread

    from smartserve.client._blocking import _running_reactor

    reactor = _running_reactor()
    return blockingCallFromThread(reactor, lambda: defer.Deferred.fromCoroutine(make_coroutine()))


def median(samples: Iterable[float]) -> float:
    return statistics.median(list(samples))


def paired_ratio(a: List[float], b: List[float]) -> str:
    """The mean of the ratios b / a of figures taken side by side, with its standard error: ``1.012 ± 0.008``.

    Drift on the machine hits both figures of a pair alike, so it cancels.
    """
    ratios = [y / x for x, y in zip(a, b)]
    return f"{statistics.fmean(ratios):.3f} ± {statistics.stdev(ratios) / len(ratios) ** 0.5:.3f}"


@dataclass
class Row:
    """One line of a results table: smartserve's and the reference's figure.

    ``goal`` bounds the ratio ours / reference; ``absolute_goal`` bounds
    our figure itself. ``lower_is_better`` says which way either bound goes.
    """

    figure: str
    ours: float
    reference: float
    goal: Optional[float] = None
    lower_is_better: bool = True
    unit_format: str = "{:,.1f}"
    absolute_goal: Optional[float] = None

    @property
    def ratio(self) -> float:
        return self.ours / self.reference

    def _met(self, value: float, bound: float) -> bool:
        return value <= bound if self.lower_is_better else value >= bound

    @property
    def verdict(self) -> str:
        if self.goal is not None:
            return "met" if self._met(self.ratio, self.goal) else "MISSED"
        if self.absolute_goal is not None:
            return "met" if self._met(self.ours, self.absolute_goal) else "MISSED"
        return ""

    def goal_text(self) -> str:
        sign = "≤" if self.lower_is_better else "≥"
        if self.goal is not None:
            return f"{sign} {self.goal:.2f}×"
        if self.absolute_goal is not None:
            return f"{'<' if self.lower_is_better else '>'} {self.unit_format.format(self.absolute_goal)}"
        return "-"


def report(rows, reference: str, work) -> None:
    """Print the machine's load now and the results table, then remove the run's folder."""
    print(f"at the end: {load()}")
    print()
    print_table(rows, reference=reference)
    shutil.rmtree(work, ignore_errors=True)


def print_table(rows: List[Row], ours: str = "smartserve", reference: str = "reference") -> None:
    """Print the figures side by side with ratio and goal, as text and as Markdown."""
    width = max(len(row.figure) for row in rows) + 2
    print(f"{'figure':<{width}}{ours:>14}{reference:>14}{'ratio':>8}  goal")
    for row in rows:
        fmt = row.unit_format
        print(
            f"{row.figure:<{width}}{fmt.format(row.ours):>14}{fmt.format(row.reference):>14}"
            f"{row.ratio:>7.2f}×  {row.goal_text()} {row.verdict}"
        )
    print()
    print(f"| figure | {ours} | {reference} | ratio | goal |")
    print("|---|---:|---:|---:|---|")
    for row in rows:
        fmt = row.unit_format
        print(
            f"| {row.figure} | {fmt.format(row.ours)} | {fmt.format(row.reference)} "
            f"| {row.ratio:.2f}× | {row.goal_text()} {row.verdict} |"
        )

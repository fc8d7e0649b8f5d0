"""Process-wide set-up the server does as it starts."""

from __future__ import annotations

import gc
import os
import resource
import socket
import weakref
from pathlib import Path

import pytest

from support import SmartserveProcess
from smartserve.service import freeze_loaded_objects, raise_open_file_limit


class _Cycle:
    pass


def test_start_up_objects_are_frozen_and_garbage_is_not():
    """What start-up left alive is kept out of full collections; garbage is collected first, not kept for good."""
    garbage = _Cycle()
    garbage.itself = garbage
    gone = weakref.ref(garbage)
    del garbage
    try:
        freeze_loaded_objects()
        assert gc.get_freeze_count() > 0
        assert gone() is None
    finally:
        gc.unfreeze()


def _lowered_open_file_limit():
    """Lower this process's soft open-file limit (children inherit it); returns (soft, hard, lowered).

    Lowered to 256, or a little above the descriptors this process has open
    if that is more; skips where the hard limit leaves nothing to raise to.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = max(256, len(os.listdir("/proc/self/fd")) + 64)
    if hard != resource.RLIM_INFINITY and hard <= lowered:
        pytest.skip(f"the open-file hard limit is {hard}: nothing to raise to")
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    return soft, hard, lowered


def test_open_file_limit_is_raised_to_the_hard_limit():
    soft, hard, lowered = _lowered_open_file_limit()
    try:
        before, after = raise_open_file_limit()
        assert before == lowered
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (after, hard)
        assert after == hard or hard == resource.RLIM_INFINITY and after > lowered
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_server_started_with_a_low_open_file_limit_raises_it(start_smartserve):
    """The limit a service manager or shell hands down is raised as the server starts, and logged."""
    soft, hard, lowered = _lowered_open_file_limit()
    try:
        server = start_smartserve("--bzr", "tcp:0:interface=127.0.0.1", "--ssh", "none")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    limits = Path(f"/proc/{server.process.pid}/limits").read_text()
    [open_files] = [line for line in limits.splitlines() if line.startswith("Max open files")]
    assert int(open_files.split()[3]) > lowered
    assert f"Open-file limit raised from {lowered}" in server.log()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-auth-tries", "0"], "--max-auth-tries must be at least 1"),
        (["--max-unauthenticated-per-address", "-1"], "--max-unauthenticated-per-address must be 0 or more"),
        (["--bzr-max-connections-per-address", "-1"], "--bzr-max-connections-per-address must be 0 or more"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--max-request-body", "0"], "--max-request-body must be at least 1"),
        (["--max-request-entries", "0"], "--max-request-entries must be at least 1"),
        (["--max-request-memory", "-1"], "--max-request-memory must be 0 or more"),
        (
            ["--max-request-body", "2000", "--max-request-memory", "1999"],
            "--max-request-memory must be 0 or at least --max-request-body",
        ),
        (["--max-request-memory-per-caller", "-1"], "--max-request-memory-per-caller must be 0 or more"),
        (
            ["--max-request-body", "2000", "--max-request-memory-per-caller", "1999"],
            "--max-request-memory-per-caller must be 0 or at least --max-request-body",
        ),
        (["--idle-timeout", "-1"], "--idle-timeout must be 0 or more"),
        (["--hold-response-bytes", "-1"], "--hold-response-bytes must be 0 or more"),
        (["--inline-read-bytes", "1048577"], "--inline-read-bytes must be at most 1048576"),
        (["--drain-timeout", "nan"], "--drain-timeout must be a finite number"),
        (["--drain-timeout", "inf"], "--drain-timeout must be a finite number"),
        (["--drain-linger", "nan"], "--drain-linger must be a finite number"),
        (["--ssh", "none"], "nothing to serve"),
        (["--bzr", "tcp:abc"], "--bzr tcp:abc: not an endpoint description Twisted reads"),
        (["--ssh", "tpc:5022"], "--ssh tpc:5022: not an endpoint description Twisted reads: Unknown endpoint type"),
        (["--admin", "tcp:1:interfce=127.0.0.1"], "--admin tcp:1:interfce=127.0.0.1: not an endpoint description"),
    ],
)
def test_options_refuse_values_that_cannot_work(tmp_path, args, message):
    """A bad option value stops ``twistd smartserve`` with a usage error naming the option."""
    from twisted.python.usage import UsageError

    from smartserve.service import Options

    with pytest.raises(UsageError, match=message):
        Options().parseOptions(["--data", str(tmp_path), *args])


def test_option_defaults_for_ssh_logins(tmp_path):
    from smartserve.service import Options

    options = Options()
    options.parseOptions(["--data", str(tmp_path)])
    assert (options["max-auth-tries"], options["ssh-debug"]) == (6, False)


def test_relative_paths_are_made_absolute_before_twistd_changes_folder(tmp_path, monkeypatch):
    """Paths are resolved where twistd was started, not in its --rundir, where the keys and access file are read again later."""
    from smartserve.service import Options

    monkeypatch.chdir(tmp_path)
    options = Options()
    relative = ["keys", "access", "host-key", "control", "takeover", "access-log"]
    options.parseOptions(["--data", "data", *(f"--{name}=x/{name}" for name in relative)])
    assert {name: options[name] for name in relative} == {name: str(tmp_path / "x" / name) for name in relative}


def test_control_path_that_is_not_a_socket_is_left_alone(tmp_path):
    """A --control path naming an existing file stops the start with a clear error; the file is not removed."""
    precious = tmp_path / "access"
    precious.write_text("alice read-only\n")
    server = SmartserveProcess(
        tmp_path / "data", ["--bzr", "tcp:0:interface=127.0.0.1", "--ssh", "none", "--control", str(precious)]
    )
    server.start_expecting_exit()
    assert server.process.returncode == 1
    assert precious.read_text() == "alice read-only\n"
    assert f"could not start: {precious} exists and is not a socket" in server.log()


def test_port_in_use_is_a_one_line_error_naming_the_listener(tmp_path):
    """A port that is taken stops the start with one line naming the listener and the reason, then exit status 1."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        endpoint = f"tcp:{port}:interface=127.0.0.1"
        server = SmartserveProcess(tmp_path / "data", ["--bzr", endpoint, "--ssh", "none"])
        server.start_expecting_exit()
    assert server.process.returncode == 1
    [line] = [line for line in server.log().splitlines() if "could not start" in line]
    assert line.endswith(
        f"smartserve could not start: bzr endpoint '{endpoint}': "
        f"Couldn't listen on 127.0.0.1:{port}: [Errno 98] Address already in use."
    )


def test_failed_start_closes_what_it_opened_and_exits_without_a_drain(tmp_path):
    """A start that fails after one listener opened (the --admin port is taken) exits 1 at once: no drain, whatever --drain-grace says."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        admin = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
        server = SmartserveProcess(
            tmp_path / "data",
            ["--bzr", "tcp:0:interface=127.0.0.1", "--ssh", "none", "--admin", admin, "--drain-grace", "100000"],
        )
        server.start_expecting_exit()
    assert server.process.returncode == 1
    log = server.log()
    assert "bzr listening on" in log and f"could not start: admin endpoint '{admin}'" in log
    assert "Draining" not in log and "Drained" not in log


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{file}"], "--data {file} is not a folder"),
        (["--root", "{file}"], "--root {file} is not a folder"),
        (["--keys", "{file}"], "--keys {file} is not a folder"),
        (["--access", "{missing}"], "cannot read the access file {missing}: No such file or directory"),
        (["--access", "{file}"], "{file}:1: not UTF-8 text"),
        (["--access", "{fifo}"], "cannot read the access file {fifo}: not a regular file"),
        (["--host-key", "{file}"], "cannot load host key {file}: not a key in a format this server reads (OpenSSH or PEM)"),
        (["--host-key", "{missing}"], "cannot load host key {missing}: No such file or directory"),
        (["--host-key", "{fifo}"], "cannot load host key {fifo}: not a regular file"),
        (["--access-log", "{missing}/access.log"], "--access-log {missing}/access.log: No such file or directory"),
    ],
)
def test_unusable_file_or_folder_is_a_one_line_error(tmp_path, args, message):
    """A path option naming something the server cannot use stops it before it listens: one line on stderr, status 1."""
    paths = {"file": tmp_path / "a-file", "missing": tmp_path / "missing", "fifo": tmp_path / "a-fifo"}
    paths["file"].write_bytes(b"\xff")
    os.mkfifo(paths["fifo"])
    server = SmartserveProcess(
        tmp_path / "data", ["--ssh", "tcp:0:interface=127.0.0.1", *(arg.format(**paths) for arg in args)]
    )
    said = server.start_expecting_exit()
    assert server.process.returncode == 1
    stderr, _ = said.split("\n", 1)
    assert stderr.startswith("smartserve could not start: " + message.format(**paths))
    assert "Traceback" not in said


@pytest.mark.parametrize("option", ["data", "root", "keys"])
def test_folder_whose_parent_is_missing_is_a_one_line_error_and_nothing_is_created(tmp_path, option):
    """A mistyped --data, --root or --keys stops the start naming the missing parent; no folder is made on the way."""
    missing = tmp_path / "missing"
    given = missing / option
    server = SmartserveProcess(tmp_path / "data", ["--ssh", "tcp:0:interface=127.0.0.1", f"--{option}", str(given)])
    said = server.start_expecting_exit()
    assert server.process.returncode == 1
    stderr, _ = said.split("\n", 1)
    assert stderr == f"smartserve could not start: --{option} {given}: its parent folder {missing} does not exist"
    assert "Traceback" not in said
    assert not missing.exists()

"""`smartserve call` and the blocking facade, run as real processes against `brz serve`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from smartserve.client._commandline import escape_bytes


def smartserve_call(*args, stdin=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smartserve.cli", "call", *map(str, args)],
        capture_output=True,
        input=stdin,
        timeout=60,
    )


def test_call_command_prints_tuple_and_escaped_body(brz_serve, workdir):
    """A successful call prints the response tuple, then the body with binary bytes escaped, and exits 0."""
    path, remote = workdir
    (path / "blob").write_bytes(b"text\n\x00\xff\\end")
    done = smartserve_call(brz_serve.url, "get", f"{remote}/blob")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == "(b'ok',)\ntext\n\\x00\\xff\\\\end\n"


def test_call_command_sends_body_from_stdin(brz_serve, workdir):
    """`--body-file -` sends standard input as the request body."""
    path, remote = workdir
    done = smartserve_call(brz_serve.url, "put", f"{remote}/new", "", "--body-file", "-", stdin=b"from stdin")
    assert done.returncode == 0, done.stderr
    assert (path / "new").read_bytes() == b"from stdin"


def test_call_command_remote_error_exits_1(brz_serve, workdir):
    """An error answer is printed on stderr with its tuple and the exit status is 1."""
    path, remote = workdir
    done = smartserve_call(brz_serve.url, "get", f"{remote}/missing")
    assert done.returncode == 1
    assert b"NoSuchFile" in done.stderr


def test_call_command_bad_usage_exits_2():
    """A missing verb or an unsupported URL scheme is a usage error: exit status 2."""
    assert smartserve_call("bzr://127.0.0.1:1/").returncode == 2
    done = smartserve_call("http://example.invalid/", "hello")
    assert done.returncode == 2
    assert b"unsupported URL scheme" in done.stderr


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf"])
def test_call_command_timeout_must_be_a_finite_positive_number(timeout):
    """A --timeout that cannot bound the call is a usage error (exit 2), not a call that gives up at once."""
    done = smartserve_call("bzr://127.0.0.1:1/", "hello", f"--timeout={timeout}")
    assert done.returncode == 2, done.stderr
    assert b"--timeout: must be a finite number of seconds, more than 0" in done.stderr


def test_call_command_no_server_exits_3():
    """A server that cannot be reached gives exit status 3 within the deadline."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    done = smartserve_call(f"bzr://127.0.0.1:{port}/", "hello", "--timeout", "3")
    assert done.returncode == 3
    assert b"could not connect" in done.stderr


def test_blocking_client_serves_calls_from_several_threads(brz_serve, workdir):
    """BlockingClient answers calls made from plain threads, sharing one pool."""
    path, remote = workdir
    (path / "f").write_bytes(b"abc")
    script = textwrap.dedent(
        f"""
        import concurrent.futures
        from smartserve.client import BlockingClient, NoSuchFile
        with BlockingClient({brz_serve.url!r}, pool_size=2) as client:
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                bodies = list(pool.map(lambda _: client.call(b"get", b"{remote}/f").body, range(8)))
            assert bodies == [b"abc"] * 8, bodies
            try:
                client.call(b"get", b"{remote}/nothing")
            except NoSuchFile:
                print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"ok\n"


def test_escape_bytes_keeps_text_and_escapes_the_rest():
    """Printable ASCII, newline and tab stay; a backslash is doubled; other bytes become \\xNN."""
    assert escape_bytes(b"a\tb\n\\\x00\x7f\xe9") == "a\tb\n\\\\\\x00\\x7f\\xe9"


def test_call_command_raw_writes_body_bytes_unescaped(brz_serve, workdir):
    """`--raw` writes the response body byte for byte after the tuple line."""
    path, remote = workdir
    data = bytes(range(256))
    (path / "raw").write_bytes(data)
    done = smartserve_call(brz_serve.url, "get", f"{remote}/raw", "--raw")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"(b'ok',)\n" + data


def test_call_command_over_ssh_uses_key_and_known_hosts(openssh, tmp_path):
    """Over bzr+ssh:// the key and known_hosts options reach the SSH connection."""
    (tmp_path / "f").write_bytes(b"over ssh")
    done = smartserve_call(
        openssh.url(), "get", f"{tmp_path}/f",
        "-i", openssh.client_key, "--known-hosts", openssh.known_hosts, "--no-agent",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"(b'ok',)\nover ssh\n"
    assert done.stderr == b""
    verbose = smartserve_call(
        openssh.url(), "hello", "-v", "-i", openssh.client_key, "--known-hosts", openssh.known_hosts, "--no-agent"
    )
    assert verbose.returncode == 0, verbose.stderr
    assert b"NEW KEYS" in verbose.stderr and b"trying to auth with b'publickey'" in verbose.stderr
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    refused = smartserve_call(
        openssh.url(), "hello", "-i", openssh.client_key, "--known-hosts", empty, "--no-agent"
    )
    assert refused.returncode == 3
    assert b"not in" in refused.stderr


def test_call_command_output_closed_by_its_reader_exits_141_quietly(brz_serve, workdir):
    """An answer written to a pipe nobody reads any more (`| head`) ends with status 141, as SIGPIPE would, and no traceback."""
    path, remote = workdir
    (path / "f").write_bytes(b"data")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "smartserve.cli", "call", brz_serve.url, "get", f"{remote}/f"],
            stdout=write_end, stderr=subprocess.PIPE, timeout=60,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr
    assert done.stderr == b""


def test_call_command_raw_output_cut_short_by_its_reader_exits_141(brz_serve, workdir):
    """A raw body larger than a pipe holds, its reader leaving after one byte (`| head -c 1`), ends with 141.

    Found wrong: the partial write went unnoticed and the command exited 0
    with the body cut short.
    """
    path, remote = workdir
    (path / "large").write_bytes(bytes(range(256)) * 1200)  # 300 KiB, several pipe buffers
    caller = subprocess.Popen(
        [sys.executable, "-m", "smartserve.cli", "call", "--raw", brz_serve.url, "get", f"{remote}/large"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    reader = subprocess.run(["head", "-c", "1"], stdin=caller.stdout, capture_output=True, timeout=60)
    caller.stdout.close()
    stderr = caller.stderr.read()
    caller.stderr.close()
    assert caller.wait(timeout=60) == 141, stderr
    assert reader.stdout == b"(" and stderr == b""


def test_call_command_passes_arguments_as_the_bytes_given(brz_serve, workdir):
    """An argument that is not UTF-8 (a Latin-1 file name) goes out as the bytes given, not a traceback.

    `brz serve` refuses a path that is not UTF-8, and that answer is what the command prints.
    """
    path, remote = workdir
    done = subprocess.run(
        [os.fsencode(sys.executable), b"-m", b"smartserve.cli", b"call", brz_serve.url.encode(), b"get",
         remote.encode() + b"/caf\xe9"],
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(b"error: (b'error', "), done.stderr
    assert b"Traceback" not in done.stderr



_IN_THREAD = """
import threading

def in_thread(function, *args):
    \"\"\"Start ``function(*args)`` in a daemon thread; the returned join() gives its result or exception.\"\"\"
    outcome = []

    def run():
        try:
            outcome.append(function(*args))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join():
        thread.join(20)
        return outcome[0] if outcome else "still waiting"

    return join
"""


def run_script(source: str) -> subprocess.CompletedProcess:
    """Run ``source`` in a new Python process, with ``in_thread`` defined."""
    return subprocess.run([sys.executable, "-c", _IN_THREAD + textwrap.dedent(source)], capture_output=True, timeout=60)


def test_blocking_client_refuses_a_reactor_that_already_ran():
    """After the reactor ran and stopped, a BlockingClient made in another thread raises RuntimeError, not waits forever."""
    done = run_script(
        """
        from twisted.internet import reactor
        from smartserve.client import BlockingClient
        reactor.callWhenRunning(reactor.stop)
        reactor.run()
        print(in_thread(BlockingClient, "bzr://127.0.0.1:1/")())
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith(b"it ran before in this process, and a reactor cannot be restarted\n"), done.stdout


def test_blocking_client_call_in_progress_fails_when_the_reactor_stops():
    """A call waiting for an answer when the reactor stops raises RuntimeError, and so does a later call."""
    done = run_script(
        """
        import socket
        from twisted.internet import reactor
        from smartserve.client import BlockingClient
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            client = BlockingClient("bzr://127.0.0.1:%d/" % silent.getsockname()[1])
            call = in_thread(client.call, b"hello")
            accepted, _ = silent.accept()
            accepted.recv(1)  # the request is on its way: the call waits for the answer
            reactor.callFromThread(reactor.stop)
            print(call())
            print(in_thread(client.call, b"hello")())
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"the reactor stopped before the call ended\nthe reactor stopped; BlockingClient needs it running\n"


def test_call_command_interrupted_by_ctrl_c_exits_130_without_a_traceback(tmp_path):
    """Ctrl-C while waiting for an answer ends the command as a shell expects, with no Python traceback."""
    import signal
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    port = silent.getsockname()[1]
    command = subprocess.Popen(
        [sys.executable, "-m", "smartserve.cli", "call", f"bzr://127.0.0.1:{port}/", "get", "/file"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        silent.settimeout(30)
        connection, _ = silent.accept()  # the command is connected and waits for the answer
        with connection:
            connection.settimeout(30)
            assert connection.recv(4096)  # the request arrived: it now waits for the answer
            command.send_signal(signal.SIGINT)
            _, stderr = command.communicate(timeout=30)
    finally:
        command.kill()
        silent.close()
    assert command.returncode == 130, stderr
    assert b"Traceback" not in stderr

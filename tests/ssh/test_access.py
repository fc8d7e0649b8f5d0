"""The access file and the write rights built from it."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from smartserve.server.jail import Writable
from smartserve.ssh import AccessFileError, AccessPolicy, Rights, SSHSetupError, parse_access
from smartserve.ssh._access import MAX_ACCESS_FILE_BYTES
from smartserve.ssh._session import writable_for
from support import logged_events

from .conftest import make_unusual_file

EXAMPLE = """\
# Release managers may also write to the shared trees.
rm1     write /projects/release/ /shared   # prefixes end in '/' once parsed
rm1     write /projects/docs/
guest   read-only
admin   write /
*       read-only
"""


def test_parse_access_default_is_home_only():
    """With no file, a user may write under /~user/ only."""
    assert parse_access("").rights_for("alice") == Rights(False, ("/~alice/",))


def test_parse_access_grants_extra_prefixes():
    """``write`` lines add prefixes to the user's home, merged across lines."""
    rules = parse_access(EXAMPLE)
    assert rules.rights_for("rm1") == Rights(
        False, ("/~rm1/", "/projects/release/", "/shared/", "/projects/docs/")
    )


def test_parse_access_read_only_and_default():
    """``read-only`` takes every write away; ``*`` applies to users without a line."""
    rules = parse_access(EXAMPLE)
    assert rules.rights_for("guest") == Rights(True, ())
    assert rules.rights_for("someone") == Rights(True, ())
    assert rules.rights_for("admin") == Rights(False, ("/~admin/", "/"))


@pytest.mark.parametrize(
    "text, line, words",
    [
        ("alice write\n", 1, "needs at least one prefix"),
        ("# ok\nalice frobnicate /x/\n", 2, "unknown keyword"),
        ("\n\n../x write /a/\n", 3, "invalid user name"),
        ("alice write relative/\n", 1, "must start with '/'"),
        ("alice write /a/../b/\n", 1, "'..'"),
        ("alice write /a//b/\n", 1, "empty"),
        ("alice write /a%2e/\n", 1, "'%'"),
        ("alice read-only /x/\n", 1, "takes no prefixes"),
        ("alice read-only\nalice write /x/\n", 2, "both read-only and granted write"),
        ("alice write /x/\nalice read-only\n", 2, "both read-only and granted write"),
        ("alice\n", 1, "expected"),
    ],
)
def test_parse_access_errors_name_the_line(text, line, words):
    """Each mistake is reported with the file name and its line number."""
    with pytest.raises(AccessFileError) as error:
        parse_access(text, "access.conf")
    assert error.value.line_number == line
    assert str(error.value).startswith(f"access.conf:{line}: ")
    assert words in str(error.value)


def test_access_policy_reloads_changed_file(tmp_path):
    """An edited access file applies to the next session without a restart."""
    path = tmp_path / "access"
    path.write_text("alice read-only\n")
    policy = AccessPolicy(str(path))
    assert policy.rights_for("alice").read_only
    path.write_text("alice write /team/\n")
    os.utime(path, ns=(1, 2))
    assert policy.rights_for("alice") == Rights(False, ("/~alice/", "/team/"))


def test_access_policy_keeps_last_rules_when_file_breaks(tmp_path):
    """A file that turns invalid leaves the last valid rules in force."""
    path = tmp_path / "access"
    path.write_text("guest read-only\n")
    policy = AccessPolicy(str(path))
    path.write_text("guest write\n")
    os.utime(path, ns=(1, 2))
    assert policy.rights_for("guest").read_only


def test_access_policy_logs_a_vanished_file_once_not_at_every_login(tmp_path):
    """A removed access file is reported once and the last rules stay; once back, it is read again."""
    path = tmp_path / "access"
    path.write_text("guest read-only\n")
    policy = AccessPolicy(str(path))
    with logged_events(lambda event: event.get("log_namespace") == "smartserve.ssh._access") as events:
        path.unlink()
        assert all(policy.rights_for("guest").read_only for _ in range(3))
        path.write_text("guest write /shared/\n")
        assert policy.rights_for("guest") == Rights(False, ("/~guest/", "/shared/"))
    assert [event["log_format"] for event in events] == [
        "access file {path} unreadable ({error}); keeping the last rules",
        "access file {path} reloaded",
    ]


def _make_unusual(path, kind):
    """Put a FIFO, a folder, a device or a file one byte too large at ``path``."""
    make_unusual_file(path, kind, "guest read-only\n" + "#" * MAX_ACCESS_FILE_BYTES)


def _in_thread(path, call):
    """Run ``call`` in a thread; return whether it was stuck after 10 s, then its result or exception."""
    outcome = []

    def run():
        try:
            outcome.append(("returned", call()))
        except Exception as error:
            outcome.append(("raised", error))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=10)
    stuck = worker.is_alive()
    if stuck and stat.S_ISFIFO(os.stat(path).st_mode):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # let the stuck open return, so the thread ends
        worker.join()
    return stuck, outcome


@pytest.mark.parametrize("kind", ["fifo", "folder", "device", "huge"])
def test_access_file_that_is_not_a_small_regular_file_fails_at_startup(tmp_path, kind):
    """A FIFO, folder, device or huge access file stops the start at once with one line, not a stuck open or read."""
    path = tmp_path / "access"
    _make_unusual(path, kind)
    stuck, outcome = _in_thread(path, lambda: AccessPolicy(str(path)))
    assert not stuck
    [(how, error)] = outcome
    assert how == "raised" and isinstance(error, SSHSetupError)
    why = f"larger than {MAX_ACCESS_FILE_BYTES} bytes" if kind == "huge" else "not a regular file"
    assert str(error) == f"cannot read the access file {path}: {why}"


@pytest.mark.parametrize("kind", ["fifo", "folder", "device", "huge"])
def test_access_file_replaced_by_what_is_not_a_small_regular_file_keeps_the_rules(tmp_path, kind):
    """An access file replaced by a FIFO, folder, device or huge file is logged once and the last rules stay."""
    path = tmp_path / "access"
    path.write_text("guest read-only\n")
    policy = AccessPolicy(str(path))
    path.unlink()
    _make_unusual(path, kind)
    with logged_events(lambda event: event.get("log_namespace") == "smartserve.ssh._access") as events:
        stuck, outcome = _in_thread(path, lambda: [policy.rights_for("guest") for _ in range(3)])
    assert not stuck
    assert outcome == [("returned", [Rights(True, ())] * 3)]
    assert [event["error"] for event in events] == [
        f"cannot read the access file {path}: "
        + (f"larger than {MAX_ACCESS_FILE_BYTES} bytes" if kind == "huge" else "not a regular file")
    ]


def test_access_policy_invalid_file_fails_at_startup(tmp_path):
    """An invalid access file stops the server from starting."""
    path = tmp_path / "access"
    path.write_text("guest sometimes\n")
    with pytest.raises(AccessFileError):
        AccessPolicy(str(path))


def test_writable_for_maps_rights_and_command():
    """Rights become jail write rights; a session without --allow-writes is read-only."""
    home = Rights(False, ("/~alice/", "/team/"))
    assert writable_for(home, allow_writes=True) == Writable.under("/~alice/", "/team/")
    assert writable_for(home, allow_writes=False) == Writable.nowhere()
    assert writable_for(Rights(True, ()), allow_writes=True) == Writable.nowhere()
    assert writable_for(Rights(False, ("/~a/", "/")), allow_writes=True) == Writable.everywhere()
    assert writable_for(home, allow_writes=True).allows("/~alice/trunk/.bzr/x")
    assert not writable_for(home, allow_writes=True).allows("/~alicex/trunk")


def test_access_doc_example_parses_as_described():
    """The example in doc/access.md is a valid access file meaning what the text says."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "doc" / "access.md").read_text()
    example_block = doc.split("Example:\n\n", 1)[1].split("\n\n", 1)[0]
    rules = parse_access("\n".join(line[4:] for line in example_block.splitlines()))
    assert rules.rights_for("rm1").write_prefixes == (
        "/~rm1/",
        "/projects/release/",
        "/projects/docs/",
    )
    assert rules.rights_for("robot").read_only
    assert writable_for(rules.rights_for("admin"), allow_writes=True) == Writable.everywhere()
    assert rules.rights_for("anyone").read_only


def test_access_file_that_is_not_utf8_is_reported_with_its_line(tmp_path):
    """A file with a byte that is not UTF-8 fails at startup naming the line, and on reload keeps the last rules."""
    path = tmp_path / "access"
    path.write_bytes(b"# \xe9quipe\nbob read-only\n")
    with pytest.raises(AccessFileError) as error:
        AccessPolicy(str(path))
    assert str(error.value) == f"{path}:1: not UTF-8 text"
    path.write_text("bob read-only\n")
    policy = AccessPolicy(str(path))
    path.write_bytes(b"bob write /\n# \xe9\n")
    os.utime(path, ns=(1, 2))
    assert policy.rights_for("bob").read_only

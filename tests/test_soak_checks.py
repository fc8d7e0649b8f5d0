"""The checks behind bench/soak's "duplicated" and "lost" figures, on journals made by hand."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

_SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak"


@pytest.fixture(scope="module")
def soak():
    loader = importlib.machinery.SourceFileLoader("soak_harness", str(_SOAK))
    spec = importlib.util.spec_from_loader("soak_harness", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    try:
        loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def _worker(name, acked=(), unknown=(), puts=None):
    return SimpleNamespace(name_=name, acked_appends=list(acked), unknown_appends=list(unknown), acked_puts=puts or {})


def _journal(root: Path, name: str, text: bytes) -> None:
    (root / "soak").mkdir(parents=True, exist_ok=True)
    (root / "soak" / f"journal-{name}").write_bytes(text)


def test_clean_journal_has_nothing_lost_or_duplicated(soak, tmp_path):
    """Every acknowledged line once, an outcome-unknown line absent: nothing to report."""
    _journal(tmp_path, "client-0", b"a\nb\n")
    worker = _worker("client-0", acked=[b"a\n", b"b\n"], unknown=[b"c\n"])
    assert soak.check_journals(tmp_path, [worker]) == (0, 0, [])


def test_outcome_unknown_line_may_be_present_once(soak, tmp_path):
    """An append whose outcome was unknown may have landed: once is allowed."""
    _journal(tmp_path, "client-0", b"a\nc\n")
    worker = _worker("client-0", acked=[b"a\n"], unknown=[b"c\n"])
    assert soak.check_journals(tmp_path, [worker])[:2] == (0, 0)


def test_line_twice_is_duplicated(soak, tmp_path):
    _journal(tmp_path, "client-0", b"a\nb\na\n")
    lost, duplicated, problems = soak.check_journals(tmp_path, [_worker("client-0", acked=[b"a\n", b"b\n"])])
    assert (lost, duplicated) == (0, 1)
    assert problems == ["duplicated x2: b'a\\n'"]


def test_line_of_an_append_reported_not_run_counts_as_duplicated(soak, tmp_path):
    """A line the client was told never ran must not be in the journal."""
    _journal(tmp_path, "client-0", b"a\nz\n")
    lost, duplicated, _ = soak.check_journals(tmp_path, [_worker("client-0", acked=[b"a\n"])])
    assert (lost, duplicated) == (0, 1)


def test_acknowledged_append_and_put_missing_are_lost(soak, tmp_path):
    _journal(tmp_path, "client-0", b"a\n")
    (tmp_path / "soak" / "kept").write_bytes(b"same")
    (tmp_path / "soak" / "changed").write_bytes(b"other")
    puts = {b"soak/kept": b"same", b"soak/changed": b"mine", b"soak/gone": b"x"}
    lost, duplicated, problems = soak.check_journals(tmp_path, [_worker("client-0", acked=[b"a\n", b"b\n"], puts=puts)])
    assert (lost, duplicated) == (3, 0)
    assert sorted(problems) == [
        "lost acknowledged append: b'b\\n'",
        "lost acknowledged put: b'soak/changed'",
        "lost acknowledged put: b'soak/gone'",
    ]


def test_missing_journal_loses_every_acknowledged_append(soak, tmp_path):
    lost, duplicated, _ = soak.check_journals(tmp_path, [_worker("client-1", acked=[b"a\n", b"b\n"])])
    assert (lost, duplicated) == (2, 0)


@pytest.mark.parametrize(
    "stderr, reason",
    [
        ("brz: ERROR: Connection closed: Unexpected end of message.", "connection-closed"),
        ("brz: ERROR: Could not acquire lock", "lock-held"),
        ("ssh: connect to host 127.0.0.1 port 5022: Connection refused", "connect-refused"),
        ("brz: ERROR: Not a branch", "brz-error"),
    ],
)
def test_brz_failure_reasons(soak, stderr, reason):
    assert soak._brz_reason(stderr) == reason


def test_near_restart_window(soak):
    """A call counts as near a restart from RESTART_WINDOW before it begins to RESTART_WINDOW after it ends."""
    restarts = [(10.0, 12.0, "kill -9")]
    window = soak.RESTART_WINDOW

    def call(started):
        return SimpleNamespace(started=started)

    assert soak.near_restart(call(10.0 - window), restarts)
    assert soak.near_restart(call(12.0 + window), restarts)
    assert not soak.near_restart(call(10.0 - window - 0.01), restarts)
    assert not soak.near_restart(call(12.0 + window + 0.01), restarts)


def test_brz_resends_are_read_from_breezys_own_warnings(soak):
    """The harness counts a request `brz` sent again from the warning Breezy's client prints, in its words."""
    from breezy.bzr.smart import client

    source = Path(client.__file__).read_text()
    assert '"ConnectionReset reading response for {!r}, retrying"' in source
    assert '"ConnectionReset calling {!r}, retrying"' in source
    stderr = (
        "ConnectionReset reading response for {!r}, retrying\n".format(b"Repository.get_stream_1.19")
        + "brz: warning: ConnectionReset calling {!r}, retrying\n".format(b"Branch.get_config_file")
    )
    assert soak._BRZ_RESENT.findall(stderr) == ["Repository.get_stream_1.19", "Branch.get_config_file"]

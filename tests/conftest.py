"""Fixtures shared by the test suite."""

from __future__ import annotations

import pytest

from support import Brz, SmartserveProcess


@pytest.fixture
def brz(tmp_path) -> Brz:
    """A `brz` runner with a private home folder."""
    return Brz(tmp_path / "home")


@pytest.fixture
def start_smartserve(tmp_path):
    """A function that starts a smartserve process with the given options; all are stopped after the test."""
    started = []

    def start(*extra_args, name: str = "server-data") -> SmartserveProcess:
        server = SmartserveProcess(tmp_path / name, list(extra_args)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def smartserve(start_smartserve):
    """A running smartserve serving bzr:// with writes allowed, on a free port."""
    return start_smartserve("--bzr", "tcp:0:interface=127.0.0.1", "--bzr-allow-writes", "--ssh", "none")

"""Breezy's process-wide set-up for serving, checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

_PROBE = """
import sys
from smartserve.server.backends.bzr import configure_breezy
configure_breezy()
wanted = {wanted!r}
print(sorted(name for name in wanted if name not in sys.modules))
"""


def test_lazy_modules_load_before_the_first_request():
    """Once set up for serving, the verb handlers' and the default format's modules are already imported.

    Breezy registers them lazily; loaded here, their import time is spent
    at start-up and not on the first clients after a restart.
    """
    wanted = [
        "breezy.bzr.smart.vfs",
        "breezy.bzr.smart.branch",
        "breezy.bzr.smart.repository",
        "breezy.bzr.smart.packrepository",
        "breezy.bzr.groupcompress_repo",
        "breezy.bzr.branch",
    ]
    result = subprocess.run(
        [sys.executable, "-c", _PROBE.format(wanted=wanted)], capture_output=True, text=True, timeout=50, check=True
    )
    assert result.stdout.strip() == "[]", f"not loaded at set-up: {result.stdout.strip()}"

"""Which exec commands start the smart server."""

from __future__ import annotations

import pytest

from smartserve.ssh import CommandRefused, ServeCommand, parse_serve_command


@pytest.mark.parametrize(
    "command, allow_writes",
    [
        (b"bzr serve --inet --directory=/ --allow-writes", True),
        (b"brz serve --inet --directory=/ --allow-writes", True),
        (b"/usr/bin/bzr serve --inet --directory=/ --allow-writes", True),
        (b"/opt/breezy/bin/brz serve --inet --directory=/ --allow-writes", True),
        (b"bzr serve --inet --directory / --allow-writes", True),
        (b"bzr serve --allow-writes --directory=/ --inet", True),
        (b"bzr serve --inet --directory=/", False),
        (b"'bzr' 'serve' '--inet' '--directory=/'", False),
    ],
)
def test_parse_serve_command_accepts_brz_spellings(command, allow_writes):
    """The command lines brz sends over bzr+ssh start the server, writable only with --allow-writes."""
    assert parse_serve_command(command) == ServeCommand(allow_writes=allow_writes)


@pytest.mark.parametrize(
    "command",
    [
        b"",
        b"ls",
        b"bzr",
        b"bzr serve",
        b"bzr log",
        b"git-upload-pack 'x'",
        b"bzr serve --directory=/ --allow-writes",
        b"bzr serve --inet --directory=/srv --allow-writes",
        b"bzr serve --inet --directory",
        b"bzr serve --inet --directory=/ --port=4155",
        b"bzr serve --inet --directory=/; rm -rf /",
        b"bin/bzr serve --inet --directory=/",
        b"/usr/bin/bzrx serve --inet --directory=/",
        b"bzr serve --inet --directory=/ 'unterminated",
        b"\xff serve --inet --directory=/",
    ],
)
def test_parse_serve_command_refuses_everything_else(command):
    """Any other command is refused with a one-line message."""
    with pytest.raises(CommandRefused) as refused:
        parse_serve_command(command)
    assert "\n" not in str(refused.value) and str(refused.value).startswith("smartserve:")

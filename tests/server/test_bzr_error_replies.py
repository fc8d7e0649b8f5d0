"""Error replies Breezy fails to make or to encode reach the client as errors its client reads, without tracebacks.

A request argument that is not UTF-8 made Breezy's error translation
raise (a Python 2 leftover), and a lock token given to a branch that is
not locked made Breezy answer a ``TokenMismatch`` holding None, which
bencode cannot carry: both were answered ``InternalError``, the first with
a traceback in the log for every request.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import LogLevel
from twisted.python.threadpool import ThreadPool

from smartserve.server.backends.bzr import BzrBackend
from smartserve.testing import encode_request, response_args, serve_in_memory
from support import logged_events, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A served folder holding an unlocked branch ``b``."""
    from breezy import controldir

    monkeypatch.setenv("BRZ_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("BRZ_LOG", str(tmp_path / "brz.log"))
    served = tmp_path / "root"
    served.mkdir()
    pool = ThreadPool(1, 1)
    BzrBackend(str(served), pool, reactor)  # sets Breezy up, as the server does
    controldir.ControlDir.create_branch_convenience(str(served / "b"))
    return served


@pytest.fixture
def warnings_and_failures():
    """Log events at warning level or above, and logged failures, while the test runs."""
    with logged_events(lambda event: event["log_level"] >= LogLevel.warn or "log_failure" in event) as events:
        yield events


async def _replies(root, *requests):
    """The response arguments to ``requests`` ((args, body) pairs), sent on one connection with writes allowed."""
    pool = ThreadPool(1, 2)
    pool.start()
    try:
        factory, protocol, transport = serve_in_memory(BzrBackend(str(root), pool, reactor))
        for args, body in requests:
            protocol.dataReceived(encode_request(args, body))
        await wait_until(
            lambda: protocol.requests_served == len(requests), 20, "every request to be answered"
        )
        assert not transport.disconnecting
        return response_args(transport.value())
    finally:
        pool.stop()


def _breezy_client_error(args: tuple) -> Exception:
    """The exception Breezy's client raises for error reply ``args`` to a request that gave lock token ``bogus``."""
    from breezy import errors
    from breezy.bzr import remote

    with pytest.raises(Exception) as raised:
        remote._translate_error(errors.ErrorFromSmartServer(args), token=b"bogus")
    return raised.value


NOT_UTF8 = [
    ((b"get", b"\xff\xfe"), None),
    ((b"stat", b"/\xff"), None),  # answered on the reactor thread
    ((b"BzrDir.open_branchV3", b"/\xff/"), None),
    ((b"Branch.get_config_file", b"\xff/"), None),
    ((b"Repository.get_revision_graph", b"b/\xff", b""), None),
    ((b"VersionedFileRepository.get_inventories", b"b/", b"\xff"), b"x"),
]


@pytest.mark.parametrize("args, body", NOT_UTF8, ids=[args[0].decode() for args, _ in NOT_UTF8])
@pytest_twisted.ensureDeferred
async def test_argument_that_is_not_utf8_gets_an_error_reply_and_one_log_line(
    root, warnings_and_failures, args, body
):
    """A path (or other text argument) that is not UTF-8 is answered with an error naming it; the log gets one
    warning line without a traceback, and the connection serves on."""
    from breezy.bzr.remote import UnknownErrorFromSmartServer

    reply, hello = await _replies(root, (args, body), ((b"hello",), None))
    assert reply[:2] == (b"error", b"UnicodeDecodeError")
    assert reply[2].startswith(b"not valid ") and b"\\xff" in reply[2]
    assert isinstance(_breezy_client_error(reply), UnknownErrorFromSmartServer)
    assert hello == (b"ok", b"2")
    [event] = warnings_and_failures
    assert "log_failure" not in event and event["log_level"] == LogLevel.warn
    assert event["verb"] == args[0].decode() and "not valid" in event["reason"]


WRITES_WITH_A_TOKEN = [
    ((b"Branch.set_config_option", b"b/", b"bogus", b"", b"value", b"name", b""), None),
    ((b"Branch.set_parent_location", b"b/", b"bogus", b"", b"http://example.com/"), None),
    ((b"Branch.put_config_file", b"b/", b"bogus", b""), b"a = b\n"),
    ((b"Branch.set_tags_bytes", b"b/", b"bogus", b""), b""),
]


@pytest.mark.parametrize(
    "args, body", WRITES_WITH_A_TOKEN, ids=[args[0].decode() for args, _ in WRITES_WITH_A_TOKEN]
)
@pytest_twisted.ensureDeferred
async def test_lock_token_for_an_unlocked_branch_gets_token_mismatch(root, warnings_and_failures, args, body):
    """A write given a lock token on a branch that is not locked is answered TokenMismatch with an empty token
    for the branch's, which Breezy's client reads as its TokenMismatch; nothing is logged."""
    from breezy.errors import TokenMismatch

    [reply] = await _replies(root, (args, body))
    assert reply == (b"TokenMismatch", b"bogus", b"")
    assert isinstance(_breezy_client_error(reply), TokenMismatch)
    assert warnings_and_failures == []


@pytest_twisted.ensureDeferred
async def test_token_mismatch_does_not_give_away_the_lock_token_held(root, warnings_and_failures):
    """A wrong token for a locked branch is answered TokenMismatch without the token that holds the lock: that
    token lets its holder write, and whoever guessed wrong may have no right to write there.

    Found wrong: the reply carried the holder's token, which the next request could use.
    """
    from breezy.branch import Branch
    from breezy.errors import TokenMismatch

    branch = Branch.open(str(root / "b"))
    held = branch.lock_write().token
    try:
        [reply] = await _replies(root, ((b"Branch.set_parent_location", b"b/", b"bogus", b"", b"http://x/"), None))
    finally:
        branch.unlock()
    assert reply == (b"TokenMismatch", b"bogus", b"")
    assert held not in reply and held
    assert isinstance(_breezy_client_error(reply), TokenMismatch)

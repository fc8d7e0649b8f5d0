"""Key stores and the public-key checker."""

from __future__ import annotations

import os
import threading

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.conch.error import ValidPublicKey
from twisted.conch.ssh.keys import Key
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import SSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.logger import formatEvent
from zope.interface.verify import verifyObject

from smartserve.ssh import IKeyStore, KeyFolder, MemoryKeyStore, PublicKeyChecker, is_valid_username
from smartserve.ssh._keys import MAX_KEY_FILE_BYTES
from support import logged_events

from .conftest import make_unusual_file


def _new_key() -> Key:
    return Key(Ed25519PrivateKey.generate())


def _public_line(key: Key, comment: str = "user@host") -> str:
    return key.public().toString("OPENSSH").decode() + f" {comment}\n"


def _credentials(user: bytes, key: Key, signed: bool = True, data: bytes = b"session data"):
    blob = key.public().blob()
    if not signed:
        return SSHPrivateKey(user, b"ssh-ed25519", blob, None, None)
    return SSHPrivateKey(user, b"ssh-ed25519", blob, data, key.sign(data))


def test_key_folder_provides_ikeystore(tmp_path):
    """The folder store implements the key store interface."""
    assert verifyObject(IKeyStore, KeyFolder(str(tmp_path)))


def test_memory_key_store_provides_ikeystore():
    """The in-memory store implements the key store interface."""
    assert verifyObject(IKeyStore, MemoryKeyStore())


def test_key_folder_reads_every_key_of_a_user(tmp_path):
    """All keys in ``<user>.pub`` are authorized; comments and blank lines are skipped."""
    first, second = _new_key(), _new_key()
    (tmp_path / "alice.pub").write_text(
        "# alice's laptop and desktop\n\n" + _public_line(first) + _public_line(second)
    )
    keys = KeyFolder(str(tmp_path)).authorized_keys("alice")
    assert keys == [first.public(), second.public()]


def test_key_folder_skips_bad_lines(tmp_path):
    """A malformed line costs only that line, not the user's other keys."""
    good = _new_key()
    (tmp_path / "alice.pub").write_text("not a key at all\n" + _public_line(good))
    assert KeyFolder(str(tmp_path)).authorized_keys("alice") == [good.public()]


@pytest.mark.parametrize("kind, subtype", [("ed25519", "v1"), ("rsa", "PEM")])
def test_key_folder_refuses_a_private_key_without_logging_any_of_it(tmp_path, kind, subtype):
    """A private key copied into ``keys/`` by mistake authorizes nothing and is logged once, none of it quoted.

    Found wrong: each of its lines was logged as a bad public key with the
    line in the message, which put the whole key in twistd's log.
    """
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = _new_key() if kind == "ed25519" else Key(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    secret = key.toString("OPENSSH", subtype=subtype).decode()
    (tmp_path / "dave.pub").write_text(secret)
    with logged_events(lambda event: event.get("log_namespace") == "smartserve.ssh._keys") as events:
        assert KeyFolder(str(tmp_path)).authorized_keys("dave") == []
    text = "\n".join(formatEvent(event) for event in events)
    assert len(events) == 1 and "holds a private key" in text
    body = [line for line in secret.splitlines() if line and "-----" not in line]
    assert body and not any(line[:20] in text for line in body)


def test_key_folder_bad_line_is_logged_without_its_content(tmp_path):
    """A line that is not a key is logged by number only: it might be a secret pasted in the wrong place."""
    good = _new_key()
    (tmp_path / "alice.pub").write_text("ssh-ed25519 c2VjcmV0IHN0dWZm\n" + _public_line(good))
    with logged_events(lambda event: event.get("log_namespace") == "smartserve.ssh._keys") as events:
        assert KeyFolder(str(tmp_path)).authorized_keys("alice") == [good.public()]
    [event] = events
    assert formatEvent(event).endswith("alice.pub:1: not an OpenSSH public key line; ignored")


def test_key_folder_file_it_cannot_read_is_logged_once_per_change(tmp_path, monkeypatch):
    """A key file the server may not read authorizes nothing and is logged once, not at every login attempt."""
    from smartserve.ssh import _keys

    (tmp_path / "alice.pub").write_text(_public_line(_new_key()))

    def refused(path, limit, info=None):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(_keys, "read_small_file", refused)
    folder = KeyFolder(str(tmp_path))
    with logged_events(lambda event: event.get("log_namespace") == "smartserve.ssh._keys") as events:
        for _ in range(3):
            assert list(folder.authorized_keys("alice")) == []
    assert [formatEvent(event) for event in events] == [f"cannot read {tmp_path / 'alice.pub'}: Permission denied"]


def test_key_folder_unknown_user_has_no_keys(tmp_path):
    """A user with no file has no keys."""
    assert list(KeyFolder(str(tmp_path)).authorized_keys("nobody")) == []


@pytest.mark.parametrize("name", ["../alice", "a/b", ".hidden", "-x", "", "a" * 65, "al ice"])
def test_key_folder_invalid_user_names_have_no_keys(tmp_path, name):
    """A user name that could escape the folder or hide a file finds nothing."""
    (tmp_path / "alice.pub").write_text(_public_line(_new_key()))
    (tmp_path / ".hidden.pub").write_text(_public_line(_new_key()))
    assert not is_valid_username(name)
    assert list(KeyFolder(str(tmp_path)).authorized_keys(name)) == []


def test_key_folder_picks_up_changes(tmp_path):
    """Keys added, replaced or removed while running are seen at the next lookup."""
    store = KeyFolder(str(tmp_path))
    path = tmp_path / "alice.pub"
    old, new = _new_key(), _new_key()
    path.write_text(_public_line(old))
    assert store.authorized_keys("alice") == [old.public()]
    path.write_text(_public_line(new) + _public_line(old))
    os.utime(path, ns=(1, 2))  # a change even where the clock is coarse
    assert store.authorized_keys("alice") == [new.public(), old.public()]
    path.unlink()
    assert list(store.authorized_keys("alice")) == []


def test_key_folder_refuses_short_rsa_keys(tmp_path):
    """RSA keys under 2048 bits are not authorized even if listed."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    short = Key(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    (tmp_path / "alice.pub").write_text(_public_line(short))
    assert list(KeyFolder(str(tmp_path)).authorized_keys("alice")) == []


@pytest.mark.parametrize("kind", ["fifo", "folder", "device", "huge"])
def test_key_folder_ignores_what_is_not_a_small_regular_file(tmp_path, kind):
    """A FIFO, folder, device or huge file as ``<user>.pub`` gives no key at once, logged once, not a stuck reactor."""
    path = tmp_path / "alice.pub"
    make_unusual_file(path, kind, _public_line(_new_key()) * (MAX_KEY_FILE_BYTES // 80 + 1))
    store = KeyFolder(str(tmp_path))
    found = []
    with logged_events(lambda event: event.get("log_namespace") == "smartserve.ssh._keys") as events:
        lookup = threading.Thread(target=lambda: found.extend(list(store.authorized_keys("alice")) for _ in range(2)))
        lookup.start()
        lookup.join(timeout=10)
        stuck = lookup.is_alive()
        if stuck and kind == "fifo":
            open(path, "w").close()  # let the stuck open return, so the thread ends
        lookup.join()
    assert not stuck
    assert found == [[], []]
    assert [event["path"] for event in events] == [str(path)]


def test_checker_provides_icredentialschecker():
    """The checker implements twisted.cred's checker interface."""
    assert verifyObject(ICredentialsChecker, PublicKeyChecker(MemoryKeyStore()))


def test_checker_accepts_signed_authorized_key():
    """A correctly signed request with the user's key logs in as that user."""
    key = _new_key()
    checker = PublicKeyChecker(MemoryKeyStore({"alice": [key.public()]}))
    result = []
    checker.requestAvatarId(_credentials(b"alice", key)).addCallback(result.append)
    assert result == [b"alice"]


def test_checker_invites_signature_only_for_authorized_key():
    """An unsigned probe with the user's key is invited to sign; any other key is refused."""
    key, stranger = _new_key(), _new_key()
    checker = PublicKeyChecker(MemoryKeyStore({"alice": [key.public()]}))
    failures = []
    checker.requestAvatarId(_credentials(b"alice", key, signed=False)).addErrback(failures.append)
    checker.requestAvatarId(_credentials(b"alice", stranger, signed=False)).addErrback(
        failures.append
    )
    assert failures[0].check(ValidPublicKey)
    assert failures[1].check(UnauthorizedLogin)


def test_checker_refuses_key_of_another_user():
    """Alice's key does not log in as bob."""
    alice, bob = _new_key(), _new_key()
    checker = PublicKeyChecker(MemoryKeyStore({"alice": [alice.public()], "bob": [bob.public()]}))
    failures = []
    checker.requestAvatarId(_credentials(b"bob", alice)).addErrback(failures.append)
    assert failures and failures[0].check(UnauthorizedLogin)


def test_checker_refuses_bad_signature():
    """A signature by another key over the data is refused."""
    key, other = _new_key(), _new_key()
    checker = PublicKeyChecker(MemoryKeyStore({"alice": [key.public()]}))
    forged = SSHPrivateKey(b"alice", b"ssh-ed25519", key.public().blob(), b"data", other.sign(b"data"))
    failures = []
    checker.requestAvatarId(forged).addErrback(failures.append)
    assert failures and failures[0].check(UnauthorizedLogin)


@pytest.mark.parametrize(
    "truncated", ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5", "ssh-ed25519 AAAA", "ssh-rsa AAAAB3NzaC1yc2E", "ssh-dss AAAAB3NzaC1kc3M"]
)
def test_key_folder_skips_a_truncated_key_line(tmp_path, truncated):
    """A key cut short (a placeholder, a line wrapped early) costs only that line."""
    good = _new_key()
    (tmp_path / "alice.pub").write_text(truncated + "\n" + _public_line(good))
    assert KeyFolder(str(tmp_path)).authorized_keys("alice") == [good.public()]


def test_checker_refuses_a_truncated_key_blob():
    """A client offering a key blob cut short is refused like any unknown key."""
    checker = PublicKeyChecker(MemoryKeyStore({"alice": [_new_key().public()]}))
    truncated = SSHPrivateKey(b"alice", b"ssh-ed25519", b"\x00\x00\x00\x0bssh-ed25519", None, None)
    failures = []
    checker.requestAvatarId(truncated).addErrback(failures.append)
    assert failures and failures[0].check(UnauthorizedLogin)

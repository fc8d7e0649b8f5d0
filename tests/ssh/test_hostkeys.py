"""Host keys and the algorithms the server offers."""

from __future__ import annotations

import os
import re
import stat
import subprocess

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.conch.ssh.keys import Key
from twisted.logger import LogLevel, formatEvent
from twisted.internet.task import Clock
from twisted.conch.ssh.common import getNS
from twisted.internet.testing import StringTransport

from smartserve.ssh import (
    HostKeyError,
    MemoryKeyStore,
    PublicKeyChecker,
    ensure_host_key,
    fingerprint,
    load_host_keys,
    make_ssh_factory,
)

from support import logged_events

from .conftest import SSH_KEYGEN, make_user_key, needs_openssh


def test_ensure_host_key_creates_private_ed25519_key(tmp_path):
    """The first run makes an ed25519 key only its owner can read, and keeps it afterwards."""
    path = ensure_host_key(str(tmp_path / "data"))
    key = Key.fromFile(path)
    assert key.type() == "Ed25519" and not key.isPublic()
    assert stat.S_IMODE((tmp_path / "data" / "ssh_host_ed25519_key").stat().st_mode) == 0o600
    assert ensure_host_key(str(tmp_path / "data")) == path
    assert Key.fromFile(path) == key


def test_default_host_key_public_half_that_holds_another_key_is_rewritten(tmp_path):
    """A ``.pub`` left from an earlier key is rewritten with a warning, so ``ssh-keygen -lf`` shows the key in use.

    Found wrong: a stale ``.pub`` was never noticed and operators would
    publish the fingerprint of a key the server no longer had.
    """
    data = tmp_path / "data"
    path = ensure_host_key(str(data))
    public = data / "ssh_host_ed25519_key.pub"
    public.write_bytes(Key(Ed25519PrivateKey.generate()).public().toString("OPENSSH") + b"\n")
    with logged_events(lambda event: event.get("log_namespace") == "smartserve.ssh._hostkeys") as events:
        [key] = load_host_keys([path], default_key=path).values()
    assert Key.fromString(public.read_bytes()) == key.public()
    assert [formatEvent(event) for event in events if event["log_level"] is LogLevel.warn] == [
        f"{path}.pub did not hold this host key's public half; rewritten"
    ]
    assert sorted(os.listdir(data)) == ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"]


def test_host_key_made_again_after_its_removal_is_warned_of(tmp_path):
    """A new default key made where the old one's .pub remains is a changed host key for every client: a warning."""
    data = tmp_path / "data"
    path = ensure_host_key(str(data))
    os.unlink(path)
    with logged_events(lambda event: event.get("log_namespace") == "smartserve.ssh._hostkeys") as events:
        ensure_host_key(str(data))
    [event] = events
    assert event["log_level"] is LogLevel.warn and "in place of one that was removed" in formatEvent(event)
    assert Key.fromString((data / "ssh_host_ed25519_key.pub").read_bytes()) == Key.fromFile(path).public()


def test_host_key_others_may_read_is_loaded_with_a_warning(tmp_path):
    """A private host key with group or other read is used, but the log says to make it 0600 (sshd refuses it)."""
    path = ensure_host_key(str(tmp_path / "data"))
    os.chmod(path, 0o644)
    with logged_events(lambda event: event.get("log_namespace") == "smartserve.ssh._hostkeys") as events:
        load_host_keys([path])
    assert [formatEvent(event) for event in events if event["log_level"] is LogLevel.warn] == [
        f"{path} may be read by others (mode 0644); a host key should be 0600"
    ]


def test_ensure_host_key_makes_the_data_folder_but_not_its_parent(tmp_path):
    """As at the start of twistd smartserve: a mistyped data folder is an error, not a new tree of folders."""
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=re.escape(f"--data {missing / 'data'}: its parent folder {missing} ")):
        ensure_host_key(str(missing / "data"))
    assert not missing.exists()
    ensure_host_key(str(tmp_path / "data"))
    assert (tmp_path / "data" / "ssh_host_ed25519_key").is_file()


def test_ssh_factory_makes_the_keys_folder_but_not_its_parent(tmp_path):
    """A keys folder whose parent is missing is an error, and nothing is made; a missing keys folder itself is made."""
    ensure_host_key(str(tmp_path / "data"))

    def factory(keys):
        return make_ssh_factory(
            smart_factory=None, data_dir=str(tmp_path / "data"), host_key_paths=[], keys_dir=str(keys),
            access_file=None, clock=Clock(),
        )

    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=re.escape(f"--keys {missing / 'keys'}: its parent folder {missing} ")):
        factory(missing / "keys")
    assert not missing.exists()
    factory(tmp_path / "keys")
    assert (tmp_path / "keys").is_dir()


@needs_openssh
def test_fingerprint_matches_ssh_keygen(tmp_path):
    """The logged fingerprint is the one ``ssh-keygen -l`` shows users."""
    path = ensure_host_key(str(tmp_path))
    shown = subprocess.run(
        [SSH_KEYGEN, "-l", "-E", "sha256", "-f", path + ".pub"], capture_output=True, text=True
    ).stdout.split()[1]
    assert fingerprint(Key.fromFile(path)) == shown


def test_load_host_keys_refuses_public_and_missing_files(tmp_path):
    """A public key or a missing file is not a host key."""
    path = ensure_host_key(str(tmp_path))
    with pytest.raises(HostKeyError):
        load_host_keys([path + ".pub"])
    with pytest.raises(HostKeyError):
        load_host_keys([str(tmp_path / "missing")])
    with pytest.raises(HostKeyError):
        load_host_keys([])


@needs_openssh
def test_load_host_keys_accepts_rsa_and_ecdsa(tmp_path):
    """Operators' existing RSA and ECDSA host keys load, keyed by type."""
    rsa = make_user_key(tmp_path, "rsa", kind="rsa")
    ecdsa = make_user_key(tmp_path, "ecdsa", kind="ecdsa")
    keys = load_host_keys([str(rsa), str(ecdsa)])
    assert set(keys) == {b"ssh-rsa", b"ecdsa-sha2-nistp256"}


@needs_openssh
def test_server_offers_only_modern_algorithms(tmp_path):
    """The key exchange offer has no SHA-1, CBC, DSA or SHA-1 RSA signatures."""
    rsa = make_user_key(tmp_path, "rsa", kind="rsa")
    factory = make_ssh_factory(
        smart_factory=None,
        data_dir=str(tmp_path / "data"),
        host_key_paths=[str(rsa), ensure_host_key(str(tmp_path / "data"))],
        keys_dir=str(tmp_path / "keys"),
        access_file=None,
        checker=PublicKeyChecker(MemoryKeyStore()),
        clock=Clock(),
    )
    factory.startFactory()
    transport = factory.buildProtocol(None)
    wire = StringTransport()
    transport.makeConnection(wire)
    offer = _kexinit_lists(wire.value())
    transport.connectionLost(None)
    kex, host_keys, ciphers, _, macs, _, compressions, _ = offer
    assert set(host_keys) == {b"rsa-sha2-512", b"rsa-sha2-256", b"ssh-ed25519"}
    assert b"curve25519-sha256" in kex
    assert not [name for name in kex if name.endswith(b"sha1") or b"group1" in name]
    assert ciphers[0] == b"aes128-ctr" and not [c for c in ciphers if not c.endswith(b"-ctr")]
    assert set(macs) == {b"hmac-sha2-256", b"hmac-sha2-512"}
    assert compressions == [b"none"]


def _kexinit_lists(sent: bytes) -> list:
    """Return the name-lists of the KEXINIT packet after the version line."""
    packet = sent.split(b"\r\n", 1)[1]
    payload = packet[5:]  # length, padding length
    assert payload[0] == 20  # MSG_KEXINIT
    lists = getNS(payload[17:], 8)[:8]
    return [names.split(b",") if names else [] for names in lists]

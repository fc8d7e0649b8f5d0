"""Host keys: loaded from files, or one ed25519 key made on the first run."""

from __future__ import annotations

import os
from collections.abc import Iterable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.conch.ssh.keys import BadKeyError, EncryptedKeyError, FingerprintFormats, Key
from twisted.logger import Logger

from .._folders import make_folder
from ._exceptions import HostKeyError
from ._files import read_small_file

__all__ = ["DEFAULT_HOST_KEY_NAME", "ensure_host_key", "fingerprint", "load_host_keys"]

_log = Logger()

DEFAULT_HOST_KEY_NAME = "ssh_host_ed25519_key"
# An OpenSSH private key is a few KiB at most, even RSA with 16384 bits.
MAX_HOST_KEY_BYTES = 1 << 20


def fingerprint(key: Key) -> str:
    """Return ``key``'s fingerprint the way OpenSSH prints it (``SHA256:...``)."""
    return "SHA256:" + key.fingerprint(FingerprintFormats.SHA256_BASE64).rstrip("=")


def ensure_host_key(data_dir: str) -> str:
    """Return the path of the default host key, making one if there is none.

    A new key is ed25519, written to ``DATA/ssh_host_ed25519_key`` with mode
    0600 (and its public half beside it, ``.pub``); its fingerprint is logged
    so the operator can publish it to users. ``DATA`` is made if missing,
    but not its parent (``OSError``).
    """
    path = os.path.join(data_dir, DEFAULT_HOST_KEY_NAME)
    if os.path.exists(path):
        return path
    make_folder("data", data_dir)
    key = Key(Ed25519PrivateKey.generate())
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as key_file:
        key_file.write(key.toString("OPENSSH"))
    with open(path + ".pub", "wb") as public_file:
        public_file.write(key.public().toString("OPENSSH") + b"\n")
    _log.info(
        "generated SSH host key {path} with fingerprint {fingerprint}",
        path=path,
        fingerprint=fingerprint(key),
    )
    return path


def load_host_keys(paths: Iterable[str]) -> dict[bytes, Key]:
    """Load private host keys, keyed by SSH key type as Conch's factory wants.

    Raises ``HostKeyError`` for a file that is missing, not a regular file
    of at most 1 MiB (a FIFO would block the start until a writer came),
    encrypted, not a private key, a DSA key, an RSA key under 2048 bits, or
    a second key of a type already loaded.
    """
    keys: dict[bytes, Key] = {}
    for path in paths:
        try:
            _, data = read_small_file(path, MAX_HOST_KEY_BYTES)
        except OSError as error:
            raise HostKeyError(f"cannot load host key {path}: {error.strerror}") from None
        try:
            key = Key.fromString(data)
        except EncryptedKeyError:
            raise HostKeyError(f"cannot load host key {path}: it is encrypted; a host key has no passphrase") from None
        except (BadKeyError, ValueError):
            # The parser's own message can quote the file, which holds a secret.
            raise HostKeyError(
                f"cannot load host key {path}: not a key in a format this server reads (OpenSSH or PEM)"
            ) from None
        if key.isPublic():
            raise HostKeyError(f"{path} is a public key; a host key must be private")
        if key.type() == "DSA" or (key.type() == "RSA" and key.size() < 2048):
            raise HostKeyError(f"{path}: DSA and short RSA host keys are not accepted")
        if key.sshType() in keys:
            raise HostKeyError(f"{path}: a second {key.sshType().decode()} host key")
        keys[key.sshType()] = key
        _log.info(
            "SSH host key {path}: {fingerprint}", path=path, fingerprint=fingerprint(key)
        )
    if not keys:
        raise HostKeyError("no SSH host key")
    return keys

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
    so the operator can publish it to users. The key appears whole or not
    at all, so a crash while writing it cannot leave an empty key that
    stops every later start. ``DATA`` is made if missing, but not its
    parent (``OSError``).
    """
    path = os.path.join(data_dir, DEFAULT_HOST_KEY_NAME)
    if os.path.exists(path):
        return path
    make_folder("data", data_dir)
    replaced = os.path.exists(path + ".pub")
    key = Key(Ed25519PrivateKey.generate())
    if not _write_new(path, key.toString("OPENSSH"), 0o600):
        return path  # another process made it first
    _write_public_half(path, key)
    if replaced:
        _log.warn(
            "generated SSH host key {path} with fingerprint {fingerprint} in place of one that was removed "
            "(its .pub was left): clients that knew the old key will refuse this one until told of it",
            path=path,
            fingerprint=fingerprint(key),
        )
    else:
        _log.info(
            "generated SSH host key {path} with fingerprint {fingerprint}",
            path=path,
            fingerprint=fingerprint(key),
        )
    return path


def _write_new(path: str, data: bytes, mode: int, replace: bool = False) -> bool:
    """Write ``data`` to ``path`` through a temporary file beside it; False if ``path`` exists and not ``replace``."""
    temporary = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(descriptor, "wb") as new_file:
            new_file.write(data)
            new_file.flush()
            os.fsync(new_file.fileno())
        if replace:
            os.replace(temporary, path)
            return True
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        return True
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _write_public_half(path: str, key: Key) -> None:
    _write_new(path + ".pub", key.public().toString("OPENSSH") + b"\n", 0o644, replace=True)


def _check_public_half(path: str, key: Key) -> None:
    """Rewrite the default key's ``.pub`` when it is missing or holds another key, saying so.

    Operators publish its fingerprint (``ssh-keygen -lf``); a ``.pub`` left
    from an earlier key would have them publish the wrong one.
    """
    try:
        with open(path + ".pub", "rb") as public_file:
            matches = Key.fromString(public_file.read()) == key.public()
    except (OSError, BadKeyError, ValueError):
        matches = False
    if not matches:
        _write_public_half(path, key)
        _log.warn("{path}.pub did not hold this host key's public half; rewritten", path=path)


def load_host_keys(paths: Iterable[str], default_key: str | None = None) -> dict[bytes, Key]:
    """Load private host keys, keyed by SSH key type as Conch's factory wants.

    Raises ``HostKeyError`` for a file that is missing, not a regular file
    of at most 1 MiB (a FIFO would block the start until a writer came),
    encrypted, not a private key, a DSA key, an RSA key under 2048 bits, or
    a second key of a type already loaded. A key others may read is loaded
    with a warning. For ``default_key``, the one smartserve made, a ``.pub``
    that does not match is rewritten.
    """
    keys: dict[bytes, Key] = {}
    for path in paths:
        try:
            info, data = read_small_file(path, MAX_HOST_KEY_BYTES)
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
        if info.st_mode & 0o077:
            _log.warn(
                "{path} may be read by others (mode {mode:04o}); a host key should be 0600",
                path=path,
                mode=info.st_mode & 0o7777,
            )
        if path == default_key:
            _check_public_half(path, key)
        _log.info(
            "SSH host key {path}: {fingerprint}", path=path, fingerprint=fingerprint(key)
        )
    if not keys:
        raise HostKeyError("no SSH host key")
    return keys

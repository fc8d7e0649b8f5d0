"""The SSH front end: Conch serving ``bzr+ssh://`` in the smart server's process.

``make_ssh_factory`` builds it from the operator's options. Users log in
with public keys only (``KEYS/<user>.pub``, or any ``twisted.cred`` checker
of SSH keys); each ``exec`` of ``bzr serve --inet ...`` on a session channel
runs a smart protocol from the shared ``SmartServerFactory``; everything
else is refused. ``SSHServerFactory.drain`` is the drain hook.
"""

from ._access import AccessPolicy, AccessRules, Rights, home_prefix, parse_access
from ._checker import PublicKeyChecker
from ._command import ServeCommand, parse_serve_command
from ._exceptions import AccessFileError, CommandRefused, HostKeyError, SSHSetupError
from ._factory import SSHServerFactory, make_ssh_factory
from ._hostkeys import DEFAULT_HOST_KEY_NAME, ensure_host_key, fingerprint, load_host_keys
from ._interfaces import IKeyStore
from ._keys import KeyFolder, MemoryKeyStore, parse_public_keys
from ._session import EXIT_OK, EXIT_REFUSED, EXIT_TEMPFAIL
from ._trace import show_conch_trace
from ._transport import CIPHERS, KEY_EXCHANGES, MACS, USER_SIGNATURE_ALGORITHMS
from ._username import is_valid_username

__all__ = [
    "make_ssh_factory",
    "show_conch_trace",
    "SSHServerFactory",
    "IKeyStore",
    "KeyFolder",
    "MemoryKeyStore",
    "PublicKeyChecker",
    "parse_public_keys",
    "AccessPolicy",
    "AccessRules",
    "Rights",
    "parse_access",
    "home_prefix",
    "ServeCommand",
    "parse_serve_command",
    "DEFAULT_HOST_KEY_NAME",
    "ensure_host_key",
    "fingerprint",
    "load_host_keys",
    "is_valid_username",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_TEMPFAIL",
    "CIPHERS",
    "MACS",
    "KEY_EXCHANGES",
    "USER_SIGNATURE_ALGORITHMS",
    "SSHSetupError",
    "HostKeyError",
    "AccessFileError",
    "CommandRefused",
]

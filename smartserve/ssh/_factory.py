"""The SSH server factory: host keys, portal, limits, and the drain hook."""

from __future__ import annotations

from collections import Counter

from twisted.conch.ssh import factory
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

from .._folders import make_folder
from ..server.caller import peer_text
from ..server.interfaces import IDrainable
from ..server.drain import OpenConnections
from ..server.protocol import ClosedAtOnce
from ._access import AccessPolicy
from ._avatar import SmartRealm
from ._checker import PublicKeyChecker
from ._connection import SmartConnection
from ._hostkeys import ensure_host_key, load_host_keys
from ._keys import KeyFolder
from ._transport import ServerTransport, UserAuthServer, host_signature_algorithms

__all__ = ["SSHServerFactory", "make_ssh_factory"]

_log = Logger()


@implementer(IDrainable)
class SSHServerFactory(factory.SSHFactory):
    """Builds SSH server connections that run the smart server in-process.

    It keeps every live connection, so that ``drain`` can ask each to close:
    logged-in ones with no channel close at once, the others as soon as
    their last channel closes (the draining smart protocol ends each session,
    a busy one right after its current response, with exit status 75), and
    connections still logging in once they are done or their grace time
    runs out.
    """

    noisy = False  # its "listening on" line and the connections' own lines say what matters
    protocol = ServerTransport
    services = {b"ssh-userauth": UserAuthServer, b"ssh-connection": SmartConnection}

    def __init__(
        self,
        *,
        smart_factory,
        host_keys: dict,
        checker: ICredentialsChecker,
        access: AccessPolicy,
        login_grace_time: float = 120,
        max_unauthenticated: int = 50,
        max_unauthenticated_per_address: int = 0,
        max_auth_tries: int = 6,
        max_sessions_per_user: int = 10,
        idle_timeout: float = 300,
        clock=None,
    ):
        if clock is None:
            from twisted.internet import reactor as clock
        self.smart_factory = smart_factory
        self.privateKeys = host_keys
        self.publicKeys = {kind: key.public() for kind, key in host_keys.items()}
        self.primes = None
        self.portal = Portal(SmartRealm(self), [checker])
        self.access = access
        self.login_grace_time = login_grace_time
        self.max_unauthenticated = max_unauthenticated
        self.max_unauthenticated_per_address = max_unauthenticated_per_address
        self.max_auth_tries = max_auth_tries
        self.max_sessions_per_user = max_sessions_per_user
        self.idle_timeout = idle_timeout
        self.clock = clock
        self.draining = False
        self.connections = OpenConnections()
        self._unauthenticated: set[ServerTransport] = set()
        self._unauthenticated_by_address: Counter[str] = Counter()
        self._sessions: Counter[str] = Counter()
        # For /metrics: how logins ended, connections and sessions refused, by reason.
        self.logins: Counter[str] = Counter()
        self.refused_connections: Counter[str] = Counter()
        self.refused_sessions = 0

    def buildProtocol(self, addr):
        if self.draining or len(self._unauthenticated) >= self.max_unauthenticated:
            _log.warn(
                "refusing SSH connection from {peer}: {why}",
                peer=peer_text(addr),
                why="draining" if self.draining else "too many connections logging in",
            )
            self.refused_connections["draining" if self.draining else "too_many_unauthenticated"] += 1
            return ClosedAtOnce()
        # Conch's SSHFactory.buildProtocol only adds what we replace here: the
        # host key algorithms, and a per-connection note about DH primes.
        transport = Factory.buildProtocol(self, addr)
        transport.supportedPublicKeys = host_signature_algorithms(
            [name for key in self.privateKeys.values() for name in key.supportedSignatureAlgorithms()]
        )
        return transport

    # Bookkeeping called by the transport and connection service.

    def admits(self, transport: ServerTransport) -> bool:
        """Whether a new connection may begin its handshake.

        Not while its address already has ``max_unauthenticated_per_address``
        connections logging in (as sshd's ``PerSourceMaxStartups``; 0, the
        default as in sshd, sets no limit of its own), so that one address
        cannot hold every slot ``max_unauthenticated`` allows and lock
        everyone else out. Behind haproxy the address is the one the PROXY
        header gives.
        """
        limit = self.max_unauthenticated_per_address
        logging_in = self._unauthenticated_by_address[transport.peer_address]
        if not limit or logging_in < limit:
            return True
        _log.warn(
            "refusing SSH connection from {peer}: {count} connections from this address are logging in",
            peer=transport.peer,
            count=logging_in,
        )
        self.refused_connections["too_many_unauthenticated_from_address"] += 1
        return False

    def connection_started(self, transport: ServerTransport) -> None:
        """A connection began its handshake."""
        self.connections.add(transport)
        self._unauthenticated.add(transport)
        self._unauthenticated_by_address[transport.peer_address] += 1
        if self.draining:
            transport.drain()

    def _logged_in_or_gone(self, transport: ServerTransport) -> None:
        if transport in self._unauthenticated:
            self._unauthenticated.remove(transport)
            address = transport.peer_address
            self._unauthenticated_by_address[address] -= 1
            if not self._unauthenticated_by_address[address]:
                del self._unauthenticated_by_address[address]

    def connection_authenticated(self, transport: ServerTransport) -> None:
        """A connection's user logged in."""
        self._logged_in_or_gone(transport)
        self.logins["accepted"] += 1

    def login_failed(self, outcome: str) -> None:
        """A connection ended without logging in: ``refused`` (it tried) or ``timed_out`` (grace time)."""
        self.logins[outcome] += 1

    def connection_ended(self, transport: ServerTransport) -> None:
        """A connection is gone."""
        self._logged_in_or_gone(transport)
        self.connections.discard(transport)

    def session_opening(self, username: str) -> bool:
        """Count a session for ``username``; False (not counted) if over the limit."""
        if self._sessions[username] >= self.max_sessions_per_user:
            _log.warn("{user} has too many sessions open", user=username)
            self.refused_sessions += 1
            return False
        self._sessions[username] += 1
        return True

    def session_closed(self, username: str) -> None:
        """Release a session counted by ``session_opening``."""
        self._sessions[username] -= 1
        if self._sessions[username] <= 0:
            del self._sessions[username]

    def sessions_of(self, username: str) -> int:
        """Return how many sessions ``username`` has open."""
        return self._sessions[username]

    # Drain (IDrainable).

    def drain(self) -> defer.Deferred:
        """Stop taking connections and close each as soon as it has no channel.

        Returns a Deferred that fires once no SSH connection is left. Drain
        the smart factory too: that is what ends the busy sessions.
        """
        self.draining = True
        for transport in self.connections:
            transport.drain()
        return self.wait_closed()

    def wait_closed(self) -> defer.Deferred:
        """A Deferred that fires once no SSH connection is left."""
        return self.connections.wait_empty()

    @property
    def open_connections(self) -> int:
        """SSH connections open now, logged in or not."""
        return len(self.connections)

    # Each SSH connection is one client; its smart sessions are not counted again.
    client_connections = open_connections

    @property
    def busy_client_connections(self) -> int:
        """SSH connections with a smart session running a request now."""
        carrying = {protocol.carried_by for protocol in self.smart_factory.connections if protocol.busy}
        return sum(1 for transport in self.connections if transport in carrying)

    def abort(self) -> int:
        """Drop every remaining connection, and so its sessions, at once; return how many connections there were."""
        remaining = list(self.connections)
        for transport in remaining:
            transport.transport.abortConnection()
        return len(remaining)


def make_ssh_factory(
    *,
    smart_factory,
    data_dir: str,
    host_key_paths: list[str],
    keys_dir: str,
    access_file: str | None,
    login_grace_time: float = 120,
    max_unauthenticated: int = 50,
    max_unauthenticated_per_address: int = 0,
    max_auth_tries: int = 6,
    max_sessions_per_user: int = 10,
    idle_timeout: float = 300,
    checker: ICredentialsChecker | None = None,
    clock=None,
) -> SSHServerFactory:
    """Build the SSH front end for ``smart_factory`` from the operator's options.

    With no ``host_key_paths``, ``DATA/ssh_host_ed25519_key`` is used, made
    on the first run. Users log in with a key from ``KEYS/<user>.pub``
    unless ``checker`` (any ``twisted.cred`` checker of ``ISSHPrivateKey``
    credentials whose avatar ids are user names) replaces the keys folder.
    The keys folder and ``DATA`` are made if missing, but not their parents
    (``OSError``). Raises ``HostKeyError`` or ``AccessFileError`` for bad
    files.
    """
    if checker is None:
        make_folder("keys", keys_dir)
        checker = PublicKeyChecker(KeyFolder(keys_dir))
    default_key = None if host_key_paths else ensure_host_key(data_dir)
    paths = list(host_key_paths) or [default_key]
    return SSHServerFactory(
        smart_factory=smart_factory,
        host_keys=load_host_keys(paths, default_key),
        checker=checker,
        access=AccessPolicy(access_file),
        login_grace_time=login_grace_time,
        max_unauthenticated=max_unauthenticated,
        max_unauthenticated_per_address=max_unauthenticated_per_address,
        max_auth_tries=max_auth_tries,
        max_sessions_per_user=max_sessions_per_user,
        idle_timeout=idle_timeout,
        clock=clock,
    )

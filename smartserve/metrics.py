"""Prometheus metrics for the server and the client, each on its own registry.

``ServerMetrics`` is the one place the server's metrics live. The smart
factory tells it about each finished request (``request_finished``); the
open connections and the drain are read when ``/metrics`` is scraped, from
the objects registered with ``watch_connections``, ``watch_ssh``,
``watch_access_log`` and ``watch_drain``, so the drain controller, the SSH
factory and the access log file need no hooks of their own.

``ClientMetrics`` counts a client's reconnects and resends. Both take a
``CollectorRegistry`` (a new one by default, never prometheus_client's
global one), so that several servers or clients in one process, and tests,
never see each other's figures.
"""

from __future__ import annotations

import bisect
import itertools
from typing import Callable, Dict, Iterator, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    StateSetMetricFamily,
)
from prometheus_client.registry import Collector

__all__ = ["ServerMetrics", "ClientMetrics", "CONTENT_TYPE_LATEST", "DURATION_BUCKETS"]

# Request durations span a 200 µs `get` to a minutes-long stream.
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)

_DRAIN_STATES = ("serving", "draining", "drained")


class _ScrapeTimeCollector(Collector):
    """Reads connection counts and the drain state when the registry is collected."""

    def __init__(self):
        self.connection_counters: Dict[str, Callable[[], int]] = {}
        self.controller = None
        self.ssh_factory = None
        self.smart_factory = None
        self.access_file = None

    def collect(self) -> Iterator:
        connections = GaugeMetricFamily(
            "smartserve_open_connections",
            "Connections open now, by kind (smart: smart protocol sessions; ssh: SSH connections).",
            labels=["kind"],
        )
        for kind, count in sorted(self.connection_counters.items()):
            connections.add_metric([kind], count())
        yield connections
        if self.smart_factory is not None:
            yield CounterMetricFamily(
                "smartserve_bzr_refused_connections",
                "bzr:// connections turned away because --bzr-max-connections were open.",
                value=self.smart_factory.refused_bzr_connections,
            )
            yield GaugeMetricFamily(
                "smartserve_request_body_bytes",
                "Bytes of request bodies held now, all connections together (limit: --max-request-memory).",
                value=self.smart_factory.body_memory.held,
            )
        if self.ssh_factory is not None:
            yield from self._ssh_families(self.ssh_factory)
        if self.access_file is not None:
            yield CounterMetricFamily(
                "smartserve_access_log_lost_lines",
                "Access log lines that could not be written (a full disk, an I/O error) and were dropped.",
                value=self.access_file.lines_lost,
            )
        controller = self.controller
        if controller is None:
            return
        state = controller.state.value
        yield StateSetMetricFamily(
            "smartserve_drain_state",
            "Where the server stands in its drain: serving, draining or drained.",
            value={name: name == state for name in _DRAIN_STATES},
        )
        # A server drains at most once in its life, so these follow from its state.
        yield CounterMetricFamily(
            "smartserve_drains_started", "Drains started.", value=int(state != "serving")
        )
        yield CounterMetricFamily(
            "smartserve_drains_completed", "Drains completed (every connection closed or aborted).",
            value=int(state == "drained"),
        )
        yield CounterMetricFamily(
            "smartserve_drain_aborted_connections",
            "Connections aborted because the drain deadline passed.",
            value=controller.aborted,
        )

    @staticmethod
    def _ssh_families(factory) -> Iterator:
        logins = CounterMetricFamily(
            "smartserve_ssh_logins",
            "SSH logins by outcome: accepted, refused (the client tried and gave up), timed_out (grace time).",
            labels=["outcome"],
        )
        for outcome in ("accepted", "refused", "timed_out"):
            logins.add_metric([outcome], factory.logins[outcome])
        yield logins
        refused = CounterMetricFamily(
            "smartserve_ssh_refused_connections",
            "SSH connections closed as soon as they were made, by reason.",
            labels=["reason"],
        )
        for reason in ("too_many_unauthenticated", "too_many_unauthenticated_from_address", "draining"):
            refused.add_metric([reason], factory.refused_connections[reason])
        yield refused
        yield CounterMetricFamily(
            "smartserve_ssh_refused_sessions",
            "Smart sessions refused because their user had --max-sessions-per-user open.",
            value=factory.refused_sessions,
        )


class _RequestCollector(Collector):
    """Counts finished requests in plain numbers, turned into metric families when scraped.

    Requests finish on the reactor thread, as scrapes are answered, so
    the counts need no lock; prometheus_client's own Counter and Histogram
    take a lock and look their labels up on every update, which cost more
    than the rest of a small request's bookkeeping.
    """

    def __init__(self):
        self.requests: Dict[tuple, int] = {}
        self.durations: Dict[str, list] = {}  # verb class -> [count per bucket..., sum]
        self.bytes_received = 0
        self.bytes_sent = 0

    def record(self, verb_class: str, outcome: str, duration: Optional[float], bytes_in: int, bytes_out: int) -> None:
        key = (verb_class, outcome)
        self.requests[key] = self.requests.get(key, 0) + 1
        if duration is not None:
            duration = max(duration, 0.0)
            counts = self.durations.get(verb_class)
            if counts is None:
                counts = self.durations[verb_class] = [0] * (len(DURATION_BUCKETS) + 2)
            counts[bisect.bisect_left(DURATION_BUCKETS, duration)] += 1
            counts[-1] += duration
        self.bytes_received += bytes_in
        self.bytes_sent += bytes_out

    def collect(self) -> Iterator:
        requests = CounterMetricFamily(
            "smartserve_requests",
            "Requests finished, by verb class and outcome (ok, error, refused, aborted, ...).",
            labels=["verb_class", "outcome"],
        )
        for labels, count in sorted(self.requests.items()):
            requests.add_metric(labels, count)
        yield requests
        durations = HistogramMetricFamily(
            "smartserve_request_duration_seconds",
            "Seconds from a request's first byte to its last response byte (or its abort), by verb class.",
            labels=["verb_class"],
        )
        bounds = [str(bound) for bound in DURATION_BUCKETS] + ["+Inf"]
        for verb_class, counts in sorted(self.durations.items()):
            cumulative = list(itertools.accumulate(counts[:-1]))
            durations.add_metric([verb_class], list(zip(bounds, cumulative)), counts[-1])
        yield durations
        yield CounterMetricFamily(
            "smartserve_received_bytes", "Smart protocol bytes received from clients.", value=self.bytes_received
        )
        yield CounterMetricFamily("smartserve_sent_bytes", "Smart protocol bytes sent to clients.", value=self.bytes_sent)


class ServerMetrics:
    """The server's metrics on one registry, rendered by ``render()`` for ``/metrics``."""

    def __init__(self, registry: Optional[CollectorRegistry] = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self._requests = _RequestCollector()
        self.registry.register(self._requests)
        self._scraped = _ScrapeTimeCollector()
        self.registry.register(self._scraped)

    def request_finished(self, record) -> None:
        """Count one finished or aborted request, from its access-log ``RequestRecord``."""
        self._requests.record(record.verb_class, record.outcome, record.duration, record.bytes_in, record.bytes_out)

    def watch_connections(self, kind: str, source) -> None:
        """Report ``source.open_connections`` as the open connections of ``kind``."""
        self._scraped.connection_counters[kind] = lambda: source.open_connections

    def watch_bzr_refusals(self, factory) -> None:
        """Report the bzr:// connections a ``SmartServerFactory`` turned away."""
        self._scraped.smart_factory = factory

    def watch_ssh(self, factory) -> None:
        """Report the login and refusal counts of an ``SSHServerFactory``."""
        self._scraped.ssh_factory = factory

    def watch_access_log(self, access_file) -> None:
        """Report the lines an ``AccessLogFile`` could not write."""
        self._scraped.access_file = access_file

    def watch_drain(self, controller) -> None:
        """Report the state and abort count of a ``DrainController``."""
        self._scraped.controller = controller

    def render(self) -> bytes:
        """Every metric in the Prometheus text format (``CONTENT_TYPE_LATEST``)."""
        return generate_latest(self.registry)


class ClientMetrics:
    """A client's reconnects and resends, as Prometheus counters on ``registry``."""

    def __init__(self, registry: Optional[CollectorRegistry] = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self._reconnects = Counter(
            "smartserve_client_reconnects",
            "New connections made to replace a lost or closed one, by reason (probe, failure, drain, ...).",
            ["reason"],
            registry=self.registry,
        )
        self._resends = Counter(
            "smartserve_client_resends",
            "Requests sent again after a lost connection, by verb class and failure point.",
            ["verb_class", "reason"],
            registry=self.registry,
        )
        self._outcome_unknown = Counter(
            "smartserve_client_outcome_unknown",
            "Calls that failed with OutcomeUnknown (maybe applied, not resent), by verb class.",
            ["verb_class"],
            registry=self.registry,
        )

    def reconnected(self, reason: str) -> None:
        """Count one reconnect for ``reason``."""
        self._reconnects.labels(reason).inc()

    def resent(self, verb_class, reason: str) -> None:
        """Count one resend of a request of ``verb_class`` (a ``VerbClass`` or its value)."""
        self._resends.labels(getattr(verb_class, "value", verb_class), reason).inc()

    def outcome_unknown(self, verb_class) -> None:
        """Count one call that failed with the outcome unknown."""
        self._outcome_unknown.labels(getattr(verb_class, "value", verb_class)).inc()

    def render(self) -> bytes:
        """Every client metric in the Prometheus text format."""
        return generate_latest(self.registry)

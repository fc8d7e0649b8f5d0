"""Prometheus metrics for the server and the client, each on its own registry.

``ServerMetrics`` is the one place the server's metrics live. The smart
factory tells it about each finished request (``request_finished``); the
open connections and the drain are read when ``/metrics`` is scraped, from
the objects registered with ``watch_connections`` and ``watch_drain``, so
the drain controller and the SSH factory need no hooks of their own.

``ClientMetrics`` counts a client's reconnects and resends. Both take a
``CollectorRegistry`` (a new one by default, never prometheus_client's
global one), so that several servers or clients in one process, and tests,
never see each other's figures.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, StateSetMetricFamily
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

    def collect(self) -> Iterator:
        connections = GaugeMetricFamily(
            "smartserve_open_connections",
            "Connections open now, by kind (smart: smart protocol sessions; ssh: SSH connections).",
            labels=["kind"],
        )
        for kind, count in sorted(self.connection_counters.items()):
            connections.add_metric([kind], count())
        yield connections
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


class ServerMetrics:
    """The server's metrics on one registry, rendered by ``render()`` for ``/metrics``."""

    def __init__(self, registry: Optional[CollectorRegistry] = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "smartserve_requests",
            "Requests finished, by verb class and outcome (ok, error, refused, aborted, ...).",
            ["verb_class", "outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "smartserve_request_duration_seconds",
            "Seconds from a request's first byte to its last response byte (or its abort), by verb class.",
            ["verb_class"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.bytes_received = Counter(
            "smartserve_received_bytes", "Smart protocol bytes received from clients.", registry=self.registry
        )
        self.bytes_sent = Counter(
            "smartserve_sent_bytes", "Smart protocol bytes sent to clients.", registry=self.registry
        )
        self._scraped = _ScrapeTimeCollector()
        self.registry.register(self._scraped)
        # Labelled children, looked up once: ``labels()`` validates and locks on every call.
        self._request_counters = {}
        self._duration_histograms = {}

    def request_finished(self, record) -> None:
        """Count one finished or aborted request, from its access-log ``RequestRecord``."""
        key = (record.verb_class, record.outcome)
        counter = self._request_counters.get(key)
        if counter is None:
            counter = self._request_counters[key] = self.requests.labels(*key)
        counter.inc()
        if record.duration is not None:
            histogram = self._duration_histograms.get(record.verb_class)
            if histogram is None:
                histogram = self._duration_histograms[record.verb_class] = self.duration.labels(record.verb_class)
            histogram.observe(max(record.duration, 0.0))
        self.bytes_received.inc(record.bytes_in)
        self.bytes_sent.inc(record.bytes_out)

    def watch_connections(self, kind: str, source) -> None:
        """Report ``source.open_connections`` as the open connections of ``kind``."""
        self._scraped.connection_counters[kind] = lambda: source.open_connections

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

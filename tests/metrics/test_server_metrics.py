"""Unit tests for smartserve.metrics: the server's and the client's Prometheus figures."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from smartserve.control.admin import admin_site
from smartserve.metrics import ClientMetrics, ServerMetrics
from smartserve.protocol import Connection, EndOfMessage, Request, Role
from smartserve.server.caller import Caller
from smartserve.server.dispatcher import Dispatcher
from smartserve.server.drain import DrainController
from smartserve.server.jail import Writable
from smartserve.server.protocol import SmartServerFactory
from smartserve.server.reply import Reply
from smartserve.verbs import VerbClass


class _InstantRun:
    """A request run that answers at once, or never when ``hang``."""

    held_body_bytes = 0

    def __init__(self, args, hang):
        self.args = args
        self.hang = hang

    def advance(self, chunks, finished):
        if self.hang:
            return defer.Deferred()
        if self.args[0] == b"get":
            return defer.succeed(Reply((b"ok",), body=b"x" * 100))
        return defer.succeed(Reply((b"NoSuchFile", self.args[1]), success=False))

    def abort(self):
        pass


class _FakeBackend:
    """Knows ``get`` (answers 100 bytes), ``append`` (fails) and ``delete`` (never answers)."""

    def knows(self, verb):
        return verb in (b"get", b"append", b"delete")

    def start(self, caller, args):
        return _InstantRun(args, hang=args[0] == b"delete")


def _served(metrics, clock):
    factory = SmartServerFactory(Dispatcher(_FakeBackend()), clock=clock, metrics=metrics)
    protocol = factory.build_protocol(Caller("alice", "127.0.0.1:1", Writable.everywhere()))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return factory, protocol, transport


def _request(*args) -> bytes:
    client = Connection(Role.CLIENT)
    return client.send(Request(args)) + client.send(EndOfMessage())


def test_server_metrics_counts_requests_by_class_outcome_and_bytes():
    """Finished requests are counted by verb class and outcome, with their bytes and durations."""
    metrics = ServerMetrics()
    clock = Clock()
    factory, protocol, transport = _served(metrics, clock)
    get = _request(b"get", b"a")
    protocol.dataReceived(get)
    protocol.dataReceived(_request(b"get", b"b"))
    protocol.dataReceived(_request(b"append", b"c", b""))
    value = metrics.registry.get_sample_value
    assert value("smartserve_requests_total", {"verb_class": "read", "outcome": "ok"}) == 2
    assert value("smartserve_requests_total", {"verb_class": "mutate", "outcome": "NoSuchFile"}) == 1
    assert value("smartserve_request_duration_seconds_count", {"verb_class": "read"}) == 2
    assert value("smartserve_received_bytes_total") >= 2 * len(get)
    assert value("smartserve_sent_bytes_total") == len(transport.value())


def test_server_metrics_counts_aborted_request_with_duration():
    """A request cut off by a lost connection counts as aborted, with the time it ran."""
    metrics = ServerMetrics()
    clock = Clock()
    factory, protocol, transport = _served(metrics, clock)
    protocol.dataReceived(_request(b"delete", b"a"))
    clock.advance(3)
    protocol.connectionLost(None)
    value = metrics.registry.get_sample_value
    assert value("smartserve_requests_total", {"verb_class": "semivfs", "outcome": "aborted"}) == 1
    assert value("smartserve_request_duration_seconds_sum", {"verb_class": "semivfs"}) == 3
    assert value("smartserve_request_duration_seconds_bucket", {"verb_class": "semivfs", "le": "2.5"}) == 0


def test_server_metrics_reads_connections_and_drain_on_scrape():
    """Open connections and the drain state, drains and aborts are those of the moment of the scrape."""
    metrics = ServerMetrics()
    clock = Clock()
    factory, protocol, transport = _served(metrics, clock)
    controller = DrainController(clock, default_timeout=5)
    controller.add_drainable(factory)
    metrics.watch_connections("smart", factory)
    metrics.watch_drain(controller)
    value = metrics.registry.get_sample_value
    assert value("smartserve_open_connections", {"kind": "smart"}) == 1
    assert value("smartserve_drain_state", {"smartserve_drain_state": "serving"}) == 1
    assert value("smartserve_drains_started_total") == 0
    protocol.dataReceived(_request(b"delete", b"a"))  # busy: the drain must wait for it
    controller.drain()
    assert value("smartserve_drain_state", {"smartserve_drain_state": "draining"}) == 1
    assert value("smartserve_drain_state", {"smartserve_drain_state": "serving"}) == 0
    assert value("smartserve_drains_started_total") == 1
    assert value("smartserve_drains_completed_total") == 0
    transport.loseConnection = lambda: None
    transport.abortConnection = lambda: protocol.connectionLost(None)
    clock.advance(5)
    assert value("smartserve_drain_state", {"smartserve_drain_state": "drained"}) == 1
    assert value("smartserve_drains_completed_total") == 1
    assert value("smartserve_drain_aborted_connections_total") == 1
    assert value("smartserve_open_connections", {"kind": "smart"}) == 0


def test_server_metrics_registries_are_separate():
    """Two servers in one process keep their own figures and share no registry."""
    first, second = ServerMetrics(), ServerMetrics()
    clock = Clock()
    _, protocol, _ = _served(first, clock)
    protocol.dataReceived(_request(b"get", b"a"))
    assert first.registry is not second.registry
    assert first.registry.get_sample_value("smartserve_requests_total", {"verb_class": "read", "outcome": "ok"}) == 1
    assert second.registry.get_sample_value("smartserve_requests_total", {"verb_class": "read", "outcome": "ok"}) is None


def test_server_metrics_render_is_prometheus_text():
    """The rendered page parses as the Prometheus text format and names every server metric."""
    metrics = ServerMetrics()
    metrics.watch_connections("smart", SmartServerFactory(Dispatcher(_FakeBackend()), clock=Clock()))
    metrics.watch_drain(DrainController(Clock()))
    names = {family.name for family in text_string_to_metric_families(metrics.render().decode())}
    assert names >= {
        "smartserve_open_connections",
        "smartserve_requests",
        "smartserve_request_duration_seconds",
        "smartserve_received_bytes",
        "smartserve_sent_bytes",
        "smartserve_drain_state",
        "smartserve_drains_started",
        "smartserve_drains_completed",
        "smartserve_drain_aborted_connections",
    }


def test_admin_site_metrics_only_when_given():
    """The admin site has /metrics exactly when it is given a ServerMetrics."""
    controller = DrainController(Clock())
    with_metrics = admin_site(controller, ServerMetrics()).resource
    without = admin_site(controller).resource
    assert b"metrics" in with_metrics.children
    assert b"metrics" not in without.children
    assert b"health" in without.children


def test_client_metrics_counts_reconnects_and_resends():
    """Reconnects count by reason, resends by verb class and reason, on the registry given."""
    registry = CollectorRegistry()
    metrics = ClientMetrics(registry)
    metrics.reconnected("probe")
    metrics.reconnected("probe")
    metrics.resent(VerbClass.IDEM, "after-write")
    metrics.resent("read", "drain")
    metrics.outcome_unknown(VerbClass.MUTATE)
    value = registry.get_sample_value
    assert value("smartserve_client_reconnects_total", {"reason": "probe"}) == 2
    assert value("smartserve_client_resends_total", {"verb_class": "idem", "reason": "after-write"}) == 1
    assert value("smartserve_client_resends_total", {"verb_class": "read", "reason": "drain"}) == 1
    assert value("smartserve_client_outcome_unknown_total", {"verb_class": "mutate"}) == 1


def test_server_metrics_duration_buckets_are_cumulative_and_inclusive():
    """A duration equal to a bucket's bound counts in that bucket, every bucket counts all shorter ones, and +Inf counts all."""
    from smartserve.server.accesslog import RequestRecord

    metrics = ServerMetrics()
    for seconds in (0.0004, 0.0005, 0.2, 500.0):
        record = RequestRecord(1, "peer", None, b"get", 0.0)
        record.finished = seconds
        metrics.request_finished(record)
    samples = {
        (sample.name, sample.labels.get("le")): sample.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
        if family.name == "smartserve_request_duration_seconds"
    }
    assert samples[("smartserve_request_duration_seconds_bucket", "0.0005")] == 2
    assert samples[("smartserve_request_duration_seconds_bucket", "0.1")] == 2
    assert samples[("smartserve_request_duration_seconds_bucket", "0.25")] == 3
    assert samples[("smartserve_request_duration_seconds_bucket", "120.0")] == 3
    assert samples[("smartserve_request_duration_seconds_bucket", "+Inf")] == 4
    assert samples[("smartserve_request_duration_seconds_count", None)] == 4
    assert abs(samples[("smartserve_request_duration_seconds_sum", None)] - 500.2009) < 1e-9

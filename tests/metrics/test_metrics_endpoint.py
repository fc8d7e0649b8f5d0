"""The /metrics page of a real smartserve process after real `brz` requests."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from support import SmartserveProcess


def _scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["content-type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _total(samples: dict, name: str, **labels) -> float:
    wanted = set(labels.items())
    return sum(value for (sample, sample_labels), value in samples.items() if sample == name and wanted <= set(sample_labels))


def test_metrics_endpoint_counts_real_brz_requests(tmp_path, brz):
    """After a real push and branch over bzr://, /metrics shows their requests, bytes and the serving state."""
    server = SmartserveProcess(
        tmp_path / "data",
        [
            "--bzr", "tcp:0:interface=127.0.0.1", "--bzr-allow-writes",
            "--ssh", "tcp:0:interface=127.0.0.1", "--admin", "tcp:0:interface=127.0.0.1",
        ],
    ).start()
    try:
        before = _scrape(server.admin_port)
        assert _total(before, "smartserve_requests_total") == 0
        source = brz.make_branch(tmp_path / "source", revisions=2)
        brz.run("push", "-q", f"{server.url}/trunk", cwd=source)
        brz.run("branch", "-q", f"{server.url}/trunk", tmp_path / "copy")
        after = _scrape(server.admin_port)
    finally:
        server.stop()
    served = len(server.access_log())
    assert _total(after, "smartserve_requests_total") == served > 0
    assert _total(after, "smartserve_requests_total", verb_class="read", outcome="ok") > 0
    assert _total(after, "smartserve_requests_total", verb_class="stream") >= 1  # the pushed revisions
    assert _total(after, "smartserve_request_duration_seconds_count") == served
    assert _total(after, "smartserve_received_bytes_total") > 1000
    assert _total(after, "smartserve_sent_bytes_total") > 1000
    assert ("smartserve_open_connections", (("kind", "smart"),)) in after
    assert after[("smartserve_open_connections", (("kind", "ssh"),))] == 0
    assert after[("smartserve_ssh_logins_total", (("outcome", "accepted"),))] == 0
    assert after[("smartserve_ssh_refused_sessions_total", ())] == 0
    assert _total(after, "smartserve_drain_state", smartserve_drain_state="serving") == 1
    assert _total(after, "smartserve_drains_started_total") == 0

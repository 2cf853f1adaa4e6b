"""The operator's Prometheus endpoint: what a scrape returns after the calls the operator makes.

These tests drive ``kubetune.operator.metrics`` directly and scrape it over real HTTP, parsing
the exposition with prometheus_client's own parser (what Prometheus reads). The test that the
running operator fills these metrics against the emulator is ``test_operator_serves_metrics``.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubetune.api import PHASES
from kubetune.operator import metrics


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint, keyed by (sample name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture()
def port() -> Iterator[int]:
    server, thread = metrics.start_metrics_server(0, addr="127.0.0.1")
    try:
        yield server.server_port
    finally:
        server.shutdown()
        thread.join(timeout=5)


def test_jobs_by_phase_reports_every_phase_and_drops_vanished_ones_to_zero(port: int) -> None:
    metrics.set_jobs_by_phase({"Running": 3, "Failed": 1})
    first = scrape(port)
    assert first[("kubetune_finetunejobs", (("phase", "Running"),))] == 3
    assert first[("kubetune_finetunejobs", (("phase", "Failed"),))] == 1
    for phase in PHASES:
        assert ("kubetune_finetunejobs", (("phase", phase),)) in first, phase

    metrics.set_jobs_by_phase({"Succeeded": 4, "": 1, "Bogus": 2})
    second = scrape(port)
    assert second[("kubetune_finetunejobs", (("phase", "Running"),))] == 0
    assert second[("kubetune_finetunejobs", (("phase", "Failed"),))] == 0
    assert second[("kubetune_finetunejobs", (("phase", "Succeeded"),))] == 4
    assert second[("kubetune_finetunejobs", (("phase", "Unknown"),))] == 3
    assert not any(name == "kubetune_finetunejobs" and dict(labels)["phase"] == "Bogus" for name, labels in second)


def test_reconcile_latency_and_errors_accumulate_per_kind(port: int) -> None:
    kind = "FineTuneJobLatencyTest"
    metrics.observe_reconcile(kind, 0.02, error=False)
    metrics.observe_reconcile(kind, 3.0, error=True)
    metrics.observe_reconcile(kind, 0.3, error=False)
    samples = scrape(port)
    labels = (("kind", kind),)
    assert samples[("kubetune_reconcile_duration_seconds_count", labels)] == 3
    assert samples[("kubetune_reconcile_duration_seconds_sum", labels)] == pytest.approx(3.32)
    assert samples[("kubetune_reconcile_duration_seconds_bucket", (("kind", kind), ("le", "0.025")))] == 1
    assert samples[("kubetune_reconcile_duration_seconds_bucket", (("kind", kind), ("le", "0.5")))] == 2
    assert samples[("kubetune_reconcile_duration_seconds_bucket", (("kind", kind), ("le", "5.0")))] == 3
    assert samples[("kubetune_reconcile_errors_total", labels)] == 1


def test_error_series_exists_at_zero_before_the_first_error(port: int) -> None:
    metrics.observe_reconcile("NeverFails", 0.01, error=False)
    assert scrape(port)[("kubetune_reconcile_errors_total", (("kind", "NeverFails"),))] == 0


def test_api_errors_are_counted_by_verb_resource_and_status(port: int) -> None:
    metrics.count_api_error("PATCH", "finetunejobs/status-test", 409)
    metrics.count_api_error("patch", "finetunejobs/status-test", 409)
    metrics.count_api_error("create", "finetunejobs/status-test", 0)
    samples = scrape(port)
    key = ("kubetune_api_errors_total", (("resource", "finetunejobs/status-test"), ("status", "409"), ("verb", "patch")))
    assert samples[key] == 2
    key0 = ("kubetune_api_errors_total", (("resource", "finetunejobs/status-test"), ("status", "0"), ("verb", "create")))
    assert samples[key0] == 1


def test_process_metrics_of_the_operator_pod_are_served(port: int) -> None:
    names = {name for name, _ in scrape(port)}
    assert "process_resident_memory_bytes" in names
    assert "python_info" in names


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: metrics.observe_reconcile("FineTuneJob", -1.0, error=False), "seconds must be >= 0"),
        (lambda: metrics.set_jobs_by_phase({"Running": -2}), "count of 'Running' must be >= 0"),
        (lambda: metrics.start_metrics_server(70000), "--metrics-port: must be in 0..65535"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()

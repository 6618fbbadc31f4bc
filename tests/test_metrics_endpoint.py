"""Every service serves `GET /metrics` for Prometheus: the OpenTelemetry Prometheus
exporter over the same instruments that go out over OTLP.

The orchestrator serves it on its API port (public, like /health); the provider and the
node, which have no HTTP server, on `NEXUS_METRICS_PORT` (the `platform` fixture gives
each a free port). The dashboards' name check (tests/test_real_model.py) checks the
names the dashboards query against these endpoints too.
"""

from __future__ import annotations

import socket
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.infra import metrics
from tests.support import wait_until

pytestmark = pytest.mark.slow


def scrape(url: str) -> dict[str, set[str]]:
    """The sample names of a Prometheus text exposition, and the `service_name` labels of
    its `target_info` and `nexus_*` series (under the key `service_name`)."""
    resp = httpx.get(url, timeout=5)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain"), resp.headers
    families = list(text_string_to_metric_families(resp.text))  # a parse error fails here
    samples = {s.name for f in families for s in f.samples}
    services = {s.labels.get("service_name", "") for f in families for s in f.samples
                if s.name == "target_info" or s.name.startswith("nexus_")}
    return {"samples": samples, "service_name": services}


def endpoints(platform) -> dict[str, str]:
    return {
        "orchestrator": f"{platform.api}/metrics",
        "provider": f"http://127.0.0.1:{platform.provider.env['NEXUS_METRICS_PORT']}/metrics",
        "node": f"http://127.0.0.1:{platform.node.env['NEXUS_METRICS_PORT']}/metrics",
    }


def test_every_service_serves_its_metrics_to_prometheus(platform) -> None:
    # What each process records from its start (the provider zeroes its failure and
    # fallback counters per upstream; the orchestrator counts the nodes it knows).
    expected = {
        "orchestrator": {"nexus_nats_reconnects_total", "nexus_nodes"},
        "provider": {"nexus_nats_reconnects_total", "nexus_llm_failures_total",
                     "nexus_llm_fallbacks_total"},
        "node": {"nexus_nats_reconnects_total"},
    }
    for service, url in endpoints(platform).items():
        def served(url: str = url,
                   want: set[str] = expected[service]) -> dict[str, set[str]] | None:
            got = scrape(url)  # no Authorization header: public, like /health
            return got if want <= got["samples"] else None

        got = wait_until(served, 20, 0.3, f"{service}'s /metrics to serve {expected[service]}")
        # every series says which service it is from, as the dashboards select it
        assert got["service_name"] == {f"nexus-{service}"}, (service, got["service_name"])


def test_the_orchestrator_serves_metrics_without_tracing_or_documenting_them(platform) -> None:
    """A scrape is no API call: not in the OpenAPI document, no HTTP server span or
    duration point of its own (a scrape every 15 s would otherwise fill the traces)."""
    paths = httpx.get(f"{platform.api}/schema/openapi.json", timeout=5).json()["paths"]
    assert "/metrics" not in paths
    for _ in range(2):
        scrape(f"{platform.api}/metrics")
    text = httpx.get(f"{platform.api}/metrics", timeout=5).text
    assert 'http_route="/metrics"' not in text and 'http_target="/metrics"' not in text


def test_http_durations_are_recorded_by_route_template_not_by_path(platform) -> None:
    """`http_server_duration_milliseconds` (the dashboards' request rate, errors and
    latency) has one series per route template, method and status: two sessions read are
    one series, and no session id becomes a label (a series per session otherwise)."""
    ids = []
    for _ in range(2):
        created = httpx.post(f"{platform.api}/v1/sessions", headers=platform.admin, json={},
                             timeout=10)
        assert created.status_code == 201, created.text
        ids.append(created.json()["session_id"])
        assert httpx.get(f"{platform.api}/v1/sessions/{ids[-1]}", headers=platform.admin,
                         timeout=10).status_code == 200

    def series() -> list[dict[str, str]] | None:
        text = httpx.get(f"{platform.api}/metrics", timeout=5).text
        found = [s.labels for f in text_string_to_metric_families(text) for s in f.samples
                 if s.name == "http_server_duration_milliseconds_count"]
        reads = [labels for labels in found
                 if (labels.get("http_route"), labels.get("http_method"),
                     labels.get("http_status_code")) == ("/v1/sessions/{session_id}", "GET", "200")]
        return found if len(reads) == 1 else None

    found = wait_until(series, 20, 0.3, "one duration series for the session reads")
    assert not any(i in labels.get("http_route", "") for labels in found for i in ids)


def test_a_metrics_port_that_is_taken_is_logged_not_fatal(caplog) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert metrics.serve_metrics("127.0.0.1", port) is None
    assert any("cannot serve /metrics" in r.getMessage() for r in caplog.records)
    served = metrics.serve_metrics("127.0.0.1", port)  # free again now
    try:
        assert served == port
        assert "python_info" in scrape(f"http://127.0.0.1:{port}/metrics")["samples"]
    finally:
        metrics.stop_serving_metrics()


def test_a_summed_counter_reads_as_the_counter_it_replaces() -> None:
    """`SummedCounter` sums in the process and is read at each scrape: the same
    Prometheus counter (`_total`, one series per attribute set, however the attributes
    were ordered), shared by every holder of its name, as the SDK's counter is."""
    from opentelemetry.sdk.resources import Resource

    metrics.setup_metrics(Resource.create({"service.name": "nexus-test"}))
    name = f"nexus.test.summed{uuid.uuid4().hex[:8]}"

    def totals() -> dict[tuple[str, str], float]:
        body, _ = metrics.exposition()
        [family] = [f for f in text_string_to_metric_families(body.decode())
                    if f.name == name.replace(".", "_")]
        assert family.type == "counter"
        return {(s.labels["rule"], s.labels["allowed"]): s.value for s in family.samples
                if s.name.endswith("_total")}

    first = metrics.summed_counter(name, "{call}", "calls, for the test")
    assert metrics.summed_counter(name, "{call}", "calls, for the test") is first
    first.add(2, {"rule": "a", "allowed": "true"})
    metrics.summed_counter(name, "{call}", "").add(1, {"allowed": "true", "rule": "a"})
    first.add(0.5, {"rule": "b", "allowed": "false"})
    first.add(0, {"rule": "c", "allowed": "true"})  # a series that exists at 0
    assert totals() == {("a", "true"): 3, ("b", "false"): 0.5, ("c", "true"): 0}
    first.add(1, {"rule": "b", "allowed": "false"})
    assert totals() == {("a", "true"): 3, ("b", "false"): 1.5, ("c", "true"): 0}


def test_a_local_histogram_reads_as_the_sdk_histogram_it_replaces() -> None:
    """A process that does not push metrics over OTLP aggregates its histograms itself
    (`histogram()` -> `LocalHistogram`): read at each scrape as the SDK's histogram
    reads, bucket by bucket (a value on a bound counts in that bound's bucket; above the
    last, in `+Inf`), with its `_sum` and `_count`, one series per attribute set however
    the attributes were ordered, and an integer attribute as its label."""
    from opentelemetry.sdk.resources import Resource

    metrics.setup_metrics(Resource.create({"service.name": "nexus-test"}))
    tag = uuid.uuid4().hex[:8]
    local = metrics.histogram(f"nexus.test.local{tag}", "ms", "requests, for the test")
    assert isinstance(local, metrics.LocalHistogram)
    assert metrics.histogram(f"nexus.test.local{tag}", "ms", "") is local
    sdk = metrics._meter().create_histogram(f"nexus.test.sdk{tag}", unit="ms",
                                            description="requests, for the test")
    ok = {"http.route": "/v1/x", "http.status_code": 200}
    for value, attributes in [(0, ok), (5, ok), (5.5, ok), (10000, ok), (10001, ok),
                              (42.25, {"http.route": "/v1/y", "http.status_code": 503})]:
        local.record(value, attributes)
        sdk.record(value, dict(reversed(attributes.items())))

    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition()[0].decode())}

    def read(name: str) -> tuple[str, list]:
        family = families[f"{name}_milliseconds"]
        return family.type, sorted((s.name.removeprefix(name), sorted(s.labels.items()), s.value)
                                   for s in family.samples)

    kind, samples = read(f"nexus_test_local{tag}")
    assert (kind, samples) == read(f"nexus_test_sdk{tag}")
    assert kind == "histogram"
    counts = {(dict(labels)["http_route"], dict(labels).get("le")): value
              for name, labels, value in samples if name == "_milliseconds_bucket"}
    assert counts[("/v1/x", "5.0")] == 2 and counts[("/v1/x", "10000.0")] == 4
    assert counts[("/v1/x", "+Inf")] == 5 and counts[("/v1/y", "+Inf")] == 1

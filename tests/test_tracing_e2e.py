"""One trace spans the HTTP request on the orchestrator and the NATS handlers it
triggers in the provider and node processes; spans arrive at a real OTLP receiver."""

from __future__ import annotations

import httpx

from tests.support import wait_until


def test_one_trace_spans_orchestrator_provider_and_node(platform, otlp) -> None:
    resp = httpx.get(f"{platform.api}/v1/system/ping", timeout=10, headers=platform.admin)
    assert resp.status_code == 200 and resp.json()["provider"]["ok"]

    # Find the trace by the orchestrator's HTTP server span for this route.
    def find_trace() -> str | None:
        for span in list(otlp.spans):
            if span.service == "nexus-orchestrator" and "/v1/system/ping" in span.name:
                services = {s.service for s in otlp.trace(span.trace_id)}
                if {"nexus-provider", "nexus-node"} <= services:
                    return span.trace_id
        return None

    trace_id = wait_until(find_trace, 20, 0.2, "spans of all three services in one trace")
    spans = otlp.trace(trace_id)
    by_id = {s.span_id: s for s in spans}
    root = [s for s in spans if s.parent_span_id == "" or s.parent_span_id not in by_id]
    assert len(root) == 1 and root[0].service == "nexus-orchestrator"

    def ancestors(span):
        while span.parent_span_id in by_id:
            span = by_id[span.parent_span_id]
            yield span

    for service, subject in (("nexus-provider", "nexus.provider.ping"),
                             ("nexus-node", "nexus.node.ping")):
        [process] = [s for s in spans if s.service == service and s.name == f"{subject} process"]
        assert process.attributes["messaging.system"] == "nats"
        assert process.attributes["messaging.destination.name"] == subject
        parent = by_id[process.parent_span_id]
        assert parent.service == "nexus-orchestrator" and parent.name == f"{subject} publish"
        assert root[0] in list(ancestors(process))


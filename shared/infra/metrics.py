"""Metrics: OpenTelemetry instruments, declared once, exported over OTLP.

Names follow the OpenTelemetry GenAI conventions for LLM calls
(`gen_ai.client.token.usage`, `gen_ai.client.operation.duration`) and a `nexus.`
prefix for the rest. In Prometheus (through the collector or grafana/otel-lgtm) they
read as `gen_ai_client_token_usage_*`, `nexus_llm_cost_usd_total`, ... (dots to
underscores, unit suffixes such as `_seconds`/`_bytes`/`_percent`, `_total` on
counters, `{...}` units dropped); the dashboards in `observability/` use those names
and `tests/test_dashboards.py` checks them against a live run. Labels are bounded: model, provider, error type, rule, status,
projection, node id (acceptable up to thousands); never a session, call or request id.

With `OTEL_EXPORTER_OTLP_ENDPOINT` set, every service pushes its metrics every
`OTEL_METRIC_EXPORT_INTERVAL` ms (default 60000). Besides, the same instruments are
read at each scrape by the OpenTelemetry Prometheus exporter: every process serves them
as `GET /metrics` on `NEXUS_METRICS_PORT` (`serve_metrics`), and the orchestrator also
on its API port (`exposition`), under the same Prometheus names.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

log = logging.getLogger("nexus.metrics")

_provider: MeterProvider | None = None
_server = None  # the /metrics HTTP server of this process, if any

# GenAI semantic-convention buckets (seconds and tokens).
_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                     40.96, 81.92)
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)


def setup_metrics(resource: Resource) -> MeterProvider:
    global _provider
    if _provider is not None:
        return _provider
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    # Pulled at each scrape of /metrics; every series carries `service_name` (as through
    # the collector), which the dashboards select on.
    readers = [PrometheusMetricReader(resource_attribute_filter=lambda key: key == "service.name")]
    otlp = bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))
    if otlp:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    # Exemplars (a measurement's trace, for Grafana's metric-to-trace links) travel only
    # over OTLP; the Prometheus reader drops them. Without OTLP they are not sampled at
    # all: a quarter of each record's cost (docs/performance.md, round 8).
    # OTEL_METRICS_EXEMPLAR_FILTER, when set, decides as the SDK documents.
    exemplars = None if otlp or os.environ.get("OTEL_METRICS_EXEMPLAR_FILTER") else \
        AlwaysOffExemplarFilter()
    views = [
        View(instrument_name="gen_ai.client.operation.duration",
             aggregation=ExplicitBucketHistogramAggregation(_DURATION_BUCKETS)),
        View(instrument_name="nexus.llm.time_to_first_token",
             aggregation=ExplicitBucketHistogramAggregation(_DURATION_BUCKETS)),
        View(instrument_name="gen_ai.client.token.usage",
             aggregation=ExplicitBucketHistogramAggregation(_TOKEN_BUCKETS)),
        View(instrument_name="nexus.tool.duration",
             aggregation=ExplicitBucketHistogramAggregation(_DURATION_BUCKETS)),
    ]
    _provider = MeterProvider(resource=resource, metric_readers=readers, views=views,
                              exemplar_filter=exemplars)
    metrics.set_meter_provider(_provider)
    return _provider


def shutdown_metrics() -> None:
    stop_serving_metrics()
    if _provider is not None:
        _provider.shutdown()


def stop_serving_metrics() -> None:
    global _server
    if _server is not None:
        _server.shutdown()
        _server.server_close()
        _server = None


def exposition(accept: str | None = None) -> tuple[bytes, str]:
    """The Prometheus text exposition of this process's metrics and its content type."""
    from prometheus_client import REGISTRY
    from prometheus_client.exposition import choose_encoder

    encoder, content_type = choose_encoder(accept or "")
    return encoder(REGISTRY), content_type


def serve_metrics(host: str, port: int) -> int | None:
    """Serve `GET /metrics` on `host:port` from a thread (0: none); the bound port.

    A port that cannot be bound is logged, not fatal: metrics are an aid, never a reason
    for a service not to run."""
    global _server
    if port <= 0 or _server is not None:
        return _server.server_port if _server is not None else None
    from prometheus_client import start_http_server

    try:
        _server, _thread = start_http_server(port, addr=host)
    except OSError as exc:
        log.error("cannot serve /metrics on %s:%s: %s", host, port, exc)
        return None
    log.info("metrics on http://%s:%s/metrics", host, _server.server_port)
    return _server.server_port


def _meter() -> metrics.Meter:
    return metrics.get_meter("nexus")


class SummedCounter:
    """A monotonic counter summed in this process and read at each collection (an
    OpenTelemetry observable counter): `add` is a dict update, where a counter's `add`
    takes the SDK's measurement path (6 us here, a tenth of the provider's CPU per call
    with the histograms: docs/performance.md, round 10). Same name, unit, series and
    Prometheus name (`..._total`) as a counter. One per name in a process
    (`summed_counter`), as the SDK keeps one counter per name."""

    def __init__(self, name: str, unit: str, description: str) -> None:
        self._sums: dict[tuple[tuple[str, str], ...], float] = {}
        _meter().create_observable_counter(name, callbacks=[self._observe], unit=unit,
                                           description=description)

    def add(self, amount: float, attributes: dict[str, str] | None = None) -> None:
        key = tuple(sorted(attributes.items())) if attributes else ()
        self._sums[key] = self._sums.get(key, 0) + amount

    def _observe(self, options: CallbackOptions) -> Iterable[Observation]:
        # the collecting thread copies (atomic under the GIL) while the loop adds
        return [Observation(total, dict(key)) for key, total in self._sums.copy().items()]


_summed: dict[str, SummedCounter] = {}


def summed_counter(name: str, unit: str, description: str) -> SummedCounter:
    """The process's `SummedCounter` of that name (made on first use)."""
    counter = _summed.get(name)
    if counter is None:
        counter = _summed[name] = SummedCounter(name, unit, description)
    return counter


class LLMMetrics:
    """Provider side: what every LLM call cost and how it went."""

    def __init__(self) -> None:
        m = _meter()
        self.tokens = m.create_histogram(
            "gen_ai.client.token.usage", unit="{token}",
            description="Tokens used per LLM call, by gen_ai.token.type (input/output)")
        self.duration = m.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="Duration of LLM calls")
        self.ttft = m.create_histogram(
            "nexus.llm.time_to_first_token", unit="s", description="Time to the first token")
        self.cost = summed_counter("nexus.llm.cost.usd", unit="{USD}",
                                   description="Cost of LLM calls in USD")
        self.failures = summed_counter(
            "nexus.llm.failures", unit="{attempt}", description="Failed LLM attempts by error type")
        self.fallbacks = summed_counter(
            "nexus.llm.fallbacks", unit="{fallback}", description="Fallbacks to the next target")

    def completed(self, *, model: str, provider: str, input_tokens: int, output_tokens: int,
                  seconds: float, ttft_s: float | None, cost_usd: float) -> None:
        base = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": provider,
                "gen_ai.request.model": model}
        self.tokens.record(input_tokens, {**base, "gen_ai.token.type": "input"})
        self.tokens.record(output_tokens, {**base, "gen_ai.token.type": "output"})
        self.duration.record(seconds, base)
        if ttft_s is not None:
            self.ttft.record(ttft_s, base)
        self.cost.add(cost_usd, {"gen_ai.provider.name": provider, "gen_ai.request.model": model})


class ControlMetrics:
    """Orchestrator side: policy and budget decisions, requests of the platform."""

    def __init__(self) -> None:
        self.policy = summed_counter(
            "nexus.policy.decisions", unit="{decision}", description="Policy evaluations by rule")
        self.budget_denials = summed_counter(
            "nexus.budget.denials", unit="{call}", description="Calls denied by a budget")
        self.budget_committed = summed_counter(
            "nexus.budget.committed.usd", unit="{USD}", description="Spend committed to budgets, USD")
        self.budget_overruns = summed_counter(
            "nexus.budget.overruns", unit="{call}",
            description="Commits above their reservation, by budget scope (session/tenant)")
        self.budget_overrun_tokens = summed_counter(
            "nexus.budget.overrun.tokens", unit="{token}",
            description="Tokens committed beyond the calls' reservations, by budget scope")


class ToolMetrics:
    """Node side: tool calls by tool and outcome, their duration, sandbox starts.

    `gen_ai.tool.name` is the builtin's name, or the kind (`http`, `mcp`) for a tenant's
    own tools (bounded); `outcome` is `ok`, `error` (the tool reported a failure) or the
    `Failed.error` reason (`timeout`, `memory`, `overloaded`, ...)."""

    def __init__(self) -> None:
        self.calls = summed_counter(
            "nexus.tool.calls", unit="{call}", description="Tool calls by tool and outcome")
        self.duration = _meter().create_histogram(
            "nexus.tool.duration", unit="s", description="Duration of tool calls on nodes")
        self.sandbox_starts = summed_counter(
            "nexus.sandbox.starts", unit="{start}", description="Sandboxes started, by tool")


def observe_gauges(name: str, unit: str, description: str,
                   read: Callable[[], Iterable[tuple[float, dict[str, str]]]]) -> None:
    """An observable gauge read at export time from in-memory state (no I/O)."""

    def callback(options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(value, attrs) for value, attrs in read()]

    _meter().create_observable_gauge(name, callbacks=[callback], unit=unit, description=description)


def nats_reconnects(read: Callable[[], int]) -> None:
    def callback(options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(read())]

    _meter().create_observable_counter("nexus.nats.reconnects", callbacks=[callback],
                                       unit="{reconnect}", description="NATS reconnections")

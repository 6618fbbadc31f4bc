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
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

log = logging.getLogger("nexus.metrics")

_provider: MeterProvider | None = None
_server = None  # the /metrics HTTP server of this process, if any

# GenAI semantic-convention buckets (seconds and tokens).
_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                     40.96, 81.92)
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)
# the OpenTelemetry SDK's default boundaries (milliseconds-minded)
_DEFAULT_BUCKETS = (0.0, 5.0, 10.0, 25.0, 50.0, 75.0, 100.0, 250.0, 500.0, 750.0, 1000.0,
                   2500.0, 5000.0, 7500.0, 10000.0)
# Every histogram's boundaries, declared once: the SDK's views (metrics pushed over OTLP)
# and the in-process histograms (`LocalHistogram`, read by Prometheus) both use them.
_BUCKETS: dict[str, tuple[float, ...]] = {
    "gen_ai.client.operation.duration": _DURATION_BUCKETS,
    "nexus.llm.time_to_first_token": _DURATION_BUCKETS,
    "gen_ai.client.token.usage": _TOKEN_BUCKETS,
    "nexus.tool.duration": _DURATION_BUCKETS,
    "http.server.duration": _DEFAULT_BUCKETS,
    "nexus.tool.call.duration": _DEFAULT_BUCKETS,
    "nexus.agent.run.steps": _DEFAULT_BUCKETS,
    "nexus.agent.run.cost": _DEFAULT_BUCKETS,
}
_SCOPE = InstrumentationScope("nexus")  # the scope of `_meter()`'s instruments


def metrics_pushed() -> bool:
    """Whether this process pushes its metrics over OTLP (to a collector: with exemplars)."""
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))


def setup_metrics(resource: Resource) -> MeterProvider:
    global _provider
    if _provider is not None:
        return _provider
    # Pulled at each scrape of /metrics; every series carries `service_name` (as through
    # the collector), which the dashboards select on.
    readers: list[MetricReader] = [_prometheus_reader(resource)]
    otlp = metrics_pushed()
    if otlp:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    # Exemplars (a measurement's trace, for Grafana's metric-to-trace links) travel only
    # over OTLP; the Prometheus reader drops them. Without OTLP they are not sampled at
    # all: a quarter of each record's cost (docs/performance.md, round 8).
    # OTEL_METRICS_EXEMPLAR_FILTER, when set, decides as the SDK documents.
    exemplars = None if otlp or os.environ.get("OTEL_METRICS_EXEMPLAR_FILTER") else \
        AlwaysOffExemplarFilter()
    views = [View(instrument_name=name, aggregation=ExplicitBucketHistogramAggregation(bounds))
             for name, bounds in _BUCKETS.items()]
    _provider = MeterProvider(resource=resource, metric_readers=readers, views=views,
                              exemplar_filter=exemplars)
    metrics.set_meter_provider(_provider)
    return _provider


def _prometheus_reader(resource: Resource) -> MetricReader:
    """The OpenTelemetry Prometheus reader, with this process's `LocalHistogram`s added
    to what the SDK collects at each scrape (the reader translates both alike)."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    class Reader(PrometheusMetricReader):
        def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000,
                             **kwargs: Any) -> None:
            now = time.time_ns()
            local = [m for h in list(_local.values()) if (m := h.metric(now)) is not None]
            if local:
                metrics_data = MetricsData(resource_metrics=[
                    *metrics_data.resource_metrics,
                    ResourceMetrics(resource=resource, schema_url="", scope_metrics=[
                        ScopeMetrics(scope=_SCOPE, metrics=local, schema_url="")])])
            super()._receive_metrics(metrics_data, timeout_millis, **kwargs)

    return Reader(resource_attribute_filter=lambda key: key == "service.name")


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


class _Series:
    __slots__ = ("counts", "total", "low", "high", "start")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.total = 0.0
        self.low = float("inf")
        self.high = float("-inf")
        self.start = time.time_ns()


class LocalHistogram:
    """An explicit-bucket histogram aggregated in this process and read at each scrape,
    for a process that does not push its metrics over OTLP (`histogram()`): `record` is
    a bisect and a few additions under a lock, where the SDK's histogram takes its
    measurement path (6 us here, its attributes cleaned and hashed in Python: the
    provider's four per call were a quarter of its Python calls, docs/performance.md
    round 12). The same name, unit, buckets (a bucket counts the values up to and
    including its bound, as the SDK's), series and Prometheus names as the SDK's
    histogram, whose reader translates both. No exemplars: only OTLP carries them, and
    a process that pushes over OTLP gets the SDK's histogram."""

    def __init__(self, name: str, unit: str, description: str,
                 boundaries: tuple[float, ...]) -> None:
        self.name, self.unit, self.description = name, unit, description
        self._bounds = boundaries
        self._series: dict[tuple[tuple[str, Any], ...], _Series] = {}
        self._lock = threading.Lock()  # the scrape reads from another thread

    def record(self, amount: float, attributes: dict[str, Any] | None = None) -> None:
        key = tuple(sorted(attributes.items())) if attributes else ()
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _Series(len(self._bounds) + 1)
            series.counts[bisect_left(self._bounds, amount)] += 1
            series.total += amount
            if amount < series.low:
                series.low = amount
            if amount > series.high:
                series.high = amount

    def metric(self, now_ns: int) -> Metric | None:
        """What it holds, as the SDK's reader receives a cumulative histogram."""
        with self._lock:
            points = [HistogramDataPoint(
                attributes=dict(key), start_time_unix_nano=s.start, time_unix_nano=now_ns,
                count=sum(s.counts), sum=s.total, bucket_counts=list(s.counts),
                explicit_bounds=self._bounds, min=s.low, max=s.high)
                for key, s in self._series.items()]
        if not points:
            return None
        return Metric(name=self.name, description=self.description, unit=self.unit,
                      data=HistogramData(data_points=points,
                                         aggregation_temporality=AggregationTemporality.CUMULATIVE))


_local: dict[str, LocalHistogram] = {}


def histogram(name: str, unit: str, description: str) -> Any:
    """The histogram of that name (boundaries: `_BUCKETS`; one it does not name, a
    test's, gets `_DEFAULT_BUCKETS`): the SDK's when this process pushes its metrics over
    OTLP, else the process's `LocalHistogram` (made on first use). Both have
    `record(amount, attributes)`."""
    if metrics_pushed():
        return _meter().create_histogram(name, unit=unit, description=description)
    local = _local.get(name)
    if local is None:
        local = _local[name] = LocalHistogram(name, unit, description,
                                              _BUCKETS.get(name, _DEFAULT_BUCKETS))
    return local


class LLMMetrics:
    """Provider side: what every LLM call cost and how it went."""

    def __init__(self) -> None:
        self.tokens = histogram(
            "gen_ai.client.token.usage", unit="{token}",
            description="Tokens used per LLM call, by gen_ai.token.type (input/output)")
        self.duration = histogram(
            "gen_ai.client.operation.duration", unit="s", description="Duration of LLM calls")
        self.ttft = histogram(
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
        self.duration = histogram(
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

"""OpenTelemetry: one tracer provider per process, W3C context in NATS headers.

`setup_tracing(service)` is called once at process start. When
`OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans go to it over OTLP/HTTP (the exporter
reads the standard OTEL_* variables itself); otherwise they are recorded (so logs
and events still get trace ids) and dropped.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from shared import __version__

_provider: TracerProvider | None = None


def setup_tracing(service_name: str, instance_id: str | None = None) -> TracerProvider:
    global _provider
    if _provider is not None:
        return _provider
    resource = Resource.create(
        {
            "service.name": service_name,
            "service.version": __version__,
            "service.instance.id": instance_id or f"{socket.gethostname()}-{os.getpid()}",
        }
    )
    provider = TracerProvider(resource=resource)
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _provider = provider
    from shared.infra.metrics import setup_metrics

    setup_metrics(resource)
    _instrument_libraries()
    return provider


def _instrument_libraries() -> None:
    """Client spans for outgoing HTTP (runtimes, upstreams) and Postgres queries."""
    try:
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

        HTTPXClientInstrumentor().instrument()
    except Exception:  # instrumentation is an aid, never a reason not to start
        pass
    try:
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

        AsyncPGInstrumentor().instrument()
    except Exception:
        pass


def shutdown_tracing() -> None:
    """Flush and stop exporting (spans and metrics); call on process exit."""
    from shared.infra.metrics import shutdown_metrics

    if _provider is not None:
        _provider.shutdown()
    shutdown_metrics()


def tracer(name: str = "nexus") -> trace.Tracer:
    return trace.get_tracer(name)


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Current trace context as W3C `traceparent`/`tracestate` headers."""
    carrier: dict[str, str] = dict(headers or {})
    propagate.inject(carrier)
    return carrier


def extract_context(headers: Mapping[str, str] | None) -> Context:
    return propagate.extract(dict(headers or {}))


def current_ids() -> tuple[str | None, str | None]:
    """(trace_id, span_id) of the current span as hex, or (None, None)."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None, None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")

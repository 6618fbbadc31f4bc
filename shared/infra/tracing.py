"""OpenTelemetry: one tracer provider per process, W3C context in NATS headers.

`setup_tracing(service)` is called once at process start. When
`OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans go to it over OTLP/HTTP (the exporter
reads the standard OTEL_* variables itself), sampled as `OTEL_TRACES_SAMPLER` says
(default: every trace). Otherwise nothing would receive a span, so none is recorded
and, inside a trace, none is made:

- a span with no trace around it (a request that came without `traceparent`, a
  background job) is a non-recording span with fresh trace and span ids, so logs and
  events still carry trace ids and the context still propagates (unsampled; set the
  endpoint on every service or on none);
- a span inside a trace (a NATS request or handler, a call to an upstream, a
  statement) is the span it would have been made under: the block runs in that span
  (or in the remote context it was given), with its ids; nothing is created, entered
  or ended for it (issue 16: about a quarter of the provider's Python function calls
  per call, and the orchestrator's most called library, went to spans nobody would
  receive; docs/performance.md, round 11);
- the libraries' instrumentation (asyncpg statements, httpx) is installed when the
  process's tracer provider gets its first span processor, not before.

A span processor added later (a test's collector) turns recording, and making spans,
on.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind, get_current_span
from opentelemetry.util.types import Attributes

from shared import __version__

_provider: TracerProvider | None = None


class WhileExported(Sampler):
    """`sampler`'s decision once something exports spans; until then DROP: a span that
    no processor would see costs its ids only, not the recording (a fifth of the
    provider's CPU per call went to spans nobody received: docs/performance.md, round
    10). The ids stay, so trace ids reach logs and events as before."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self.exporting = False

    def should_sample(self, parent_context: Context | None, trace_id: int, name: str,
                      kind: SpanKind | None = None, attributes: Attributes = None,
                      links: Sequence[Link] | None = None,
                      trace_state: object = None) -> SamplingResult:
        if self.exporting:
            return self.sampler.should_sample(parent_context, trace_id, name, kind,
                                              attributes, links)
        parent = get_current_span(parent_context).get_span_context()
        return SamplingResult(Decision.DROP, None,
                              parent.trace_state if parent.is_valid else None)

    def get_description(self) -> str:
        return f"WhileExported{{{self.sampler.get_description()}}}"


class _InSpan:
    """What `start_as_current_span` returns for a span not made (module doc): the block
    runs in `span` (and in `context`, attached for it, when one was given)."""

    __slots__ = ("_span", "_context", "_token")

    def __init__(self, span: trace.Span, context: Context | None) -> None:
        self._span = span
        self._context = context
        self._token: object = None

    def __enter__(self) -> trace.Span:
        if self._context is not None:
            self._token = context_api.attach(self._context)
        return self._span

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            context_api.detach(self._token)  # type: ignore[arg-type]


class _Tracer(trace.Tracer):
    """The SDK's tracer, but for the spans nothing would record inside a trace: those
    are not made (module doc). Used as a context manager only, not as a decorator."""

    def __init__(self, tracer: trace.Tracer, gate: WhileExported) -> None:
        self._tracer = tracer
        self._gate = gate

    def _enclosing(self, context: Context | None) -> trace.Span | None:
        """The span a new one would be made under, when it need not be made."""
        if self._gate.exporting:
            return None
        parent = get_current_span(context)
        return parent if parent.get_span_context().is_valid else None

    def start_span(self, name: str, context: Context | None = None,
                   *args: object, **kwargs: object) -> trace.Span:
        enclosing = self._enclosing(context)
        if enclosing is not None:
            return enclosing  # its `end()` is a non-recording span's: nothing
        return self._tracer.start_span(name, context, *args, **kwargs)  # type: ignore[arg-type]

    def start_as_current_span(self, name: str, context: Context | None = None,
                              *args: object, **kwargs: object) -> Any:
        enclosing = self._enclosing(context)
        if enclosing is not None:
            return _InSpan(enclosing, context)
        return self._tracer.start_as_current_span(  # type: ignore[arg-type]
            name, context, *args, **kwargs)


class _Provider(TracerProvider):
    """Records spans from the first span processor on (`WhileExported`); until then
    makes none inside a trace (`_Tracer`)."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource=resource)  # the sampler OTEL_TRACES_SAMPLER names
        self.sampler = self.gate = WhileExported(self.sampler)
        self.instrument_on_export = False  # the process's provider (`setup_tracing`)

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return _Tracer(super().get_tracer(*args, **kwargs), self.gate)

    def add_span_processor(self, span_processor: SpanProcessor) -> None:
        super().add_span_processor(span_processor)
        first = not self.gate.exporting
        self.gate.exporting = True
        if first and self.instrument_on_export:
            _instrument_libraries()


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
    provider = _Provider(resource)
    provider.instrument_on_export = True
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _provider = provider
    from shared.infra.metrics import setup_metrics

    setup_metrics(resource)
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

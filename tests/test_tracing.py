"""Tracing without an exporter: spans nobody would receive are not recorded, inside a
trace not even made, and every request still has its trace id (in logs, events and the
context it propagates)."""

from __future__ import annotations

import pytest
from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.infra import tracing


def _provider(monkeypatch: pytest.MonkeyPatch, sampler: str | None = None) -> tracing._Provider:
    if sampler is None:
        monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    else:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    return tracing._Provider(Resource.create({"service.name": "nexus-test"}))


def _ids(span: trace.Span) -> tuple[int, int]:
    ctx = span.get_span_context()
    return ctx.trace_id, ctx.span_id


def test_without_a_processor_spans_are_not_recorded_but_keep_their_ids(monkeypatch) -> None:
    tracer = _provider(monkeypatch).get_tracer("test")
    with tracer.start_as_current_span("request") as request:
        assert not request.is_recording()
        trace_id, span_id = _ids(request)
        assert trace_id and span_id
        assert tracing.current_ids() == (format(trace_id, "032x"), format(span_id, "016x"))
        headers = tracing.inject_headers()
    assert headers["traceparent"].split("-")[1] == format(trace_id, "032x")
    with tracer.start_as_current_span("next request") as other:
        assert _ids(other)[0] not in (0, trace_id)  # each trace of its own


def test_without_a_processor_a_span_inside_a_trace_is_not_made(monkeypatch) -> None:
    """The block runs in the enclosing span: its ids, nothing new entered or ended."""
    tracer = _provider(monkeypatch).get_tracer("test")
    with tracer.start_as_current_span("request") as request:
        with tracer.start_as_current_span("statement") as child:
            assert child is request
            assert tracing.current_ids()[1] == format(_ids(request)[1], "016x")
        upstream = tracer.start_span("upstream call")
        assert upstream is request
        upstream.end()
        assert trace.get_current_span() is request
        with pytest.raises(KeyError), tracer.start_as_current_span("failing"):
            raise KeyError("raised in the block, raised out of it")
        assert trace.get_current_span() is request


def test_a_remote_parent_keeps_its_trace_when_nothing_is_recorded(monkeypatch) -> None:
    tracer = _provider(monkeypatch).get_tracer("test")
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    token = context.attach(propagate.extract({"traceparent": parent}))
    try:
        with tracer.start_as_current_span("consume") as span:
            assert not span.is_recording()
            assert format(_ids(span)[0], "032x") == "0af7651916cd43dd8448eb211c80319c"
    finally:
        context.detach(token)
    remote = propagate.extract({"traceparent": parent})  # given, not current: a handler's
    with tracer.start_as_current_span("process", context=remote):
        assert tracing.current_ids() == ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")
    assert tracing.current_ids() == (None, None)  # the remote context left with the block


def test_the_libraries_are_instrumented_when_spans_are_first_exported(monkeypatch) -> None:
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    for instrumentor in (AsyncPGInstrumentor(), HTTPXClientInstrumentor()):
        if instrumentor.is_instrumented_by_opentelemetry:  # by an earlier test's setup
            instrumentor.uninstrument()
    provider = _provider(monkeypatch)
    provider.instrument_on_export = True  # as `setup_tracing` makes the process's
    assert not AsyncPGInstrumentor().is_instrumented_by_opentelemetry
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    try:
        assert AsyncPGInstrumentor().is_instrumented_by_opentelemetry
        assert HTTPXClientInstrumentor().is_instrumented_by_opentelemetry
    finally:
        AsyncPGInstrumentor().uninstrument()
        HTTPXClientInstrumentor().uninstrument()


def test_a_span_processor_turns_recording_on(monkeypatch) -> None:
    provider = _provider(monkeypatch)
    tracer = provider.get_tracer("test")  # taken before the processor: it records too
    with tracer.start_as_current_span("before"):
        pass
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with tracer.start_as_current_span("request") as request:
        assert request.is_recording()
        with tracer.start_as_current_span("statement"):
            pass
    assert [s.name for s in exporter.get_finished_spans()] == ["statement", "request"]
    assert all(s.context.trace_id == _ids(request)[0] for s in exporter.get_finished_spans())


def test_once_exported_the_configured_sampler_decides(monkeypatch) -> None:
    provider = _provider(monkeypatch, "always_off")
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test").start_as_current_span("request") as request:
        assert not request.is_recording()
    assert exporter.get_finished_spans() == ()
    assert "AlwaysOff" in provider.sampler.get_description()

"""Test helpers: service processes, HTTP waits, and a real OTLP/HTTP trace receiver."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from shared.infra.process import kill_process, spawn, stop_process

REPO = Path(__file__).resolve().parents[1]


def wait_until(predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.05,
               what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last error: {last_exc}")


@dataclass
class ServiceProc:
    """A Nexus service started as a real process (`python -m services.<name>.main`)."""

    name: str
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProc:
        self.proc = spawn([sys.executable, "-m", f"services.{self.name}.main"], self.log_path,
                          cwd=REPO, env=self.env, stdin=None, start_new_session=False)
        return self

    def stop(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if not stop_process(self.proc, timeout):
            raise AssertionError(f"{self.name} did not stop on SIGTERM within {timeout}s")
        return self.proc.returncode

    def kill(self) -> None:
        assert self.proc is not None
        kill_process(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def service_env(nats_url: str, database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OTEL_", "NEXUS_")) or k == "NEXUS_CACHE_DIR"}
    env.update({"NATS_URL": nats_url, "DATABASE_URL": database_url, "PYTHONUNBUFFERED": "1",
                "NEXUS_RUNTIME": "none",  # a test that wants llama-server says so
                "NEXUS_METRICS_PORT": "0"})  # a test that scrapes /metrics gives a port
    env.update(extra)
    return env


def wait_http_ok(url: str, timeout: float = 90.0, proc: ServiceProc | None = None) -> httpx.Response:
    def ok() -> httpx.Response | None:
        if proc is not None and proc.proc is not None and proc.proc.poll() is not None:
            raise AssertionError(f"{proc.name} exited ({proc.proc.returncode}):\n{proc.log()[-3000:]}")
        resp = httpx.get(url, timeout=2)
        return resp if resp.status_code == 200 else None

    return wait_until(ok, timeout, 0.1, f"{url} to answer 200")  # type: ignore[return-value]


@dataclass
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, object]


@dataclass
class ReceivedPoint:
    service: str
    metric: str
    unit: str
    kind: str  # "sum", "gauge", "histogram"
    value: float  # sum value, gauge value, or histogram sum
    count: int  # histogram count (1 otherwise)
    attributes: dict[str, object]
    monotonic: bool = False
    exemplar_trace_ids: tuple[str, ...] = ()  # histograms: the traces its exemplars name


def _attrs(attributes) -> dict[str, object]:
    out: dict[str, object] = {}
    for a in attributes:
        v = a.value
        out[a.key] = v.string_value or v.int_value or v.double_value or v.bool_value
    return out


@dataclass
class OtlpReceiver:
    """An OTLP/HTTP endpoint (`POST /v1/traces`, `/v1/metrics`, protobuf) that keeps what
    it receives."""

    spans: list[ReceivedSpan] = field(default_factory=list)
    points: list[ReceivedPoint] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> OtlpReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/v1/traces":
                    receiver._ingest(body)
                elif self.path == "/v1/metrics":
                    receiver._ingest_metrics(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def _ingest(self, body: bytes) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        spans = []
        for resource_spans in request.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes
                 if a.key == "service.name"), "",
            )
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attrs: dict[str, object] = {}
                    for a in span.attributes:
                        v = a.value
                        attrs[a.key] = (v.string_value or v.int_value or v.double_value
                                        or v.bool_value)
                    spans.append(ReceivedSpan(
                        service=service, name=span.name, trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(), parent_span_id=span.parent_span_id.hex(),
                        kind=span.kind, attributes=attrs,
                    ))
        with self.lock:
            self.spans.extend(spans)

    def _ingest_metrics(self, body: bytes) -> None:
        request = ExportMetricsServiceRequest()
        request.ParseFromString(body)
        points = []
        for rm in request.resource_metrics:
            service = str(_attrs(rm.resource.attributes).get("service.name", ""))
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    kind = metric.WhichOneof("data")
                    if kind == "sum":
                        for dp in metric.sum.data_points:
                            points.append(ReceivedPoint(service, metric.name, metric.unit, "sum",
                                                        dp.as_double or dp.as_int, 1,
                                                        _attrs(dp.attributes),
                                                        metric.sum.is_monotonic))
                    elif kind == "gauge":
                        for dp in metric.gauge.data_points:
                            points.append(ReceivedPoint(service, metric.name, metric.unit, "gauge",
                                                        dp.as_double or dp.as_int, 1,
                                                        _attrs(dp.attributes)))
                    elif kind == "histogram":
                        for dp in metric.histogram.data_points:
                            points.append(ReceivedPoint(
                                service, metric.name, metric.unit, "histogram", dp.sum,
                                dp.count, _attrs(dp.attributes),
                                exemplar_trace_ids=tuple(e.trace_id.hex() for e in dp.exemplars
                                                         if e.trace_id)))
        with self.lock:
            self.points.extend(points)

    def latest(self, metric: str) -> list[ReceivedPoint]:
        """The last exported point of each (service, attributes) series of `metric`."""
        with self.lock:
            series: dict[tuple, ReceivedPoint] = {}
            for p in self.points:
                if p.metric == metric:
                    series[(p.service, tuple(sorted(p.attributes.items())))] = p
            return list(series.values())

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


def free_port_str() -> str:
    from shared.infra.process import free_port

    return str(free_port())

"""LLM gateway benchmark: `.venv/bin/python bench/gateway.py [--seconds 6] [--sequential 1000]`.

What is measured, in one run on one machine:

- the full Nexus path: `POST /v1/chat/completions` (OpenAI format) with `X-Nexus-Session`
  naming a session that has a budget and an (inline) policy, so every step is recorded
  as an event: policy evaluation, budget reservation, the provider's call start and
  completion, the budget commit and the two conversation messages. The request goes
  HTTP -> orchestrator -> NATS -> provider -> upstream and back;
- the baseline: the same request sent straight to the upstream.

The upstream is the fake OpenAI-compatible server (`tests/fake_upstream.py`) as its own
process, with 0 ms token delay and an 8-token reply. NATS, Postgres (fsync on, as in
production), the orchestrator and the provider are started by this script as real
processes; everything listens on 127.0.0.1.

Cases: non-streaming and streaming (short reply), sequentially (one client) and with 16
and 64 concurrent clients (closed loop, each client its own keep-alive connection and,
on the Nexus side, its own session) for a bounded time. Printed: latency p50/p95/p99 of
both paths, the added latency (Nexus minus direct at the same percentile), time to the
first token for streams, throughput and the ratios; the events recorded per call and the
Postgres writing transactions per call (transaction ids); and the CPU each process spent per
request (/proc schedstat), which shows where the time goes on a small machine.

The load generator is a minimal HTTP/1.1 keep-alive client on raw asyncio streams
(uvloop when installed): `httpx.AsyncClient` is too slow a client for this.

Also measured: sessions created per second over HTTP (`POST /v1/sessions` with a budget
and a policy, 16 clients), and the CPU per call of all server processes together
(orchestrator, provider, Postgres, NATS), from which scaling out is projected.

Timings are printed, never asserted. Goals (issue 16, the hot path), each printed as met
or missed: added latency p50 <= 1 ms and p99 <= 5 ms sequential, non-streaming and to
the first streamed token; >= 1,500 calls/s at 64 clients with 0 errors; >= 1,000
sessions/s. `--seconds`, `--sequential`: a shorter run on a busy machine. The sequential
cases make 1,000 calls each, so a p99 is the tenth slowest call, not the second (over
200 calls one slow call moved it by 2 to 4 ms between runs).

`--traced`: the services export their traces and metrics over OTLP/HTTP to a collector
stand-in (its own process: it reads each request and answers 200, as a collector does
before its pipeline), so every span is recorded, encoded and sent, as in a deployment
with Grafana; its CPU is printed as `collector`. Without it nothing receives a span and
the services record none (`shared/infra/tracing.py`): the cost of tracing is the
difference between the two runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import httpx  # noqa: E402
import psutil  # noqa: E402

from shared.infra import EmbeddedNats, EmbeddedPostgres, free_port  # noqa: E402
from shared.infra.migrate import migrate  # noqa: E402
from tests.fake_upstream import FakeUpstreamProcess  # noqa: E402
from tests.support import ServiceProc, service_env, wait_http_ok, wait_until  # noqa: E402

UPSTREAM_KEY = "sk-bench-upstream-0123456789abcdefghij"
REPLY_TOKENS = 8
MAX_TOKENS = 16          # above the reply: the fake answers all 8 tokens, finish "stop"
LEVELS = (16, 64)
WARMUP_S = 1.0
MAX_PER_WINDOW = 200_000  # a bound on requests per timed window, besides its time
GOAL_ADDED_P50_MS = 1.0    # issue 16: sequential, non-streaming and first token
GOAL_ADDED_P99_MS = 5.0
GOAL_CALLS_PER_S = 1500.0  # at 64 clients, 0 errors
GOAL_SESSIONS_PER_S = 1000.0
SERVERS = ("orchestrator", "provider", "postgres", "nats")  # what a call costs the platform
# A minimal policy: evaluated on every call (PolicyEvaluated is appended), allows it.
POLICY_RULES = {"max_tokens_per_call": 4096}
MARKER = b"tok0"          # the first token of every fake reply


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


# -- a light HTTP/1.1 client ---------------------------------------------------------------


class HttpError(Exception):
    pass


@dataclass
class Reply:
    status: int
    body: bytes
    total_s: float
    first_token_s: float | None  # when MARKER was first seen (streams: the first token)


class HttpConn:
    """One HTTP/1.1 keep-alive connection on asyncio streams (Content-Length or chunked).

    Cheap per request, so the client takes little CPU from the servers it measures.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._host = f"Host: {host}:{port}\r\n".encode()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, method: str, path: str, head: bytes, body: bytes, *,
                      timeout: float = 60.0) -> Reply:
        if self.reader is None or self.reader.at_eof():
            self.close()
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port,
                                                                     limit=1 << 20)
        reader, writer = self.reader, self.writer
        assert writer is not None
        started = time.perf_counter()
        first: float | None = None
        try:
            async with asyncio.timeout(timeout):
                writer.write(b"%s %s HTTP/1.1\r\n%s%sContent-Length: %d\r\n\r\n%s" % (
                    method.encode(), path.encode(), self._host, head, len(body), body))
                raw = await reader.readuntil(b"\r\n\r\n")
                lines = raw.split(b"\r\n")
                status = int(lines[0].split(b" ", 2)[1])
                length, chunked, close = None, False, False
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"transfer-encoding":
                        chunked = b"chunked" in value.lower()
                    elif name == b"connection":
                        close = b"close" in value.lower()
                if chunked:
                    parts = []
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                        if size == 0:
                            while await reader.readuntil(b"\r\n") != b"\r\n":
                                pass  # trailers
                            break
                        data = (await reader.readexactly(size + 2))[:-2]
                        if first is None and MARKER in data:
                            first = time.perf_counter()
                        parts.append(data)
                    payload = b"".join(parts)
                elif length is not None:
                    payload = await reader.readexactly(length)
                else:
                    payload = await reader.read()
                    close = True
        except BaseException:
            self.close()
            raise
        done = time.perf_counter()
        if close:
            self.close()
        if first is None and MARKER in payload:
            first = done
        return Reply(status, payload, done - started,
                     first - started if first is not None else None)


# -- the platform ------------------------------------------------------------------------


def providers_toml(base_url: str, max_concurrency: int, max_queue: int) -> str:
    return f"""
[retry]
max_attempts = 2
base_delay_s = 0.05
max_delay_s = 0.3
first_token_timeout_s = 30

[[providers]]
name = "fake"
kind = "openai"
base_url = "{base_url}"
api_key_env = "BENCH_UPSTREAM_KEY"
timeout_s = 60
max_concurrency = {max_concurrency}
max_queue = {max_queue}
[[providers.models]]
name = "fake-small"
input_usd_per_mtok = 1.0
output_usd_per_mtok = 2.0
context = 8192

[[routes]]
model = "default"
targets = ["fake/fake-small"]
"""


_COLLECTOR = r"""
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


class Platform:
    """NATS, Postgres, the fake upstream (own process), `replicas` providers and
    orchestrators (one of each by default; `port` is the first orchestrator's, `ports`
    all of them)."""

    def __init__(self, tmp: Path, *, delay_ms: float = 0.0, reply_tokens: int = REPLY_TOKENS,
                 max_concurrency: int = 128, max_queue: int = 1024, replicas: int = 1,
                 traced: bool = False, **env: str) -> None:
        self.tmp = tmp
        self.traced = traced
        self.collector: subprocess.Popen[str] | None = None  # with `traced`
        self.replicas = replicas
        self.extra: list[ServiceProc] = []  # the second and further replicas
        self.ports: list[int] = []
        self.delay_ms = delay_ms
        self.reply_tokens = reply_tokens
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.extra_env = env
        self.admin_key = f"admin-{uuid.uuid4().hex}"
        self.nats: EmbeddedNats | None = None
        self.pg: EmbeddedPostgres | None = None
        self.fake: FakeUpstreamProcess | None = None
        self.provider: ServiceProc | None = None
        self.orchestrator: ServiceProc | None = None
        self.port = 0
        self.database_url = ""

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}

    def start(self) -> Platform:
        self.nats = EmbeddedNats(self.tmp / "nats")
        self.pg = EmbeddedPostgres(self.tmp / "pg")
        self.nats.start()
        self.pg.start()
        self.database_url = self.pg.url()
        migrate(self.database_url)
        self.fake = FakeUpstreamProcess(delay_ms=self.delay_ms, reply_tokens=self.reply_tokens,
                                        models=("fake-small",), api_key=UPSTREAM_KEY).start()
        self.port = free_port()
        if self.traced:
            self.collector = subprocess.Popen([sys.executable, "-c", _COLLECTOR],
                                              stdout=subprocess.PIPE, text=True)
            assert self.collector.stdout is not None
            port = self.collector.stdout.readline().strip()
            self.extra_env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                              **self.extra_env}
        env = service_env(
            self.nats.url, self.database_url, NEXUS_ADMIN_KEY=self.admin_key,
            NEXUS_PROVIDERS=providers_toml(self.fake.url + "/v1", self.max_concurrency,
                                           self.max_queue),
            BENCH_UPSTREAM_KEY=UPSTREAM_KEY, NEXUS_LOG_LEVEL="WARNING",
            NEXUS_HTTP_PORT=str(self.port), **self.extra_env)
        self.provider = ServiceProc("provider", {**env, "NEXUS_INSTANCE_ID": "bench-provider"},
                                    self.tmp / "provider.log").start()
        self.orchestrator = ServiceProc("orchestrator",
                                        {**env, "NEXUS_INSTANCE_ID": "bench-orchestrator"},
                                        self.tmp / "orchestrator.log").start()
        self.ports = [self.port]
        for i in range(2, self.replicas + 1):
            port = free_port()
            self.extra.append(ServiceProc(
                "provider", {**env, "NEXUS_INSTANCE_ID": f"bench-provider-{i}"},
                self.tmp / f"provider-{i}.log").start())
            self.extra.append(ServiceProc(
                "orchestrator", {**env, "NEXUS_INSTANCE_ID": f"bench-orchestrator-{i}",
                                 "NEXUS_HTTP_PORT": str(port)},
                self.tmp / f"orchestrator-{i}.log").start())
            self.ports.append(port)
        for port in self.ports:  # a busy machine: services start slowly
            wait_http_ok(f"http://127.0.0.1:{port}/health", 180)

        def models_ready() -> bool:
            if self.provider is not None and self.provider.proc.poll() is not None:
                raise AssertionError(f"provider exited:\n{self.provider.log()[-3000:]}")
            r = httpx.get(f"{self.api}/v1/models", headers=self.admin, timeout=10)
            return r.status_code == 200 and any(m["id"] == "default" for m in r.json()["data"])

        wait_until(models_ready, 60, 0.2, "the provider to serve models")
        return self

    def tenant_key(self, tenant: str) -> str:
        r = httpx.post(f"{self.api}/v1/keys", headers=self.admin, timeout=10,
                       json={"name": "bench", "role": "admin", "tenant": tenant})
        assert r.status_code == 201, r.text
        key = r.json()["key"]
        time.sleep(0.3)  # the key works once the api_keys projection has folded it
        for _ in range(4):  # (an unknown key is cached as unknown for 5 s)
            if httpx.get(f"{self.api}/v1/sessions", headers={"Authorization": f"Bearer {key}"},
                         params={"limit": 1}, timeout=10).status_code == 200:
                return key
            time.sleep(5.2)
        raise AssertionError("the new tenant key never worked")

    def processes(self) -> dict[str, Callable[[], list[psutil.Process]]]:
        """Process groups whose CPU time is reported (Postgres: the postmaster and its children)."""
        def one(pid: int) -> Callable[[], list[psutil.Process]]:
            proc = psutil.Process(pid)
            return lambda: [proc]

        def tree(pid: int) -> Callable[[], list[psutil.Process]]:
            proc = psutil.Process(pid)
            return lambda: [proc, *proc.children(recursive=True)]

        def of(kind: str, first: ServiceProc) -> Callable[[], list[psutil.Process]]:
            procs = [psutil.Process(p.proc.pid) for p in (first, *self.extra) if p.name == kind]
            return lambda: procs

        assert self.orchestrator and self.provider and self.nats and self.pg and self.fake
        return {"orchestrator": of("orchestrator", self.orchestrator),
                "provider": of("provider", self.provider),
                "postgres": tree(self.pg.proc.pid), "nats": one(self.nats.proc.pid),
                "upstream": one(self.fake.proc.pid), "client": one(os.getpid()),
                **({"collector": one(self.collector.pid)} if self.collector else {})}

    def stop(self) -> None:
        for proc in (self.orchestrator, self.provider, *self.extra):
            if proc is not None and proc.proc is not None and proc.proc.poll() is None:
                try:
                    proc.stop()
                except AssertionError:
                    pass
        if self.fake is not None:
            self.fake.stop()
        if self.collector is not None:
            self.collector.kill()
            self.collector.wait()
        if self.nats is not None:
            self.nats.stop()
        if self.pg is not None:
            self.pg.stop()


def cpu_seconds(proc: psutil.Process) -> float:
    """CPU time of a process, all threads: /proc/<pid>/task/*/schedstat (ns) on Linux,
    psutil's tick-grained user + system elsewhere."""
    try:
        total = 0
        for task in os.scandir(f"/proc/{proc.pid}/task"):
            with open(f"{task.path}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        try:
            t = proc.cpu_times()
            return t.user + t.system
        except psutil.Error:
            return 0.0


class CpuMeter:
    """CPU seconds per process group, between `start` and `stop`."""

    def __init__(self, groups: dict[str, Callable[[], list[psutil.Process]]]) -> None:
        self.groups = groups

    def _sample(self) -> dict[int, float]:
        return {p.pid: cpu_seconds(p) for procs in self.groups.values() for p in procs()}

    def start(self) -> None:
        self._s0 = self._sample()

    def stop(self) -> dict[str, float]:
        s1 = self._sample()
        out = {}
        for name, procs in self.groups.items():
            # a process that appeared in the window counts from zero; one that left, not at all
            out[name] = sum(s1.get(p.pid, 0.0) - self._s0.get(p.pid, 0.0) for p in procs())
        return out


# -- what a client sends -----------------------------------------------------------------


@dataclass
class Target:
    name: str
    host: str
    port: int
    model: str
    heads: list[bytes]  # one per client (the Nexus side: its own session)
    ports: tuple[int, ...] = ()  # several orchestrators: client w talks to ports[w % n]

    def port_of(self, w: int) -> int:
        return self.ports[w % len(self.ports)] if self.ports else self.port

    def body(self, stream: bool) -> bytes:
        return json.dumps({"model": self.model, "stream": stream, "max_tokens": MAX_TOKENS,
                           "messages": [{"role": "user", "content": "hello there"}]}).encode()

    @staticmethod
    def ok(reply: Reply, stream: bool) -> bool:
        if reply.status != 200:
            return False
        return b"[DONE]" in reply.body if stream else b"tok7" in reply.body


@dataclass
class Sample:
    total_ms: list[float] = field(default_factory=list)
    first_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    warmup_calls: int = 0  # made before the measured ones (not in `total_ms`)

    @property
    def rate(self) -> float:
        return len(self.total_ms) / self.seconds if self.seconds else float("nan")


async def call(conn: HttpConn, target: Target, head: bytes, body: bytes, stream: bool,
               sample: Sample | None) -> None:
    try:
        reply = await conn.request("POST", "/v1/chat/completions", head, body)
    except Exception as exc:  # noqa: BLE001 - counted, the run goes on
        if sample is not None:
            sample.errors.append(f"{type(exc).__name__}: {exc}"[:200])
        await asyncio.sleep(0.05)
        return
    if sample is None:
        return
    if Target.ok(reply, stream):
        sample.total_ms.append(reply.total_s * 1000)
        if reply.first_token_s is not None:
            sample.first_ms.append(reply.first_token_s * 1000)
    else:
        sample.errors.append(f"{reply.status}: {reply.body[:200]!r}")


async def sequential(targets: list[Target], count: int, stream: bool, meter: CpuMeter,
                     block: int = 25) -> list[Sample]:
    """`count` calls per target, one at a time, the targets taking turns in blocks."""
    samples = [Sample() for _ in targets]
    conns = [HttpConn(t.host, t.port) for t in targets]
    bodies = [t.body(stream) for t in targets]
    try:
        for i, t in enumerate(targets):  # warm-up, as long as a concurrent case's
            until = time.perf_counter() + WARMUP_S
            while time.perf_counter() < until:
                await call(conns[i], t, t.heads[0], bodies[i], stream, None)
                samples[i].warmup_calls += 1
        for _ in range(max(1, count // block)):
            for i, t in enumerate(targets):
                meter.start()
                t0 = time.perf_counter()
                for _ in range(block):
                    await call(conns[i], t, t.heads[0], bodies[i], stream, samples[i])
                samples[i].seconds += time.perf_counter() - t0
                cpu = meter.stop()
                for k, v in cpu.items():
                    samples[i].cpu[k] = samples[i].cpu.get(k, 0.0) + v
    finally:
        for c in conns:
            c.close()
    return samples


async def closed_loop(target: Target, clients: int, seconds: float, stream: bool,
                      meter: CpuMeter) -> Sample:
    """`clients` clients call back to back; what completes inside the window is counted."""
    sample = Sample()
    state = {"measuring": False, "stop": False, "n": 0}
    body = target.body(stream)

    async def client(w: int) -> None:
        conn = HttpConn(target.host, target.port_of(w))
        head = target.heads[w % len(target.heads)]
        try:
            while not state["stop"] and state["n"] < MAX_PER_WINDOW:
                await call(conn, target, head, body, stream,
                           sample if state["measuring"] else None)
                state["n"] += 1
        finally:
            conn.close()

    tasks = [asyncio.create_task(client(w)) for w in range(clients)]
    await asyncio.sleep(WARMUP_S)
    state["measuring"] = True
    meter.start()
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    state["measuring"] = False
    sample.seconds = time.perf_counter() - t0
    sample.cpu = meter.stop()
    state["stop"] = True
    _, pending = await asyncio.wait(tasks, timeout=30)
    for t in pending:
        t.cancel()
    return sample


# -- report ------------------------------------------------------------------------------


def row(label: str, nexus: list[float], direct: list[float], n_rate: float | None,
        d_rate: float | None) -> str:
    qs = (.5, .95, .99)
    n = [pct(nexus, q) for q in qs]
    d = [pct(direct, q) for q in qs]
    add = [a - b for a, b in zip(n, d)]
    rates = ""
    if n_rate is not None and d_rate is not None:
        rates = f"  {n_rate:>7,.0f} {d_rate:>7,.0f} {n_rate / d_rate:>5.2f}x"
    return (f"{label:<29}" + "".join(f"{v:>8.1f}" for v in n) + "  "
            + "".join(f"{v:>6.2f}" for v in d) + "  " + "".join(f"{v:>+8.1f}" for v in add)
            + rates)


def cpu_line(sample: Sample) -> str:
    n = len(sample.total_ms)
    if not n:
        return "no request completed"
    parts = [f"{k} {v * 1000 / n:.2f}" for k, v in sample.cpu.items()]
    busy = sum(sample.cpu.values()) / sample.seconds if sample.seconds else 0
    return ", ".join(parts) + f"  (these processes: {busy:.2f} cores busy)"


async def events_per_call(database_url: str, session_id: str, calls: int) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT type, count(*) AS n FROM events WHERE metadata ->> 'correlation_id' = $1"
            " AND type NOT IN ('SessionStarted', 'BudgetOpened') GROUP BY type ORDER BY 2 DESC, 1",
            session_id)
    finally:
        await conn.close()
    total = sum(r["n"] for r in rows)
    return (f"{total / calls:.1f} events per call: "
            + ", ".join(f"{r['type']} {r['n'] / calls:g}" for r in rows))


async def _xid(conn: asyncpg.Connection) -> int:
    """The next transaction id (this probe takes one)."""
    return int(await conn.fetchval("SELECT pg_current_xact_id()::text"))


async def db_work_per_call(platform: Platform, target: Target, calls: int = 50) -> str:
    """Write transactions per Nexus call (sequential calls; idle background subtracted).

    Counted by transaction ids, which Postgres assigns to every transaction and
    subtransaction that writes, at once (the statistics views are flushed by each backend
    about once a second, or only after it has been idle a while: too late to count a
    short window); the probes' own ids are taken off."""
    conn = await asyncpg.connect(platform.database_url)
    http = HttpConn(target.host, target.port)
    body = target.body(False)
    try:
        await asyncio.sleep(1.0)
        x0, t0 = await _xid(conn), time.perf_counter()
        await asyncio.sleep(2.0)
        x1, t1 = await _xid(conn), time.perf_counter()
        idle_s = (x1 - x0 - 1) / (t1 - t0)
        c0, t0 = await _xid(conn), time.perf_counter()
        for _ in range(calls):
            await http.request("POST", "/v1/chat/completions", target.heads[0], body)
        await asyncio.sleep(0.5)
        c1, t1 = await _xid(conn), time.perf_counter()
    finally:
        http.close()
        await conn.close()
    per = (c1 - c0 - 1 - idle_s * (t1 - t0)) / calls
    return (f"Postgres work per Nexus call: {per:.1f} writing transactions (transaction ids: "
            f"every transaction or subtransaction that writes: appends, projection steps, "
            f"the atomic groups of a batched append); idle background: {idle_s:.1f}/s")


def server_cpu_ms(sample: Sample) -> float:
    """CPU ms per completed call of the platform's processes together (not the client,
    not the upstream)."""
    n = len(sample.total_ms)
    return sum(sample.cpu.get(k, 0.0) for k in SERVERS) * 1000 / n if n else float("nan")


async def session_rate(platform: Platform, key: str, clients: int, seconds: float,
                       meter: CpuMeter) -> Sample:
    """Sessions created per second over HTTP, each with a budget and a policy."""
    head = (f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n").encode()
    body = json.dumps({"budget": {"limit_usd": 5}, "policy_rules": POLICY_RULES}).encode()
    sample = Sample()
    state = {"measuring": False, "stop": False}

    async def client(w: int) -> None:
        conn = HttpConn("127.0.0.1", platform.ports[w % len(platform.ports)])
        try:
            while not state["stop"]:
                try:
                    reply = await conn.request("POST", "/v1/sessions", head, body)
                except Exception as exc:  # noqa: BLE001 - counted
                    if state["measuring"]:
                        sample.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    await asyncio.sleep(0.05)
                    continue
                if not state["measuring"]:
                    continue
                if reply.status == 201:
                    sample.total_ms.append(reply.total_s * 1000)
                else:
                    sample.errors.append(f"{reply.status}: {reply.body[:200]!r}")
        finally:
            conn.close()

    tasks = [asyncio.create_task(client(w)) for w in range(clients)]
    await asyncio.sleep(WARMUP_S)
    state["measuring"] = True
    meter.start()
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    state["measuring"] = False
    sample.seconds = time.perf_counter() - t0
    sample.cpu = meter.stop()
    state["stop"] = True
    _, pending = await asyncio.wait(tasks, timeout=30)
    for t in pending:
        t.cancel()
    return sample


def goal(label: str, measured: float, target: float, unit: str, *, at_most: bool) -> str:
    met = measured <= target if at_most else measured >= target
    sign = "<=" if at_most else ">="
    return (f"  {label:<52} {measured:>9.2f} {unit:<8} goal {sign} {target:g} {unit}: "
            f"{'met' if met else 'MISSED'}\n")


async def run(platform: Platform, seconds: float, count: int) -> None:
    started = time.perf_counter()
    load0 = os.getloadavg()[0]
    key = platform.tenant_key("bench")
    async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {key}"}) as http:
        sessions = []
        for _ in range(max(LEVELS)):
            r = await http.post(f"{platform.api}/v1/sessions",
                                json={"budget": {"limit_usd": 1000}, "policy_rules": POLICY_RULES})
            assert r.status_code == 201, r.text
            sessions.append(r.json()["session_id"])
    assert platform.fake is not None
    nexus = Target("nexus", "127.0.0.1", platform.port, "default",
                   [f"Authorization: Bearer {key}\r\nX-Nexus-Session: {s}\r\n"
                    "Content-Type: application/json\r\n".encode() for s in sessions],
                   ports=tuple(platform.ports))
    direct = Target("direct", "127.0.0.1", platform.fake.port, "fake-small",
                    [f"Authorization: Bearer {UPSTREAM_KEY}\r\n"
                     "Content-Type: application/json\r\n".encode()])
    meter = CpuMeter(platform.processes())

    seq = {}
    for stream in (False, True):
        seq[stream] = await sequential([nexus, direct], count, stream, meter)
    calls_on_s0 = sum(len(n.total_ms) + n.warmup_calls for n, _ in seq.values())
    events_line = await events_per_call(platform.database_url, sessions[0], calls_on_s0)
    db_line = await db_work_per_call(platform, nexus)

    conc: dict[tuple[bool, int], tuple[Sample, Sample]] = {}
    for stream in (False, True):
        for level in LEVELS:
            n = await closed_loop(nexus, level, seconds, stream, meter)
            d = await closed_loop(direct, level, seconds, stream, meter)
            conc[(stream, level)] = (n, d)
    created = await session_rate(platform, key, 16, seconds, meter)

    w = sys.stdout.write
    w("\ngateway benchmark: Nexus path (HTTP -> orchestrator -> NATS -> provider -> upstream) "
      "vs the same request straight to the upstream\n")
    w(f"{platform.replicas} orchestrator(s) and {platform.replicas} provider(s)"
      " (concurrent clients spread over the orchestrators; sequential calls use the first)\n")
    w(f"upstream: fake OpenAI-compatible server, own process, 0 ms token delay, "
      f"{REPLY_TOKENS}-token reply; Nexus sessions with a budget and an inline policy; "
      f"{os.cpu_count()} CPUs shared by client, orchestrator, provider, NATS, Postgres, upstream\n")
    w(f"Nexus recorded {events_line}\n")
    w(f"{db_line}\n\n")
    w(f"{'':<29}{'nexus ms':^24}  {'direct ms':^18}  {'added ms (nexus - direct)':^24}"
      f"  {'requests/s':^23}\n")
    w(f"{'case':<29}" + "     p50     p95     p99" + "   p50   p95   p99"
      + "     p50     p95     p99" + "    nexus  direct ratio\n")
    for stream in (False, True):
        kind = "stream" if stream else "non-stream"
        n, d = seq[stream]
        w(row(f"{kind}, sequential ({len(n.total_ms)})", n.total_ms, d.total_ms, n.rate, d.rate)
          + "\n")
        if stream:
            w(row("  first token", n.first_ms, d.first_ms, None, None) + "\n")
        for level in LEVELS:
            n, d = conc[(stream, level)]
            w(row(f"{kind}, {level} clients", n.total_ms, d.total_ms, n.rate, d.rate) + "\n")
            if stream:
                w(row("  first token", n.first_ms, d.first_ms, None, None) + "\n")
    w("\nwhere the CPU goes (CPU ms per request completed; client = this process):\n")
    for stream in (False, True):
        kind = "stream" if stream else "non-stream"
        w(f"  {kind + ', sequential':<24} nexus  {cpu_line(seq[stream][0])}\n")
        n, d = conc[(stream, max(LEVELS))]
        w(f"  {kind + f', {max(LEVELS)} clients':<24} nexus  {cpu_line(n)}\n")
        w(f"  {'':<24} direct {cpu_line(d)}\n")
    errors = [(f"{'stream' if s else 'non-stream'} {name}", smp.errors)
              for (s, lvl), pair in conc.items() for name, smp in zip(("nexus", "direct"), pair)]
    errors += [(f"sequential {'stream' if s else 'non-stream'} {name}", smp.errors)
               for s, pair in seq.items() for name, smp in zip(("nexus", "direct"), pair)]
    failed = [(label, errs) for label, errs in errors if errs]
    if failed:
        w("\nerrors:\n")
        for label, errs in failed:
            w(f"  {label}: {len(errs)}, first: {errs[0]}\n")
    w(f"\nsessions created over HTTP (budget + policy, 16 clients): {created.rate:,.0f}/s, "
      f"p50 {pct(created.total_ms, .5):.1f} ms, p99 {pct(created.total_ms, .99):.1f} ms, "
      f"{len(created.errors)} errors; server CPU {server_cpu_ms(created):.2f} ms per session\n")
    n64, _ = conc[(False, max(LEVELS))]
    cpu_call = server_cpu_ms(n64)
    w(f"CPU per call, all server processes ({', '.join(SERVERS)}), non-streaming at "
      f"{max(LEVELS)} clients: {cpu_call:.2f} ms -> at most {1000 / cpu_call:,.0f} calls/s per "
      f"core; on 16 cores, if throughput scales with processes (more orchestrators and "
      f"providers; Postgres's share does not shard): {16 * 1000 / cpu_call:,.0f} calls/s\n")

    def added(stream: bool, q: float, first: bool = False) -> float:
        n, d = seq[stream]
        if first:
            return pct(n.first_ms, q) - pct(d.first_ms, q)
        return pct(n.total_ms, q) - pct(d.total_ms, q)

    errors64 = len(n64.errors)
    w("\ngoals (issue 16), on this machine with everything on it:\n")
    w(goal("added latency p50, sequential, non-streaming", added(False, .5),
           GOAL_ADDED_P50_MS, "ms", at_most=True))
    w(goal("added latency p99, sequential, non-streaming", added(False, .99),
           GOAL_ADDED_P99_MS, "ms", at_most=True))
    w(goal("added time to first token p50, sequential", added(True, .5, True),
           GOAL_ADDED_P50_MS, "ms", at_most=True))
    w(goal("added time to first token p99, sequential", added(True, .99, True),
           GOAL_ADDED_P99_MS, "ms", at_most=True))
    w(goal(f"calls/s at {max(LEVELS)} clients ({errors64} errors)",
           n64.rate if not errors64 else 0.0, GOAL_CALLS_PER_S, "calls/s", at_most=False))
    w(goal("sessions created/s (budget + policy)",
           created.rate if not created.errors else 0.0, GOAL_SESSIONS_PER_S, "/s",
           at_most=False))
    w(f"{seconds:g} s per concurrent case, {WARMUP_S:g} s warm-up before each case "
      f"(the sequential ones too); run took "
      f"{time.perf_counter() - started:.1f} s; load average (1 min) at the start {load0:.2f}, "
      f"at the end {os.getloadavg()[0]:.2f} (other work shares this machine)\n")


def raise_fd_limit(wanted: int = 16384) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def run_async(coro) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=6, help="per concurrent case")
    parser.add_argument("--sequential", type=int, default=1000, help="calls per sequential case")
    parser.add_argument("--replicas", type=int, default=1,
                        help="orchestrators and providers (clients spread over the orchestrators)")
    parser.add_argument("--lease-calls", type=int, default=None,
                        help="NEXUS_BUDGET_LEASE_CALLS for the orchestrators (budget leases; "
                             "unset: the platform's default)")
    parser.add_argument("--env", action="append", default=[], metavar="NEXUS_X=VALUE",
                        help="a setting for the services (repeatable): A/B a knob in one run each")
    parser.add_argument("--traced", action="store_true",
                        help="export traces and metrics over OTLP to a collector stand-in")
    args = parser.parse_args()
    raise_fd_limit()
    tmp = Path(tempfile.mkdtemp(prefix="nexus-bench-gateway-"))
    env = dict(item.split("=", 1) for item in args.env)
    if args.lease_calls is not None:
        env["NEXUS_BUDGET_LEASE_CALLS"] = str(args.lease_calls)
    platform = Platform(tmp, replicas=args.replicas, traced=args.traced, **env)
    try:
        t = time.perf_counter()
        platform.start()
        settings = ", ".join(f"{k}={v}" for k, v in sorted(env.items())) or "all defaults"
        if args.traced:
            settings += "; traces and metrics exported over OTLP"
        sys.stdout.write(f"platform up in {time.perf_counter() - t:.1f} s ({tmp}); "
                         f"settings: {settings}\n")
        sys.stdout.flush()
        run_async(run(platform, args.seconds, args.sequential))
    finally:
        platform.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

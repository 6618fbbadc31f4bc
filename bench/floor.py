"""The floor of the call path: `.venv/bin/python bench/floor.py [--seconds 4] [--sequential 200]`.

What the least possible Python implementation of Nexus's call path costs, measured on
this machine side by side with the direct upstream, so that `bench/gateway.py`'s figures
(and issue 16's goals) can be read against what the architecture itself must spend.

The floor keeps only what the design card makes unavoidable for a call:

- an HTTP edge in Python: a raw ASGI app under uvicorn (httptools, uvloop), with no
  framework, authentication, validation, tracing or logging;
- one hop over NATS to another Python process and one back (services talk only through
  NATS): a plain request/reply with nats-py;
- that process calls the upstream with Nexus's own HTTP/1.1 client and replies with the
  body as it is;
- one durable write before the answer (every acknowledged call is recorded): a single
  INSERT of one jsonb row, committed with fsync, as its own transaction.

No budget, policy, session, event fold or projection: each is work the real path adds on
top of this. "floor, no write" drops the durable write too, which is also the floor of
the time to the first streamed token (the first token waits for no write). Everything
(client, edge, relay, NATS, Postgres, upstream) shares this machine's CPUs, as in
`bench/gateway.py`, whose load generator, CPU meter and report rows are reused here.

Printed: latency p50/p95/p99 of the floor and of the direct call, the added latency, the
throughput and its ratio at 16 and 64 clients, the CPU per call of each process, and
issue 16's goals as the floor meets or misses them. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import httpx  # noqa: E402
import psutil  # noqa: E402

from bench.gateway import (  # noqa: E402
    GOAL_ADDED_P50_MS,
    GOAL_ADDED_P99_MS,
    GOAL_CALLS_PER_S,
    LEVELS,
    UPSTREAM_KEY,
    CpuMeter,
    Sample,
    Target,
    closed_loop,
    cpu_line,
    goal,
    pct,
    raise_fd_limit,
    row,
    run_async,
    sequential,
)
from shared.infra import EmbeddedNats, EmbeddedPostgres, free_port  # noqa: E402
from shared.infra.migrate import migrate  # noqa: E402
from shared.infra.process import stop_processes  # noqa: E402
from tests.fake_upstream import FakeUpstreamProcess  # noqa: E402
from tests.support import wait_http_ok, wait_until  # noqa: E402

SUBJECT = "floor.call"
NO_WRITE = b"x-floor-write"  # a request with this header (any value) skips the write
TABLE_SQL = ("CREATE TABLE IF NOT EXISTS floor_calls"
             " (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(), data jsonb NOT NULL)")
INSERT_SQL = "INSERT INTO floor_calls (data) VALUES ($1::jsonb)"
SERVERS = ("edge", "relay", "postgres", "nats")


# -- the two processes of the floor --------------------------------------------------------


def edge_app(nats_url: str, database_url: str) -> Any:
    """A raw ASGI app: body in, NATS request, one committed INSERT, the reply out."""
    import nats

    state: dict[str, Any] = {}

    async def lifespan(receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                state["nc"] = await nats.connect(nats_url)
                state["db"] = await asyncpg.create_pool(database_url, min_size=4, max_size=32)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await state["nc"].close()
                await state["db"].close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if scope["path"] == "/health":
            answer = b"{}"
        else:
            reply = await state["nc"].request(SUBJECT, body, timeout=30)
            answer = reply.data
            if not any(name == NO_WRITE for name, _ in scope["headers"]):
                async with state["db"].acquire() as conn:  # its own transaction: one commit
                    await conn.execute(INSERT_SQL, f'{{"request": {len(body)}, '
                                                   f'"answer": {len(answer)}}}')
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer})

    return app


async def relay(nats_url: str, upstream: str) -> None:
    """Each NATS request: POST its body to the upstream, reply with the answer's body."""
    import nats

    from shared.infra.upstreams.http import Pool

    nc = await nats.connect(nats_url)
    pool = Pool(upstream, max_connections=128)
    headers = {"Authorization": f"Bearer {UPSTREAM_KEY}", "Content-Type": "application/json"}

    async def handle(msg: Any) -> None:
        async with await pool.request("POST", "/chat/completions", msg.data, headers) as response:
            body = await response.read()
        await msg.respond(body)

    async def dispatch(msg: Any) -> None:  # nats-py awaits a callback before the next message
        asyncio.get_running_loop().create_task(handle(msg))

    await nc.subscribe(SUBJECT, queue="relay", cb=dispatch)
    await asyncio.Event().wait()


def serve(role: str, port: int, nats_url: str, database_url: str, upstream: str) -> None:
    if role == "edge":
        import uvicorn

        uvicorn.Server(uvicorn.Config(edge_app(nats_url, database_url), host="127.0.0.1",
                                      port=port, loop="uvloop", http="httptools",
                                      lifespan="on", access_log=False,
                                      log_level="warning")).run()
    else:
        run_async(relay(nats_url, upstream))


# -- the measurement ---------------------------------------------------------------------


async def measure(edge_port: int, upstream_port: int, groups: dict[str, Any], seconds: float,
                  count: int) -> None:
    started = time.perf_counter()
    load0 = os.getloadavg()[0]
    plain = b"Content-Type: application/json\r\n"
    floor = Target("floor", "127.0.0.1", edge_port, "fake-small", [plain])
    bare = Target("floor, no write", "127.0.0.1", edge_port, "fake-small",
                  [plain + NO_WRITE + b": 0\r\n"])
    direct = Target("direct", "127.0.0.1", upstream_port, "fake-small",
                    [f"Authorization: Bearer {UPSTREAM_KEY}\r\n".encode() + plain])
    meter = CpuMeter(groups)
    floor_seq, bare_seq, direct_seq = await sequential([floor, bare, direct], count, False, meter)
    conc: dict[int, tuple[Sample, Sample, Sample]] = {}
    for level in LEVELS:
        conc[level] = (await closed_loop(floor, level, seconds, False, meter),
                       await closed_loop(bare, level, seconds, False, meter),
                       await closed_loop(direct, level, seconds, False, meter))

    w = sys.stdout.write
    w("\nthe floor of the call path: raw ASGI edge -> NATS -> relay -> upstream, and one "
      "committed INSERT before the answer, vs the same request straight to the upstream\n")
    w(f"non-streaming, fake upstream (own process, 0 ms token delay); {os.cpu_count()} CPUs "
      "shared by client, edge, relay, NATS, Postgres, upstream\n\n")
    w(f"{'':<29}{'floor ms':^24}  {'direct ms':^18}  {'added ms (floor - direct)':^24}"
      f"  {'requests/s':^23}\n")
    w(f"{'case':<29}" + "     p50     p95     p99" + "   p50   p95   p99"
      + "     p50     p95     p99" + "    floor  direct ratio\n")
    for name, smp in (("floor", floor_seq), ("floor, no write", bare_seq)):
        w(row(f"{name}, sequential", smp.total_ms, direct_seq.total_ms, smp.rate,
              direct_seq.rate) + "\n")
    for level in LEVELS:
        f, b, d = conc[level]
        w(row(f"floor, {level} clients", f.total_ms, d.total_ms, f.rate, d.rate) + "\n")
        w(row(f"floor, no write, {level} clients", b.total_ms, d.total_ms, b.rate, d.rate)
          + "\n")
    w("\nwhere the CPU goes (CPU ms per request completed; client = this process):\n")
    w(f"  {'floor, sequential':<32} {cpu_line(floor_seq)}\n")
    top = max(LEVELS)
    for name, smp in zip(("floor", "floor, no write", "direct"), conc[top], strict=True):
        w(f"  {f'{name}, {top} clients':<32} {cpu_line(smp)}\n")
    f64 = conc[top][0]
    n = len(f64.total_ms)
    server_ms = sum(f64.cpu.get(k, 0.0) for k in SERVERS) * 1000 / n if n else float("nan")
    upstream_ms = f64.cpu.get("upstream", 0.0) * 1000 / n if n else float("nan")
    w(f"CPU per call of the floor's servers ({', '.join(SERVERS)}) at {top} clients: "
      f"{server_ms:.2f} ms, the upstream's {upstream_ms:.2f} ms: on {os.cpu_count()} cores, "
      f"at most {os.cpu_count() * 1000 / (server_ms + upstream_ms):,.0f} calls/s with the "
      "upstream on the same machine\n")

    def added(smp: Sample, q: float) -> float:
        return pct(smp.total_ms, q) - pct(direct_seq.total_ms, q)

    errors = len(f64.errors)
    w("\nissue 16's goals, as the floor itself meets them on this machine:\n")
    w(goal("floor added latency p50, sequential", added(floor_seq, .5),
           GOAL_ADDED_P50_MS, "ms", at_most=True))
    w(goal("floor added latency p99, sequential", added(floor_seq, .99),
           GOAL_ADDED_P99_MS, "ms", at_most=True))
    w(goal("floor without the write, p50 (first-token floor)", added(bare_seq, .5),
           GOAL_ADDED_P50_MS, "ms", at_most=True))
    w(goal(f"floor calls/s at {top} clients ({errors} errors)",
           f64.rate if not errors else 0.0, GOAL_CALLS_PER_S, "calls/s", at_most=False))
    cases = [("sequential", trio) for trio in ((floor_seq, bare_seq, direct_seq),)]
    cases += [(f"{level} clients", trio) for level, trio in conc.items()]
    for case, trio in cases:
        for name, smp in zip(("floor", "floor, no write", "direct"), trio, strict=True):
            if smp.errors:
                w(f"  errors ({name}, {case}): {len(smp.errors)}, first: {smp.errors[0]}\n")
    w(f"{seconds:g} s per concurrent case; run took {time.perf_counter() - started:.1f} s; "
      f"load average (1 min) at the start {load0:.2f}, at the end {os.getloadavg()[0]:.2f}\n")


def relayed(port: int) -> bool:
    """Whether a call goes through the whole floor (the relay has subscribed)."""
    reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=10,
                       headers={NO_WRITE.decode(): "0"},
                       json={"model": "fake-small", "messages": [{"role": "user", "content": "hi"}]})
    return reply.status_code == 200


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4, help="per concurrent case")
    parser.add_argument("--sequential", type=int, default=200, help="calls per sequential case")
    parser.add_argument("--role", choices=("edge", "relay"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--nats", default="", help=argparse.SUPPRESS)
    parser.add_argument("--database", default="", help=argparse.SUPPRESS)
    parser.add_argument("--upstream", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        serve(args.role, args.port, args.nats, args.database, args.upstream)
        return
    raise_fd_limit()
    tmp = Path(tempfile.mkdtemp(prefix="nexus-bench-floor-"))
    nats_server, pg = EmbeddedNats(tmp / "nats"), EmbeddedPostgres(tmp / "pg")
    procs: list[subprocess.Popen[bytes]] = []
    fake = None
    try:
        nats_server.start()
        pg.start()
        migrate(pg.url())  # creates the database (and Nexus's schema: the same conditions)

        async def create_table() -> None:
            conn = await asyncpg.connect(pg.url())
            try:
                await conn.execute(TABLE_SQL)
            finally:
                await conn.close()

        asyncio.run(create_table())
        fake = FakeUpstreamProcess(reply_tokens=8, models=("fake-small",),
                                   api_key=UPSTREAM_KEY).start()
        port = free_port()
        common = ["--nats", nats_server.url, "--database", pg.url(),
                  "--upstream", fake.url + "/v1"]
        for role in ("relay", "edge"):
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--role", role, "--port", str(port), *common],
                cwd=ROOT, stdout=subprocess.DEVNULL))
        wait_http_ok(f"http://127.0.0.1:{port}/health", 60)
        wait_until(lambda: relayed(port), 60, 0.1, "a call through the edge and the relay")
        relay_p, edge_p = (psutil.Process(p.pid) for p in procs)
        pg_p, nats_p = psutil.Process(pg.proc.pid), psutil.Process(nats_server.proc.pid)
        fake_p, me = psutil.Process(fake.proc.pid), psutil.Process(os.getpid())
        groups = {"edge": lambda: [edge_p], "relay": lambda: [relay_p],
                  "postgres": lambda: [pg_p, *pg_p.children(recursive=True)],
                  "nats": lambda: [nats_p], "upstream": lambda: [fake_p],
                  "client": lambda: [me]}
        run_async(measure(port, fake.port, groups, args.seconds, args.sequential))
    finally:
        stop_processes(procs)
        if fake is not None:
            fake.stop()
        nats_server.stop()
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

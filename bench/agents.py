"""Agent runs benchmark: `.venv/bin/python bench/agents.py [--steps 10] [--repeat 5]
[--concurrent 200] [--takeovers 8]`.

Starts its own platform: embedded NATS and Postgres, two orchestrators, a provider in
front of the instant scripted upstream of tests/fake_upstream.py (FAKE_AGENT), and a
node (the trivial tool is an HTTP tool to a local instant server; HTTP tools run on a
node, without a sandbox).

(a) overhead per step: a run of N steps (one trivial HTTP tool call each, then the
    answer) against the same N+1 LLM calls and N tool calls made directly through the
    API in the same run, alternating; printed: p50 of each, and the milliseconds the run
    loop adds per step (goal: <= 5 ms at p50);
(b) takeover: K runs held in a slow LLM call on one orchestrator, which is killed with
    SIGKILL; the time from the kill to each run's `RunResumed` (p50, goal <= 2 s);
(c) C runs started at once (one tool step each): how many finished, how many failed,
    and the wall time (goal: 200 without errors).

Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx

from shared.infra import EmbeddedPostgres
from shared.infra.migrate import migrate
from tests.llm_cluster import start_llm_cluster
from tests.support import ServiceProc, free_port_str, wait_until


class _Instant(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def p50(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--concurrent", type=int, default=200)
    ap.add_argument("--takeovers", type=int, default=8)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nexus-bench-agents-"))
    pg = EmbeddedPostgres(tmp / "pg", ephemeral=True)
    pg.start()
    db = pg.url("bench")
    migrate(db)
    cluster = start_llm_cluster(None, tmp, db, orchestrators=2, NEXUS_RUN_LEASE_S="1",
                                NEXUS_RUN_SCAN_S="0.1", NEXUS_ORCHESTRATOR_LOST_AFTER_S="1")
    env = {k: v for k, v in cluster.env.items() if k != "DATABASE_URL"}
    node = ServiceProc("node", {**env, "NEXUS_NODE_DATA_DIR": str(tmp / "node"),
                                "NEXUS_METRICS_PORT": free_port_str()}, tmp / "node.log").start()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Instant)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        api = cluster.api
        wait_until(lambda: any(n["status"] == "online" for n in httpx.get(
            f"{api}/v1/nodes", headers=cluster.admin).json()["nodes"]), 90, 0.2, "a node")
        key = cluster.tenant_key()
        port = server.server_address[1]
        assert httpx.post(f"{api}/v1/tools", headers=key, json={
            "name": "ping", "kind": "http", "effect": "idempotent",
            "parameters": {"type": "object", "properties": {"k": {"type": "string"}}},
            "http": {"method": "POST", "url_template": f"http://127.0.0.1:{port}/ping"}}
        ).status_code == 201
        md = ("---\nname: bench\ndescription: bench\ntools: [ping]\nmodel: default\n"
              "max_steps: 1000\n---\nBenchmark agent.\n")
        assert httpx.post(f"{api}/v1/agents", headers=key, json={"markdown": md}).status_code == 201
        client = httpx.Client(timeout=120, headers=key)

        def session() -> str:
            return client.post(f"{api}/v1/sessions",
                               json={"policy_rules": {"tools_allow": ["*"]}}).json()["session_id"]

        def script(n: int) -> str:
            return "go FAKE_AGENT=" + json.dumps(
                {"steps": [[{"name": "ping", "arguments": {"k": "x"}}]] * n, "answer": "done"})

        last_sid = [""]

        def run_once(n: int, api_url: str = api) -> tuple[float, str]:
            sid = last_sid[0] = session()
            t0 = time.perf_counter()
            run = client.post(f"{api_url}/v1/sessions/{sid}/runs",
                              json={"agent": "bench", "input": script(n)}).json()
            with client.stream("GET", f"{api_url}/v1/runs/{run['run_id']}/stream") as resp:
                for _ in resp.iter_lines():
                    pass
            elapsed = time.perf_counter() - t0
            return elapsed, client.get(f"{api_url}/v1/runs/{run['run_id']}").json()["status"]

        def direct_once(n: int) -> float:
            sid = session()
            tools = [{"type": "function", "function": {"name": "ping", "parameters": {
                "type": "object", "properties": {"k": {"type": "string"}}}}}]
            messages = [{"role": "user", "content": script(n)}]
            t0 = time.perf_counter()
            for i in range(n + 1):
                reply = client.post(f"{api}/v1/chat/completions", headers={"X-Nexus-Session": sid},
                                    json={"model": "default", "messages": messages,
                                          "tools": tools}).json()
                msg = reply["choices"][0]["message"]
                if i == n:
                    break
                client.post(f"{api}/v1/sessions/{sid}/tools/ping/invoke", json={"arguments": {"k": "x"}})
                messages = messages + [{"role": "assistant", "content": "",
                                        "tool_calls": msg["tool_calls"]},
                                       {"role": "tool", "tool_call_id": msg["tool_calls"][0]["id"],
                                        "content": '{"ok": true}'}]
            return time.perf_counter() - t0

        # (a) overhead per step
        runs, directs = [], []
        for _ in range(args.repeat):
            elapsed, status = run_once(args.steps)
            assert status == "finished", status
            runs.append(elapsed)
            directs.append(direct_once(args.steps))
        added = (p50(runs) - p50(directs)) / args.steps * 1000
        paired = p50([r - d for r, d in zip(runs, directs)]) / args.steps * 1000
        # transactions with the run's events (one recorded_at per transaction), and those
        # of them the call path does not make anyway (no LLM call, tool call or budget event)
        events = cluster.events(last_sid[0])
        appends = len({e.recorded_at for e in events if e.stream_id.startswith("run-")})
        own = len({e.recorded_at for e in events if e.stream_id.startswith("run-")}
                  - {e.recorded_at for e in events
                     if e.stream_id.startswith(("llmcall-", "toolcall-", "budget-"))})
        load = os.getloadavg()
        print(f"(a) {args.steps}-step run p50 {p50(runs) * 1000:.0f} ms vs the same calls made "
              f"directly p50 {p50(directs) * 1000:.0f} ms: ratio {p50(runs) / p50(directs):.2f}x, "
              f"{added:.1f} ms added per step (median of paired differences {paired:.1f} ms; "
              f"goal <= 5 ms); {appends} appends to the run's stream for {args.steps} steps, {own} "
              f"of them transactions of the run's own; "
              f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")

        # (b) takeover after kill -9 of the owner
        cluster.primary.configure(first_byte_delay_ms=4000)
        owner = cluster.apis[0]
        sids, run_ids = [], []
        for _ in range(args.takeovers):
            sid = session()
            sids.append(sid)
            run_ids.append(client.post(f"{owner}/v1/sessions/{sid}/runs", json={
                "agent": "bench", "input": script(1)}).json()["run_id"])
        time.sleep(1.0)
        killed_at = time.time()
        cluster.orchestrators.pop(0).kill()
        cluster.apis.pop(0)
        survivor = cluster.apis[0]
        takeovers = []
        for sid in sids:
            def resumed(sid: str = sid) -> float | None:
                for e in cluster.events(sid):
                    if e.type == "RunResumed":
                        return e.recorded_at.timestamp()
                return None
            at = wait_until(resumed, 60, 0.1, "a takeover")
            takeovers.append(at - killed_at)  # type: ignore[operator]
        cluster.primary.configure(first_byte_delay_ms=0)
        print(f"(b) takeover after kill -9 of the owner: p50 {p50(takeovers):.2f} s, max "
              f"{max(takeovers):.2f} s over {len(takeovers)} runs (goal p50 <= 2 s)")

        # (c) many runs at once
        async def many() -> tuple[int, int, float]:
            async with httpx.AsyncClient(timeout=300, headers=key,
                                         limits=httpx.Limits(max_connections=50)) as ac:
                sid = (await ac.post(f"{survivor}/v1/sessions", json={
                    "policy_rules": {"tools_allow": ["*"]}})).json()["session_id"]
                t0 = time.perf_counter()
                started = await asyncio.gather(*(ac.post(f"{survivor}/v1/sessions/{sid}/runs", json={
                    "agent": "bench", "input": script(1)}) for _ in range(args.concurrent)),
                    return_exceptions=True)
                refused = [r if isinstance(r, Exception) else f"{r.status_code} {r.text[:200]}"
                           for r in started if isinstance(r, Exception) or r.status_code != 202]
                for why in sorted({repr(r) for r in refused})[:5]:
                    print(f"    a start failed: {why}")
                ids = [r.json()["run_id"] for r in started
                       if not isinstance(r, Exception) and r.status_code == 202]
                pending = set(ids)
                status: dict[str, str] = {}
                while pending and time.perf_counter() - t0 < 600:
                    for rid in list(pending):
                        s = (await ac.get(f"{survivor}/v1/runs/{rid}")).json()["status"]
                        if s in ("finished", "failed", "cancelled"):
                            status[rid] = s
                            pending.discard(rid)
                    await asyncio.sleep(0.5)
                ok = sum(1 for s in status.values() if s == "finished")
                return ok, args.concurrent - ok, time.perf_counter() - t0

        ok, bad, wall = asyncio.run(many())
        print(f"(c) {args.concurrent} concurrent runs: {ok} finished, {bad} failed or unfinished, "
              f"{wall:.1f} s wall (goal: 200 without errors)")
    finally:
        server.shutdown()
        node.stop()
        cluster.stop()
        pg.stop()


if __name__ == "__main__":
    main()

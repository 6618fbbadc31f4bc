"""Soak: `.venv/bin/python bench/soak.py [--sessions 1000] [--minutes 10]` (`make soak`).

N sessions (default 1,000) stay open for a duration (default 10 minutes), each calling
`POST /v1/chat/completions` (streaming, `X-Nexus-Session`: budget reserve/commit, policy,
events) back to back through the real services: NATS, Postgres (fsync on), the fake
OpenAI-compatible upstream (own process), one provider, one orchestrator and one node
(no runtime: it heartbeats), all started by this script on 127.0.0.1 (the harness of
bench/gateway.py, plus the node). Each reply streams 8 tokens spread over `--call-s`
seconds (the fake's per-token delay), so all N sessions have a call in flight at once
and the platform sees about N / call-s calls per second. Alongside, `--direct` clients
(default N / 20) make the same streaming call straight to the fake: the baseline for the
latency the platform adds, under the same machine load at the same moment.

Every `--sample-s` seconds the memory of every process is sampled (psutil): RSS of the
orchestrator, provider, node, NATS and the fake; for Postgres the PSS summed over the
postmaster and its backends (summing their RSS would count the shared buffers once per
backend), and their private memory (USS) summed, which the verdict judges: the shared
buffers are a cache of fixed size (128 MB) that fills as the tables grow. Printed:

- per process: memory at the end of the warm-up and at the end, and the slope after the
  warm-up (least squares over the samples after the first `--warmup-s`, MiB per minute).
  Flat: slope <= max(1 MiB/min, 0.5 % of the process's mean memory per minute);
- per minute (`--bucket-s`): calls completed, p95 of the total and first-token latency,
  Nexus and direct, and the added p95 (Nexus minus direct). Stable: every minute after
  the warm-up within max(50 ms, 50 %) of the median of those minutes' added p95;
- errors (any call that did not end in a complete 200 stream): must be 0.

Timings and slopes are printed; `--gate` exits 1 when a verdict fails (`make soak`).
`--report FILE` writes the figures as JSON (tests/test_soak.py runs a bounded form).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx
import psutil

from bench.gateway import (
    UPSTREAM_KEY,
    HttpConn,
    Platform,
    pct,
    raise_fd_limit,
    run_async,
)
from bench.sessions import create_sessions
from tests.fake_upstream import FakeUpstreamControl
from tests.support import ServiceProc, service_env, wait_until

REPLY_TOKENS = 8
FLAT_MIB_PER_MIN = 1.0        # memory flat: slope at most this many MiB per minute ...
FLAT_FRACTION_PER_MIN = 0.005  # ... or this fraction of the mean per minute, the larger
STABLE_MS = 50.0               # p95 stable: every minute within this many ms of the median ...
STABLE_FRACTION = 0.5          # ... or this fraction of it, the larger
MIB = 1024 * 1024
POSTGRES_PID = [0]


class SoakPlatform(Platform):
    """bench/gateway.py's platform plus a node (no runtime) heartbeating over NATS."""

    node: ServiceProc | None = None

    def start(self) -> SoakPlatform:
        super().start()
        assert self.nats is not None
        env = service_env(self.nats.url, "", NEXUS_LOG_LEVEL="WARNING",
                          NEXUS_INSTANCE_ID="soak-node",
                          NEXUS_NODE_DATA_DIR=str(self.tmp / "node"))
        env.pop("DATABASE_URL")  # a node gets no database, as under `nexus up`
        self.node = ServiceProc("node", env, self.tmp / "node.log").start()

        def node_up() -> bool:
            if self.node is not None and self.node.proc.poll() is not None:
                raise AssertionError(f"node exited:\n{self.node.log()[-3000:]}")
            r = httpx.get(f"{self.api}/v1/nodes", headers=self.admin, timeout=10)
            return r.status_code == 200 and bool(r.json()["nodes"])

        wait_until(node_up, 60, 0.2, "the node to register")
        return self

    def stop(self) -> None:
        if self.node is not None and self.node.proc is not None and self.node.proc.poll() is None:
            try:
                self.node.stop()
            except AssertionError:
                pass
        super().stop()

    def pids(self) -> dict[str, int]:
        assert (self.orchestrator and self.provider and self.node and self.nats and self.pg
                and self.fake)
        return {"orchestrator": self.orchestrator.proc.pid, "provider": self.provider.proc.pid,
                "node": self.node.proc.pid, "nats": self.nats.proc.pid,
                "postgres": self.pg.proc.pid, "upstream": self.fake.proc.pid}


# -- memory --------------------------------------------------------------------------------


def memory_bytes(proc: psutil.Process) -> dict[str, int]:
    """RSS of one process; for Postgres (the postmaster and its backends) their PSS summed
    (`postgres`) and their private memory (USS) summed (`postgres private`)."""
    if proc.pid != POSTGRES_PID[0]:
        return {"": proc.memory_info().rss}
    pss = uss = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue  # a backend that just left
        pss += getattr(info, "pss", info.rss)
        uss += info.uss
    return {"": pss, " private": uss}


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, in value per minute."""
    if len(points) < 2:
        return float("nan")
    mx = sum(t for t, _ in points) / len(points)
    my = sum(v for _, v in points) / len(points)
    den = sum((t - mx) ** 2 for t, _ in points)
    if den == 0:
        return float("nan")
    return sum((t - mx) * (v - my) for t, v in points) / den * 60


# -- the load ------------------------------------------------------------------------------


@dataclass
class Call:
    done_s: float      # since the start of the soak
    total_ms: float
    first_ms: float


@dataclass
class Side:
    calls: list[Call] = field(default_factory=list)
    errors: list[tuple[float, str]] = field(default_factory=list)


async def looper(port: int, head: bytes, body: bytes, side: Side, t0: float,
                 start_delay: float, state: dict, ident: int | None = None) -> None:
    await asyncio.sleep(start_delay)
    conn = HttpConn("127.0.0.1", port)
    try:
        while not state["stop"]:
            try:
                reply = await conn.request("POST", "/v1/chat/completions", head, body,
                                           timeout=state["call_timeout"])
            except Exception as exc:  # noqa: BLE001 - counted, the soak goes on
                side.errors.append((time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"[:200]))
                await asyncio.sleep(0.5)
                continue
            now = time.perf_counter() - t0
            if reply.status != 200 or b"[DONE]" not in reply.body or reply.first_token_s is None:
                side.errors.append((now, f"{reply.status}: {reply.body[:200]!r}"))
                await asyncio.sleep(0.5)
                continue
            side.calls.append(Call(now, reply.total_s * 1000, reply.first_token_s * 1000))
            if ident is not None:
                state["served"].add(ident)
    finally:
        conn.close()


async def soak(platform: SoakPlatform, args: argparse.Namespace) -> dict:
    w = sys.stdout.write
    load0 = os.getloadavg()[0]
    key = platform.tenant_key("soak")
    sessions = await create_sessions(platform, key, args.sessions)
    if len(sessions) < args.sessions:
        raise AssertionError(f"only {len(sessions)} of {args.sessions} sessions were created")
    assert platform.fake is not None
    delay_ms = args.call_s * 1000 / REPLY_TOKENS
    await asyncio.to_thread(FakeUpstreamControl(platform.fake.url).configure,
                            token_delay_ms=delay_ms)
    direct_n = args.direct if args.direct is not None else max(5, args.sessions // 20)

    def body(model: str) -> bytes:
        return json.dumps({"model": model, "stream": True, "max_tokens": 16,
                           "messages": [{"role": "user", "content": "hello there"}]}).encode()

    heads = [f"Authorization: Bearer {key}\r\nX-Nexus-Session: {s}\r\n"
             "Content-Type: application/json\r\n".encode() for s in sessions]
    direct_head = (f"Authorization: Bearer {UPSTREAM_KEY}\r\n"
                   "Content-Type: application/json\r\n").encode()
    procs = {name: psutil.Process(pid) for name, pid in platform.pids().items()}
    POSTGRES_PID[0] = procs["postgres"].pid
    samples: dict[str, list[tuple[float, float]]] = {}
    nexus, direct = Side(), Side()
    state: dict = {"stop": False, "call_timeout": args.call_s * 3 + 60, "served": set()}
    duration = args.minutes * 60
    w(f"soak: {args.sessions} sessions calling back to back for {duration:g} s, each reply "
      f"{REPLY_TOKENS} tokens over {args.call_s:g} s (~{args.sessions / args.call_s:.0f} "
      f"calls/s), {direct_n} direct clients; memory every {args.sample_s:g} s, warm-up "
      f"{args.warmup_s:g} s, p95 per {args.bucket_s:g} s\n")
    sys.stdout.flush()

    t0 = time.perf_counter()
    # the sessions start spread over one call's length, so calls do not move in lockstep
    rnd = random.Random(17)
    tasks = [asyncio.create_task(looper(platform.port, h, body("default"), nexus, t0,
                                        rnd.uniform(0, args.call_s), state, i))
             for i, h in enumerate(heads)]
    tasks += [asyncio.create_task(looper(platform.fake.port, direct_head, body("fake-small"),
                                         direct, t0, rnd.uniform(0, args.call_s), state))
              for _ in range(direct_n)]

    def sample_all() -> dict[str, int]:
        return {name + part: v for name, p in procs.items()
                for part, v in memory_bytes(p).items()}

    next_sample = 0.0
    next_print = args.bucket_s
    while (now := time.perf_counter() - t0) < duration:
        if now >= next_sample:
            mem = await asyncio.to_thread(sample_all)
            at = time.perf_counter() - t0
            for name, v in mem.items():
                samples.setdefault(name, []).append((at, v / MIB))
            next_sample += args.sample_s
        if now >= next_print:
            w(f"  {now:6.0f} s  {len(nexus.calls):>7} calls, {len(nexus.errors)} errors;  "
              + ", ".join(f"{n} {s[-1][1]:.0f}" for n, s in samples.items() if s) + " MiB\n")
            sys.stdout.flush()
            next_print += args.bucket_s
        for t in tasks:  # a looper that died is a harness failure, not a silent gap
            if t.done() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        await asyncio.sleep(min(0.5, args.sample_s / 4))
    state["stop"] = True
    _, pending = await asyncio.wait(tasks, timeout=state["call_timeout"] + 10)
    for t in pending:
        t.cancel()

    # -- figures
    buckets = max(1, round(duration / args.bucket_s))

    def bucket_of(t: float) -> int:
        return min(int(t / args.bucket_s), buckets - 1)

    per: list[dict] = []
    for b in range(buckets):
        n = [c for c in nexus.calls if bucket_of(c.done_s) == b]
        d = [c for c in direct.calls if bucket_of(c.done_s) == b]
        n95, d95 = pct([c.total_ms for c in n], .95), pct([c.total_ms for c in d], .95)
        f95, g95 = pct([c.first_ms for c in n], .95), pct([c.first_ms for c in d], .95)
        per.append({"bucket": b, "from_s": b * args.bucket_s, "calls": len(n),
                    "direct_calls": len(d),
                    "errors": sum(1 for t, _ in nexus.errors if bucket_of(t) == b),
                    "nexus_p95_ms": n95, "direct_p95_ms": d95, "added_p95_ms": n95 - d95,
                    "nexus_first_p95_ms": f95, "direct_first_p95_ms": g95,
                    "added_first_p95_ms": f95 - g95})
    steady = [p for p in per if p["from_s"] >= args.warmup_s and p["calls"]]
    added = [p["added_p95_ms"] for p in steady]
    median = statistics.median(added) if added else float("nan")
    allowed = max(STABLE_MS, STABLE_FRACTION * abs(median)) if added else float("nan")
    p95_stable = bool(added) and all(abs(a - median) <= allowed for a in added)
    p95_slope = slope_per_min([(p["from_s"], p["added_p95_ms"]) for p in steady])

    memory: dict[str, dict] = {}
    for name, pts in samples.items():
        after = [(t, v) for t, v in pts if t >= args.warmup_s]
        mean = sum(v for _, v in after) / len(after) if after else float("nan")
        slope = slope_per_min(after)
        tolerance = max(FLAT_MIB_PER_MIN, FLAT_FRACTION_PER_MIN * mean)
        memory[name] = {"samples": len(pts), "samples_after_warmup": len(after),
                        "first_mib": pts[0][1] if pts else None,
                        "warm_mib": after[0][1] if after else None,
                        "last_mib": pts[-1][1] if pts else None,
                        "mean_mib": mean, "slope_mib_per_min": slope,
                        "tolerance_mib_per_min": tolerance,
                        "flat": len(after) >= 2 and slope <= tolerance,
                        "series": [(round(t, 1), round(v, 2)) for t, v in pts]}
    # Postgres's shared buffers are a cache of fixed size (shared_buffers) that fills as the
    # tables grow: its verdict is on the backends' private memory; the PSS is printed.
    memory_flat = all(m["flat"] for name, m in memory.items() if name != "postgres")

    w(f"\nsoak figures: {args.sessions} sessions, {duration:g} s, {len(nexus.calls)} Nexus "
      f"calls ({len(nexus.calls) / duration:.1f}/s), {len(direct.calls)} direct, "
      f"{len(nexus.errors)} errors (direct: {len(direct.errors)}); {os.cpu_count()} CPUs "
      f"shared by all processes and this client\n")
    w(f"\nmemory (MiB; slope: least squares over the samples after the first "
      f"{args.warmup_s:g} s)\n")
    w(f"  {'process':<17}{'start':>8}{'warm':>8}{'end':>8}{'slope/min':>11}{'tolerance':>11}"
      f"{'samples':>9}  verdict\n")
    for name, m in memory.items():
        w(f"  {name:<17}{m['first_mib'] or 0:>8.1f}{m['warm_mib'] or 0:>8.1f}"
          f"{m['last_mib'] or 0:>8.1f}{m['slope_mib_per_min']:>+11.2f}"
          f"{m['tolerance_mib_per_min']:>11.2f}{m['samples']:>9}  "
          f"{'flat' if m['flat'] else 'GROWING'}"
          + (" (shared buffers fill: not judged)" if name == "postgres" else "") + "\n")
    w(f"\nlatency p95 per {args.bucket_s:g} s (ms; added = Nexus - direct; "
      f"{'*' if args.warmup_s else ''} = warm-up)\n")
    w(f"  {'from s':>7}{'calls':>7}{'errors':>7}{'nexus':>10}{'direct':>10}{'added':>9}"
      f"{'first tok added':>17}\n")
    for p in per:
        mark = "*" if p["from_s"] < args.warmup_s else " "
        w(f"  {p['from_s']:>6.0f}{mark}{p['calls']:>7}{p['errors']:>7}{p['nexus_p95_ms']:>10.1f}"
          f"{p['direct_p95_ms']:>10.1f}{p['added_p95_ms']:>+9.1f}"
          f"{p['added_first_p95_ms']:>+17.1f}\n")
    w(f"\nverdict: memory {'flat' if memory_flat else 'NOT flat'} (every process: slope <= "
      f"max({FLAT_MIB_PER_MIN:g} MiB/min, {FLAT_FRACTION_PER_MIN:.1%} of its mean/min)); "
      f"added p95 {'stable' if p95_stable else 'NOT stable'} (median {median:+.1f} ms, every "
      f"minute after warm-up within {allowed:.0f} ms of it; slope {p95_slope:+.1f} ms/min); "
      f"errors {len(nexus.errors) + len(direct.errors)}\n")
    for label, side in (("nexus", nexus), ("direct", direct)):
        if side.errors:
            w(f"  {label} errors: {len(side.errors)}, first: {side.errors[0][1]}\n")
    w(f"load average (1 min) at the start {load0:.2f}, at the end {os.getloadavg()[0]:.2f} "
      f"(other work shares this machine)\n")
    return {"sessions": args.sessions, "duration_s": duration, "call_s": args.call_s,
            "direct_clients": direct_n, "warmup_s": args.warmup_s, "bucket_s": args.bucket_s,
            "calls": len(nexus.calls), "direct_calls": len(direct.calls),
            "sessions_served": len(state["served"]),
            "errors": [e for _, e in nexus.errors], "direct_errors": [e for _, e in direct.errors],
            "memory": memory, "per_bucket": per, "memory_flat": memory_flat,
            "p95_stable": p95_stable, "added_p95_median_ms": median,
            "added_p95_slope_ms_per_min": p95_slope,
            "load_avg": [load0, os.getloadavg()[0]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--call-s", type=float, default=30,
                        help="how long each streamed reply lasts (the fake's token delay)")
    parser.add_argument("--direct", type=int, default=None,
                        help="clients calling the fake directly (default sessions / 20)")
    parser.add_argument("--sample-s", type=float, default=5, help="memory sampling period")
    parser.add_argument("--warmup-s", type=float, default=120)
    parser.add_argument("--bucket-s", type=float, default=60, help="p95 per this many seconds")
    parser.add_argument("--report", type=Path, help="write the figures as JSON here")
    parser.add_argument("--gate", action="store_true", help="exit 1 when a verdict fails")
    args = parser.parse_args()
    raise_fd_limit()
    tmp = Path(tempfile.mkdtemp(prefix="nexus-soak-"))
    platform = SoakPlatform(tmp, reply_tokens=REPLY_TOKENS,
                            max_concurrency=args.sessions + 100, max_queue=4096)
    result: dict = {}
    try:
        t = time.perf_counter()
        platform.start()
        sys.stdout.write(f"platform up in {time.perf_counter() - t:.1f} s ({tmp})\n")
        sys.stdout.flush()

        async def go() -> None:
            result.update(await soak(platform, args))

        run_async(go())
    finally:
        platform.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.report:
        args.report.write_text(json.dumps(result, indent=1))
    failed = result["errors"] or result["direct_errors"] or not result["memory_flat"] \
        or not result["p95_stable"]
    sys.exit(1 if args.gate and failed else 0)


if __name__ == "__main__":
    main()

"""Nodes benchmark: `.venv/bin/python bench/nodes.py [--seconds 60] [--nodes 1000]`.

(a) N simulated nodes (one process, real subjects and messages) heartbeat at 1 Hz
    against a real orchestrator process for the given time. Printed:
    - registration request latency p50/p99 (the seed asked < 100 ms);
    - heartbeat-to-visible lag p50/p99: a probe heartbeat with a marker value is sent
      for a sample node and `GET /v1/nodes?label=...` is polled until the marker shows
      (end to end through NATS, JetStream, the orchestrator's view and its HTTP API);
      baseline in the same run: the same poll loop's own round trip (marker already
      visible), so the lag above it is what the heartbeat path adds;
    - the orchestrator's CPU share over the run (psutil: process CPU time / wall time,
      as a fraction of one core).
(b) selection time per call at 10..10,000 nodes per strategy: see
    bench/nodes_selection.py (run here too when present).

Timings are printed, never asserted. Goals (issue): lag p99 <= 100 ms; selection p99
<= 50 us at 1000 nodes; registration p99 well under 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402

from shared.contracts import subjects  # noqa: E402
from shared.infra import EmbeddedNats, EmbeddedPostgres, free_port  # noqa: E402
from shared.infra.migrate import migrate  # noqa: E402
from shared.contracts.messages import Heartbeat, RegistrationAck  # noqa: E402
from shared.infra.messaging import Bus  # noqa: E402
from tests.fleet import SimFleet, registration  # noqa: E402


LOST_AFTER_S = 5.0  # a probe not visible by then is reported as lost


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def run(seconds: float, count: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="nexus-bench-nodes-"))
    nats_server = EmbeddedNats(tmp / "nats")
    pg = EmbeddedPostgres(tmp / "pg")
    nats_server.start()
    pg.start()
    db = pg.url()
    migrate(db)
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("NEXUS_", "OTEL_"))},
           "NATS_URL": nats_server.url, "DATABASE_URL": db, "NEXUS_HTTP_PORT": str(port),
           "NEXUS_LOG_LEVEL": "WARNING", "NEXUS_ADMIN_KEY": "bench-admin-key"}
    log = open(tmp / "orchestrator.log", "wb")
    orch = subprocess.Popen([sys.executable, "-m", "services.orchestrator.main"], cwd=ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}"
    bus = None
    try:
        admin = {"Authorization": "Bearer bench-admin-key"}
        async with httpx.AsyncClient(timeout=10, headers=admin) as http:
            for _ in range(300):
                try:
                    if (await http.get(f"{api}/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
            bus = await Bus.connect(nats_server.url, "bench-fleet")
            tag = uuid.uuid4().hex[:6]
            ids = [f"{tag}-{i:05d}" for i in range(count)]

            # registration latency, 50 in flight
            reg_ms: list[float] = []
            sem = asyncio.Semaphore(50)

            async def register(node_id: str) -> None:
                async with sem:
                    labels = {"fleet": "bench", "probe": node_id}
                    started = time.perf_counter()
                    await bus.request(subjects.node_register(node_id),
                                      registration(node_id, labels=labels), RegistrationAck,
                                      timeout=30)
                    reg_ms.append((time.perf_counter() - started) * 1000)

            sequential = min(100, count // 10)
            for node_id in ids[:sequential]:
                await register(node_id)
            seq_ms, reg_ms = reg_ms, []
            t0 = time.perf_counter()
            await asyncio.gather(*(register(n) for n in ids[sequential:]))
            reg_wall = time.perf_counter() - t0

            fleet = SimFleet(bus, ids, interval=1.0)
            await fleet.beat_once()
            await asyncio.sleep(2)
            fleet.start()
            proc = psutil.Process(orch.pid)
            cpu0, wall0 = sum(proc.cpu_times()[:2]), time.monotonic()

            lag_ms: list[float] = []
            poll_ms: list[float] = []
            lost: list[str] = []  # probes not visible within LOST_AFTER_S: counted, not dropped
            probe_i = 0
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                probe_i += 1
                node_id = ids[(probe_i * 7919) % count]
                marker = round(50 + (probe_i % 4000) / 100, 2)  # a cpu_pct value to look for
                hb = Heartbeat(node_id=node_id, seq=10**6 + probe_i, sent_at=time.time(),
                               cpu_pct=marker, memory_pct=33.0, active_requests=0)
                sent = time.perf_counter()
                await bus.publish(subjects.node_heartbeat(node_id), hb, traced=False)
                while True:
                    r = await http.get(f"{api}/v1/nodes", params={"label": f"probe={node_id}"})
                    load = r.json()["nodes"][0]["load"]
                    if load and load["cpu_pct"] == marker:
                        lag_ms.append((time.perf_counter() - sent) * 1000)
                        break
                    if time.perf_counter() - sent > LOST_AFTER_S:
                        lost.append(f"{node_id} seq {hb.seq} cpu_pct {marker}")
                        break
                # baseline: the same poll once the marker is visible
                p0 = time.perf_counter()
                await http.get(f"{api}/v1/nodes", params={"label": f"probe={node_id}"})
                poll_ms.append((time.perf_counter() - p0) * 1000)
                await asyncio.sleep(0.2)
            cpu1, wall1 = sum(proc.cpu_times()[:2]), time.monotonic()
            await fleet.stop()

        online = len(httpx.get(f"{api}/v1/nodes", params={"status": "online"}, timeout=30,
                               headers=admin)
                     .json()["nodes"])
        print(f"\nnodes benchmark: {count} simulated nodes at 1 Hz for {seconds:.0f} s, "
              f"one orchestrator process, 2-core machine (bench, NATS and Postgres share it)")
        print(f"registration, one at a time ({len(seq_ms)}): p50 {pct(seq_ms, .5):.1f} ms, "
              f"p99 {pct(seq_ms, .99):.1f} ms   (seed: < 100 ms)")
        print(f"registration, 50 in flight ({len(reg_ms)} in {reg_wall:.1f}s): "
              f"p50 {pct(reg_ms, .5):.1f} ms, p99 {pct(reg_ms, .99):.1f} ms")
        probes = len(lag_ms) + len(lost)
        print(f"heartbeat -> visible in the API: p50 {pct(lag_ms, .5):.1f} ms, "
              f"p99 {pct(lag_ms, .99):.1f} ms over {len(lag_ms)} probes seen   (goal p99 <= 100 ms)")
        print(f"  lost (not visible within {LOST_AFTER_S:g} s, not in the percentiles): "
              f"{len(lost)} of {probes} probes")
        for probe in lost:
            print(f"    lost probe: {probe}")
        print(f"  baseline, the API poll alone: p50 {pct(poll_ms, .5):.1f} ms, "
              f"p99 {pct(poll_ms, .99):.1f} ms -> heartbeat path adds "
              f"~{max(0.0, pct(lag_ms, .5) - pct(poll_ms, .5)):.1f} ms at p50")
        print(f"orchestrator CPU: {(cpu1 - cpu0) / (wall1 - wall0):.0%} of one core "
              f"while folding {count} heartbeats/s")
        print(f"online at the end: {online}/{count}")
    finally:
        if bus is not None:
            await bus.close()
        orch.terminate()
        orch.wait(20)
        log.close()
        nats_server.stop()
        pg.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--nodes", type=int, default=1000)
    args = parser.parse_args()
    asyncio.run(run(args.seconds, args.nodes))
    selection = ROOT / "bench" / "nodes_selection.py"
    if selection.exists():
        print("\n(b) selection")
        subprocess.run([sys.executable, str(selection)], check=False)


if __name__ == "__main__":
    main()

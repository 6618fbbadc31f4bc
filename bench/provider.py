"""The provider alone: `.venv/bin/python bench/provider.py [--clients 1 16] [--seconds 5]`.

NATS, Postgres (fsync on), the fake OpenAI-compatible upstream (its own process, 0 ms
token delay, 8-token reply) and one provider, as real processes; this process sends
`CompletionRequest`s straight to `nexus.provider.complete` (no orchestrator) and reads
the frame streams. Printed per level of concurrent callers, for three timed windows:
calls, calls/s and the provider's CPU per call (user + system, /proc), the load average
beside it (the machine is shared: compare runs made back to back). With `--profile
FILE`, a py-spy raw profile of the provider is recorded during one more window (py-spy
from the venv). `--tree DIR` runs the provider (and the migrations) from another
checkout, e.g. `git archive HEAD` unpacked, for a before/after pair in one session.
Timings are printed, never asserted.
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
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil

from bench.gateway import UPSTREAM_KEY, providers_toml
from shared.contracts import subjects
from shared.contracts.frames import Done
from shared.contracts.messages import ChatMessage, CompletionRequest
from shared.infra import EmbeddedNats, EmbeddedPostgres
from shared.infra.messaging import Bus
from shared.infra.process import spawn, stop_process
from shared.infra.streaming import StreamReceiver
from tests.fake_upstream import FakeUpstreamProcess
from tests.support import service_env


async def drive(bus: Bus, provider: psutil.Process, clients: int, seconds: float,
                windows: int) -> None:
    session = f"bench-{uuid.uuid4().hex}"
    errors = 0

    async def one() -> None:
        request = CompletionRequest(call_id=uuid.uuid4().hex, session_id=session, tenant="bench",
                                    model="default", max_tokens=16,
                                    messages=(ChatMessage(role="user", content="hi"),))
        async with StreamReceiver(bus, subjects.PROVIDER_COMPLETE, request,
                                  first_frame_timeout_s=30) as stream:
            last = None
            async for frame in stream.frames():
                last = frame
        if not isinstance(last, Done):
            raise RuntimeError(f"the call ended with {last!r}")

    async def load(window: float) -> int:
        nonlocal errors
        done = 0

        async def client() -> None:
            nonlocal done, errors
            end = time.monotonic() + window
            while time.monotonic() < end:
                try:
                    await one()
                    done += 1
                except Exception as exc:  # noqa: BLE001 - counted and shown
                    errors += 1
                    print(f"  error: {type(exc).__name__}: {str(exc)[:200]}")

        await asyncio.gather(*(client() for _ in range(clients)))
        return done

    await load(1.0)  # warm-up: connections, caches
    for _ in range(windows):
        before, started = provider.cpu_times(), time.monotonic()
        calls = await load(seconds)
        after, elapsed = provider.cpu_times(), time.monotonic() - started
        cpu_ms = (after.user - before.user + after.system - before.system) * 1000
        print(f"{clients:3d} callers: {calls:6d} calls, {calls / elapsed:7.0f} calls/s, provider "
              f"CPU {cpu_ms / max(calls, 1):.3f} ms per call (load average "
              f"{os.getloadavg()[0]:.2f})", flush=True)
    if errors:
        print(f"  {errors} errors")


async def run(args: argparse.Namespace, nats_url: str, provider_proc: subprocess.Popen) -> None:
    bus = await Bus.connect(nats_url, "bench-provider")
    try:
        for _ in range(600):  # the provider answers its models once it serves
            try:
                await bus.nc.request(subjects.PROVIDER_MODELS, b"{}", timeout=1)
                break
            except Exception:  # noqa: BLE001 - not up yet
                await asyncio.sleep(0.2)
        provider = psutil.Process(provider_proc.pid)
        for clients in args.clients:
            await drive(bus, provider, clients, args.seconds, args.windows)
        if args.profile:
            spy = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                 str(provider_proc.pid), "--format", "raw", "--rate", "250",
                 "-d", str(int(args.seconds) + 1), "-o", args.profile],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await asyncio.sleep(0.5)
            await drive(bus, provider, args.clients[-1], args.seconds, 1)
            spy.wait()
            print(f"profile of the provider: {args.profile}")
    finally:
        await bus.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--profile", default="")
    parser.add_argument("--tree", default=str(ROOT))
    args = parser.parse_args()
    tree = str(Path(args.tree).resolve())
    tmp = Path(tempfile.mkdtemp(prefix="nexus-bench-provider-"))
    nats, pg = EmbeddedNats(tmp / "nats"), EmbeddedPostgres(tmp / "pg")
    fake = provider = None
    try:
        nats.start()
        pg.start()
        migrate = f"from shared.infra.migrate import migrate; migrate({pg.url()!r})"
        subprocess.run([sys.executable, "-c", migrate], cwd=tree, check=True,
                       env={**os.environ, "PYTHONPATH": tree})
        fake = FakeUpstreamProcess(delay_ms=0, reply_tokens=8, models=("fake-small",),
                                   api_key=UPSTREAM_KEY).start()
        env = service_env(nats.url, pg.url(), PYTHONPATH=tree, BENCH_UPSTREAM_KEY=UPSTREAM_KEY,
                          NEXUS_PROVIDERS=providers_toml(fake.url + "/v1", 128, 1024),
                          NEXUS_LOG_LEVEL="WARNING", NEXUS_INSTANCE_ID="bench-provider")
        provider = spawn([sys.executable, "-m", "services.provider.main"], tmp / "provider.log",
                         cwd=tree, env=env, stdin=None, start_new_session=False)
        print(f"provider from {tree}; fake upstream 0 ms token delay, 8-token reply")
        asyncio.run(run(args, nats.url, provider))
    finally:
        if provider is not None:
            stop_process(provider, 15)
        if fake is not None:
            fake.stop()
        nats.stop()
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Tools benchmark: `.venv/bin/python bench/tools.py [--runs 200] [--section sandbox]`.

(a) sandbox: cold start of a trivial `python` call (`print(1)`) in a fresh sandbox,
    `Sandbox.run` end to end (slot, bwrap namespaces, rlimits, seccomp, pipes, rusage),
    against a plain `subprocess` start of the same interpreter with the same flags in the
    same run, alternating so both see the same machine load. Printed: p50/p99 of each,
    the ratio and the milliseconds the sandbox adds at p50 (goal: <= 20 ms).
(b) platform: a trivial `python` tool call through HTTP -> orchestrator -> NATS -> node
    -> sandbox against the direct `Sandbox.run` of exactly what the node runs for it (the
    same wrapper argv with the code on stdin, the same limits and output capture, the
    same workspace mode: none, or with `--workspace` a fresh rw directory), alternating;
    p50/p99, calls/s at 4 in flight, the sandbox's own run time on each side, and what the
    platform adds (goal: <= 5 ms at p50). `--profile DIR` records the orchestrator and the
    node with py-spy (`pip install py-spy`) during the timed runs, prints their top
    frames and keeps the raw profiles and the services' logs in DIR.

Timings are printed, never asserted: a benchmark does not fail on numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from services.node.sandbox import Sandbox
from shared.contracts.messages import ToolLimits

GOAL_ADDED_MS = 20.0
WARMUP = 5


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def sandbox_cold_start(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="nexus-bench-tools-") as tmp:
        sandbox = Sandbox(Path(tmp) / "sandbox", denied=())
        argv = [*sandbox.python, "-c", "print(1)"]
        limits = ToolLimits(timeout_s=30, cpu_s=10, memory_mb=512)
        sandboxed: list[float] = []
        plain: list[float] = []
        for i in range(WARMUP + args.runs):
            t0 = time.perf_counter()
            r = await sandbox.run(argv, limits=limits)
            t1 = time.perf_counter()
            assert r.outcome == "ok" and r.stdout == b"1\n", r
            p = await asyncio.to_thread(subprocess.run, argv, capture_output=True, check=True)
            t2 = time.perf_counter()
            assert p.stdout == b"1\n"
            if i >= WARMUP:
                sandboxed.append((t1 - t0) * 1000)
                plain.append((t2 - t1) * 1000)
    s50, p50 = pct(sandboxed, .5), pct(plain, .5)
    print(f"\n(a) sandbox cold start, trivial python call ({' '.join(argv[:3])} -c "
          f"'print(1)'), {args.runs} runs each, alternating")
    print(f"  plain subprocess: p50 {p50:.1f} ms, p99 {pct(plain, .99):.1f} ms")
    print(f"  sandbox.run:      p50 {s50:.1f} ms, p99 {pct(sandboxed, .99):.1f} ms")
    print(f"  ratio at p50 {s50 / p50:.2f}x; the sandbox adds {s50 - p50:.1f} ms at p50 "
          f"(goal <= {GOAL_ADDED_MS:g} ms), {pct(sandboxed, .99) - pct(plain, .99):.1f} ms "
          f"at p99")


GOAL_PLATFORM_ADDED_MS = 5.0


async def platform_path(args: argparse.Namespace) -> None:
    """(b) the whole path against the direct sandbox call, alternating, same machine."""
    import shutil
    import uuid

    import httpx

    from services.node.tools import WRAPPER, ToolRunner
    from shared.domain.tools import builtin_spec

    from shared.infra import EmbeddedNats, EmbeddedPostgres
    from shared.infra.migrate import migrate
    from tests.support import ServiceProc, free_port_str, service_env, wait_http_ok

    with tempfile.TemporaryDirectory(prefix="nexus-bench-platform-") as tmp_name:
        tmp = Path(tmp_name)
        nats, pg = EmbeddedNats(tmp / "nats"), EmbeddedPostgres(tmp / "pg", ephemeral=True)
        nats.start()
        pg.start()
        procs: list[ServiceProc] = []
        try:
            db = pg.url("nexus_bench")
            migrate(db)
            port, key = free_port_str(), f"admin-{uuid.uuid4().hex}"
            env = service_env(nats.url, db, NEXUS_HTTP_PORT=port, NEXUS_LOG_LEVEL="WARNING")
            procs.append(ServiceProc("orchestrator", {**env, "NEXUS_ADMIN_KEY": key},
                                     tmp / "orchestrator.log").start())
            procs.append(ServiceProc("node", {**{k: v for k, v in env.items()
                                                 if k != "DATABASE_URL"},
                                              "NEXUS_NODE_DATA_DIR": str(tmp / "node")},
                                     tmp / "node.log").start())
            api, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
            wait_http_ok(f"{api}/health", proc=procs[0])
            async with httpx.AsyncClient(base_url=api, headers=headers, timeout=60) as http:
                async def online() -> bool:
                    nodes = (await http.get("/v1/nodes")).json()["nodes"]
                    return any(n["status"] == "online" for n in nodes)

                for _ in range(300):
                    if await online():
                        break
                    await asyncio.sleep(0.1)
                sid = (await http.post("/v1/sessions", json={
                    "policy_rules": {"tools_allow": ["*"]}})).json()["session_id"]
                # python without the workspace (no sync in and out of the object store),
                # like the direct call; `--workspace` measures the builtin with it
                await http.post("/v1/tools", json={"name": "py_bare", "builtin": "python",
                                                   "permissions": {"filesystem": "none"}})
                body = {"arguments": {"code": "print(1)"}}
                tool = "python" if args.workspace else "py_bare"
                url = f"/v1/sessions/{sid}/tools/{tool}/invoke"
                # the direct call runs exactly what the node runs for this tool: the same
                # wrapper argv with the code on stdin, the same limits (the output captured
                # up to the object-store bound, as ToolRunner does) and workspace mode
                sandbox = Sandbox(tmp / "sandbox", denied=())
                runner = ToolRunner("bench", None, sandbox, None, tmp / "tools")  # type: ignore[arg-type]
                limits = runner._capture_limits(builtin_spec("python").limits)

                inner: dict[str, list[float]] = {"platform": [], "direct": []}

                async def via_platform() -> None:
                    r = await http.post(url, json=body)
                    assert r.status_code == 200 and r.json()["status"] == "finished", r.text
                    inner["platform"].append(r.json()["duration_ms"])

                async def direct() -> None:
                    token = uuid.uuid4().hex
                    workspace = None
                    if args.workspace:  # a fresh private rw workspace, as the node makes one
                        workspace = tmp / "ws" / token
                        workspace.mkdir(parents=True, mode=0o700)
                    r = await sandbox.run([*sandbox.python, "-c", WRAPPER, token], limits=limits,
                                          workspace=workspace, writable=args.workspace,
                                          stdin=body["arguments"]["code"].encode())
                    assert r.outcome == "ok", r
                    inner["direct"].append(r.duration_ms)
                    if workspace is not None:
                        shutil.rmtree(workspace)

                lat: dict[str, list[float]] = {"platform": [], "direct": []}
                spies = _profile(args.profile, {"orchestrator": procs[0], "node": procs[1]})
                for i in range(WARMUP + args.runs):
                    for name, fn in (("platform", via_platform), ("direct", direct)):
                        t0 = time.perf_counter()
                        await fn()
                        if i >= WARMUP:
                            lat[name].append((time.perf_counter() - t0) * 1000)
                _stop_profile(spies, args.profile)
                own = {k: v[WARMUP:] for k, v in inner.items()}  # the timed runs only
                rates = {}
                for name, fn in (("platform", via_platform), ("direct", direct)):
                    n = max(20, args.runs // 2)
                    t0 = time.perf_counter()
                    await asyncio.gather(*(_limited(fn, 4) for _ in range(n)))
                    rates[name] = n / (time.perf_counter() - t0)
        finally:
            for proc in reversed(procs):
                if proc.proc and proc.proc.poll() is None:
                    proc.stop()
                if args.profile:  # the services' logs beside their profiles
                    shutil.copy(proc.log_path, Path(args.profile) / proc.log_path.name)
            nats.stop()
            pg.stop()
    d50, p50 = pct(lat["direct"], .5), pct(lat["platform"], .5)
    print(f"\n(b) a trivial python tool call ({'with' if args.workspace else 'without'} the "
          f"session workspace), {args.runs} runs each, alternating")
    print(f"  sandbox.run directly:                            p50 {d50:.1f} ms, "
          f"p99 {pct(lat['direct'], .99):.1f} ms, {rates['direct']:.1f} calls/s at 4 in flight")
    print(f"  HTTP -> orchestrator -> NATS -> node -> sandbox: p50 {p50:.1f} ms, "
          f"p99 {pct(lat['platform'], .99):.1f} ms, {rates['platform']:.1f} calls/s at 4 in flight")
    print(f"  of which the sandbox's own run (spawn to exit, as measured by Sandbox.run): "
          f"p50 {pct(own['direct'], .5):.1f} ms directly, "
          f"{pct(own['platform'], .5):.1f} ms on the node")
    print(f"  ratio at p50 {p50 / d50:.2f}x; the platform adds {p50 - d50:.1f} ms at p50 "
          f"(goal <= {GOAL_PLATFORM_ADDED_MS:g} ms); throughput ratio "
          f"{rates['platform'] / rates['direct']:.2f}x")


def _profile(out: str | None, procs: dict) -> list:
    """py-spy (`pip install py-spy`) recording each service process while it runs."""
    if not out:
        return []
    Path(out).mkdir(parents=True, exist_ok=True)
    return [(name, subprocess.Popen(
        [str(Path(sys.executable).parent / "py-spy"), "record", "--nonblocking", "-r", "500",
         "-f", "raw", "-o", f"{out}/{name}.txt", "-p", str(proc.proc.pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)) for name, proc in procs.items()]


def _stop_profile(spies: list, out: str | None) -> None:
    """Stop the recorders and print each process's top frames (self and inclusive)."""
    import signal
    from collections import Counter

    for _, spy in spies:
        spy.send_signal(signal.SIGINT)
    for name, spy in spies:
        spy.wait(30)
        own, total, samples = Counter(), Counter(), 0
        for line in Path(f"{out}/{name}.txt").read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = stack.split(";")
            samples += int(count)
            own[frames[-1]] += int(count)
            for f in set(frames):
                total[f] += int(count)
        print(f"\n  profile of the {name} ({samples} samples, py-spy, {out}/{name}.txt)")
        print("    top frames by own time:")
        for f, c in own.most_common(8):
            print(f"      {100 * c / samples:5.1f}%  {f}")
        print("    top frames by inclusive time (repo code):")
        shown = [(f, c) for f, c in total.most_common(400)
                 if "(services/" in f or "(shared/" in f]
        for f, c in shown[:12]:
            print(f"      {100 * c / samples:5.1f}%  {f}")


_slots: asyncio.Semaphore | None = None


async def _limited(fn: Callable[[], Awaitable[None]], n: int) -> None:
    global _slots
    if _slots is None:
        _slots = asyncio.Semaphore(n)
    async with _slots:
        await fn()


SECTIONS: dict[str, Callable[[argparse.Namespace], Awaitable[None]]] = {
    "sandbox": sandbox_cold_start,
    "platform": platform_path,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--workspace", action="store_true",
                    help="(b): call the builtin python with its rw workspace (synced per call)")
    ap.add_argument("--profile", metavar="DIR",
                    help="(b): record the orchestrator and the node with py-spy into DIR "
                         "during the timed runs and print their top frames")
    ap.add_argument("--section", choices=sorted(SECTIONS), action="append",
                    help="run only these sections (default: all)")
    args = ap.parse_args()
    for name in args.section or SECTIONS:
        asyncio.run(SECTIONS[name](args))


if __name__ == "__main__":
    main()

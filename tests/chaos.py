"""The chaos harness: `nexus up` under a steady load of chat calls, kill -9 of each
process kind in turn, and the invariants checked against the real store after each round.

The platform is the real one (`python -m ops.cli up`: embedded NATS and Postgres, the
three services) in a data dir of its own, on random ports. The node supervises its
runtime as always (`ManagedLlama`), but `NEXUS_LLAMA_SERVER_BIN` points it at a stand-in
for llama-server: `python -m tests.chaos runtime`, the fake OpenAI upstream
(tests/fake_upstream.py) with llama-server's `/health` and `/props`. So every process
kind is on the path of a call: orchestrator -> provider -> node -> runtime, over NATS,
recorded in Postgres.

One round: kill -9 one process kind (its pid from the supervisor's `up.json`, or the
node's child for the runtime; only processes of this platform), measure the time until
the platform answers a chat call again, keep the load running a little, pause it and
check:

- every call the client saw acknowledged (a 200 body, or a stream that ended with its
  finish chunk and `[DONE]`) has `LLMCallCompleted`, `BudgetCommitted` and its two
  `MessageAppended` in the store;
- every projection equals its rebuild from the events;
- no budget is overspent (committed <= limit);
- no reservation stays open (each is committed, released, or swept after the TTL);
- no orphan: every process of this platform is in the supervisor's process tree, one
  of each kind.

`make chaos` runs many rounds (`python -m tests.chaos --rounds N`); tests/test_chaos.py
runs one round per process kind inside `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import httpx

from shared.infra.process import die_with_parent, free_port, pid_alive, stop_process
from tests.support import REPO, wait_until

KINDS = ("orchestrator", "provider", "node", "runtime", "nats", "postgres")
SERVICES = ("orchestrator", "provider", "node")
RESERVATION_TTL_S = 10.0  # the platform's NEXUS_RESERVATION_TTL_S in a chaos run
TIGHT_BUDGET_TOKENS = 300  # one worker's session: exhausted during a run (402s then)
DOWNLOAD_BYTES = 6 << 20  # the model pulled each round: ~3 s at the throttled rate
DOWNLOAD_BPS = 2 << 20
TOOL_DELAY_S = 0.4  # the side-effecting tool's endpoint is slow: kills land mid-call
TERMINAL_RUN = ("RunFinished", "RunFailed", "RunCancelled")


# -- the runtime stand-in -----------------------------------------------------------------


def runtime_main(argv: list[str]) -> None:
    """`python -m tests.chaos runtime [llama-server arguments]`: the fake upstream on
    llama-server's `--host`/`--port`, any model, with `/health` and `/props`."""
    from tests.fake_upstream import FakeUpstream, _send_json

    parser = argparse.ArgumentParser(prog="chaos-runtime")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args, _ = parser.parse_known_args(argv)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    fake = FakeUpstream(models=("chaos-runtime",), reply_tokens=int(os.environ.get(
        "CHAOS_REPLY_TOKENS", "8")), token_delay_ms=float(os.environ.get(
            "CHAOS_TOKEN_DELAY_MS", "25")), host=args.host, port=args.port, strict_models=False)
    app = fake._app

    async def health(scope, receive, send, body) -> None:
        await _send_json(send, 200, {"status": "ok"})

    async def props(scope, receive, send, body) -> None:
        await _send_json(send, 200, {"build_info": "chaos-runtime"})

    app.routes[("GET", "/health")] = health
    app.routes[("GET", "/props")] = props
    app._paths = {p for _, p in app.routes}
    fake.serve_forever()


def runtime_script(directory: Path) -> Path:
    """An executable that llama-server's supervisor can start: execs the stand-in."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "llama-server"
    script.write_text(f"#!/bin/sh\ncd '{REPO}'\nexec '{sys.executable}' -m tests.chaos runtime \"$@\"\n")
    script.chmod(0o755)
    return script


# -- processes ----------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(p) for p in (task / "children").read_text().split()]
    except OSError:
        pass
    return out


def descendants(pid: int) -> set[int]:
    seen: set[int] = set()
    todo = [pid]
    while todo:
        for child in children(todo.pop()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def environ_has(pid: int, needle: bytes) -> bool:
    try:
        return needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


# -- the platform -------------------------------------------------------------------------


class ChaosPlatform:
    """`nexus up` as a process on random ports, with the runtime stand-in."""

    def __init__(self, data_dir: Path, **env: str) -> None:
        self.data_dir = data_dir.resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.pg_port = free_port()
        self.admin_key = "admin-chaos-" + uuid.uuid4().hex
        base = {k: v for k, v in os.environ.items()
                if k not in ("NATS_URL", "DATABASE_URL") and not k.startswith(("NEXUS_", "OTEL_"))}
        if "NEXUS_CACHE_DIR" in os.environ:
            base["NEXUS_CACHE_DIR"] = os.environ["NEXUS_CACHE_DIR"]
        self.env = {
            **base,
            "PYTHONUNBUFFERED": "1",
            "NEXUS_DATA_DIR": str(self.data_dir),
            "NEXUS_HTTP_PORT": str(self.http_port),
            "NEXUS_NATS_PORT": str(free_port()),
            "NEXUS_NATS_MONITOR_PORT": str(free_port()),
            "NEXUS_PG_PORT": str(self.pg_port),
            "NEXUS_ADMIN_KEY": self.admin_key,
            "NEXUS_LLAMA_SERVER_BIN": str(runtime_script(self.data_dir / "bin")),
            "NEXUS_RUNTIME_MAX_RESTARTS": "100000",
            "NEXUS_RUNTIME_RESTART_BACKOFF_S": "0.2",
            "NEXUS_RESERVATION_TTL_S": str(RESERVATION_TTL_S),
            "NEXUS_BUDGET_SWEEP_S": "1",
            "NEXUS_PROJECTION_POLL_S": "0.5",
            "NEXUS_HEARTBEAT_INTERVAL_S": "1",
            # agent runs taken over soon after their owner died; downloads slow enough to
            # be in flight at a kill, failed as stalled soon after their node died
            "NEXUS_RUN_LEASE_S": "3", "NEXUS_RUN_SCAN_S": "0.5",
            "NEXUS_ORCHESTRATOR_LOST_AFTER_S": "3",
            "NEXUS_FAKE_GPU_MEMORY_GIB": "8",
            "NEXUS_MODEL_PULL_RATE_BPS": str(DOWNLOAD_BPS),
            "NEXUS_MODEL_STALL_S": "6", "NEXUS_MODEL_PROGRESS_INTERVAL_S": "0.25",
            **env,
        }
        self.headers = {"Authorization": f"Bearer {self.admin_key}"}
        self.api = f"http://127.0.0.1:{self.http_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.out_path = self.data_dir.parent / f"{self.data_dir.name}-up.out"

    # lifecycle
    def start(self, timeout: float = 120) -> ChaosPlatform:
        out = open(self.out_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "up"], cwd=REPO,
                                     env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     preexec_fn=die_with_parent)
        out.close()
        wait_until(self.answers, timeout, 0.3, "the platform to answer a chat call")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                stop_process(self.proc, 0, signal.SIGKILL)

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""

    def unhandled(self) -> list[str]:
        """The services' 'unhandled error' log records (each a 500): trace id, path, the
        exception's last line; [] when none."""
        out = []
        for log in sorted((self.data_dir / "logs").glob("*.log")):
            for line in log.read_text(errors="replace").splitlines():
                if '"unhandled error"' not in line:
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                exc = (record.get("exc") or "").strip()
                out.append(f"{log.stem} {record.get('ts')} trace {record.get('trace_id')} "
                           f"{record.get('path')}: {exc or '?'}")
        return out

    # where things are
    def state(self) -> dict:
        return json.loads((self.data_dir / "up.json").read_text())

    def database_url(self) -> str:
        from urllib.parse import quote

        password = (self.data_dir / "postgres" / "password").read_text().strip()
        return (f"postgresql://postgres:{quote(password, safe='')}@127.0.0.1:{self.pg_port}"
                f"/nexus?sslmode=disable")

    def runtime_pids(self) -> list[int]:
        node = self.state()["services"].get("node")
        return [p for p in children(node) if "tests.chaos runtime" in cmdline(p)] if node else []

    def pid_of(self, kind: str) -> int | None:
        if kind == "runtime":
            pids = self.runtime_pids()
            return pids[0] if pids else None
        state = self.state()
        return state["servers"].get(kind) or state["services"].get(kind)

    def kill(self, kind: str) -> int:
        pid = wait_until(lambda: self.pid_of(kind), 60, 0.1, f"a running {kind}")
        assert pid in descendants(self.proc.pid), f"{kind} {pid} is not ours"
        os.kill(pid, signal.SIGKILL)
        return pid

    # answers
    def answers(self) -> bool:
        """A chat call (to the probe session, not the load's) gets its answer."""
        try:
            resp = httpx.post(f"{self.api}/v1/chat/completions", timeout=10, headers=self.headers,
                              json={"model": "default", "max_tokens": 8,
                                    "messages": [{"role": "user", "content": "probe"}]})
            return resp.status_code == 200
        except httpx.HTTPError:
            return False

    def session(self, **budget: int) -> str:
        resp = httpx.post(f"{self.api}/v1/sessions", headers=self.headers, timeout=30,
                          json={"budget": budget} if budget else {})
        assert resp.status_code == 201, resp.text
        return resp.json()["session_id"]

    # the process tree
    def tree_problems(self) -> list[str]:
        """Orphans (processes of this platform outside the supervisor's tree) and a
        tree with other than one of each kind; [] when all is well."""
        assert self.proc is not None
        ours = descendants(self.proc.pid) | {self.proc.pid}
        needle = f"NEXUS_DATA_DIR={self.data_dir}".encode()
        problems = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if pid in ours or pid == os.getpid() or zombie(pid):
                continue
            if environ_has(pid, needle):
                problems.append(f"orphan {pid}: {cmdline(pid)[:120]}")
        state = self.state()
        count = Counter()
        runtimes: Counter = Counter()
        for pid in ours:
            line = cmdline(pid)
            for name in SERVICES:
                if f"services.{name}.main" in line and not zombie(pid):
                    count[name] += 1
            if "tests.chaos runtime" in line and not zombie(pid):
                count["runtime"] += 1  # one per model the node serves (the bundled one,
                alias = line.split("--alias ", 1)[-1].split(" ", 1)[0]  # and each installed)
                runtimes[alias] += 1
        for kind in ("nats", "postgres"):
            pid = state["servers"].get(kind)
            count[kind] = 1 if pid in ours and pid_alive(pid) and not zombie(pid) else 0
        if count["runtime"] and all(n == 1 for n in runtimes.values()):
            count["runtime"] = 1
        problems += [f"{count[k]} {k} processes in the tree" for k in KINDS if count[k] != 1]
        problems += [f"{n} runtimes for {alias}" for alias, n in runtimes.items() if n != 1]
        return problems


# -- the load -----------------------------------------------------------------------------


@dataclass
class Outcome:
    acked: list[str] = field(default_factory=list)  # call ids the client saw answered
    acked_keys: dict[str, str] = field(default_factory=dict)  # idempotency key -> call id
    statuses: Counter = field(default_factory=Counter)
    hung: int = 0
    replays: int = 0
    twice: list[str] = field(default_factory=list)  # keys answered by two different calls


class Load:
    """Worker threads making chat calls (every other one streamed), each with an
    Idempotency-Key, retried with the same key after a failure, in their own sessions."""

    def __init__(self, platform: ChaosPlatform, workers: int = 4, timeout_s: float = 30) -> None:
        self.platform = platform
        self.timeout_s = timeout_s
        self.outcome = Outcome()
        self.lock = threading.Lock()
        self.running = threading.Event()
        self.stopping = threading.Event()
        self.idle = [threading.Event() for _ in range(workers)]
        self.sessions = [platform.session(limit_tokens=TIGHT_BUDGET_TOKENS if i == 0 else 10**9)
                         for i in range(workers)]
        self.threads = [threading.Thread(target=self._work, args=(i,), daemon=True)
                        for i in range(workers)]

    def start(self) -> Load:
        self.running.set()
        for t in self.threads:
            t.start()
        return self

    def pause(self, timeout: float = 120) -> None:
        """Stop starting calls and wait for those in flight (and their retries) to end."""
        self.running.clear()
        for idle in self.idle:
            assert idle.wait(timeout), "a load worker did not finish its call"

    def resume(self) -> None:
        for idle in self.idle:
            idle.clear()
        self.running.set()

    def close(self) -> None:
        self.stopping.set()
        self.running.set()
        for t in self.threads:
            t.join(60)

    def _work(self, i: int) -> None:
        rng = random.Random(i)
        client = httpx.Client(timeout=httpx.Timeout(self.timeout_s, connect=5))
        n = 0
        while not self.stopping.is_set():
            if not self.running.is_set():
                self.idle[i].set()
                self.running.wait()
                continue
            n += 1
            key = f"chaos-{i}-{n}-{uuid.uuid4().hex[:8]}"
            stream = n % 2 == 0
            for attempt in range(4):  # the first try, then retries with the same key
                status, call_id = self._call(client, i, key, stream, attempt)
                if call_id:
                    break
                if status in (402, 403, 422, 429):  # denied: final, but don't hammer
                    time.sleep(0.3)
                    break
                time.sleep(0.3 + rng.random() * 0.5)
        client.close()
        self.idle[i].set()

    def _call(self, client: httpx.Client, i: int, key: str, stream: bool,
              attempt: int) -> tuple[int | str, str | None]:
        headers = {**self.platform.headers, "Idempotency-Key": key,
                   "X-Nexus-Session": self.sessions[i]}
        body = {"model": "default", "max_tokens": 16, "stream": stream,
                "messages": [{"role": "user", "content": f"chaos call {key}"}]}
        status: int | str
        call_id = None
        try:
            with client.stream("POST", f"{self.platform.api}/v1/chat/completions",
                               headers=headers, json=body) as resp:
                status = resp.status_code
                if status == 200:
                    if stream:
                        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
                        finished = any('"finish_reason":"' in line.replace(" ", "")
                                       for line in lines) and lines[-1] == "data: [DONE]"
                        failed = any('"error"' in line for line in lines)
                        if finished and not failed:
                            call_id = resp.headers.get("x-nexus-call-id")
                        else:
                            status = "stream-failed"
                    else:
                        resp.read()
                        if resp.json().get("choices"):
                            call_id = resp.headers.get("x-nexus-call-id")
                    if call_id and resp.headers.get("idempotent-replayed") == "true":
                        with self.lock:
                            self.outcome.replays += 1
                else:
                    resp.read()
        except httpx.TimeoutException:
            status = "timeout"
            with self.lock:
                self.outcome.hung += 1
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        with self.lock:
            self.outcome.statuses[status] += 1
            if call_id:
                previous = self.outcome.acked_keys.setdefault(key, call_id)
                if previous != call_id:  # one key, two calls: a retry spent twice
                    self.outcome.twice.append(key)
                elif call_id not in self.outcome.acked:
                    self.outcome.acked.append(call_id)
        return status, call_id


# -- agent runs, tool calls and downloads in flight ---------------------------------------


class _Bumps(BaseHTTPRequestHandler):
    """The side-effecting tool's endpoint: counts each execution per key, slowly."""

    hits: ClassVar[Counter] = Counter()
    lock = threading.Lock()

    def do_POST(self) -> None:
        key = self.path.rsplit("/", 1)[-1].split("?")[0]
        with _Bumps.lock:
            _Bumps.hits[key] += 1
        time.sleep(TOOL_DELAY_S)
        body = json.dumps({"bumped": key}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class AgenticOutcome:
    runs: dict[str, str] = field(default_factory=dict)  # run id -> the bump key it uses
    run_failures: Counter = field(default_factory=Counter)  # failed runs by error
    approvals: Counter = field(default_factory=Counter)  # reason -> answered
    invokes: Counter = field(default_factory=Counter)  # client outcomes of tool calls
    invoked: list[str] = field(default_factory=list)  # keys of acknowledged tool calls
    downloads: Counter = field(default_factory=Counter)  # task outcomes
    twice: list[str] = field(default_factory=list)  # side-effecting keys that ran twice
    failure_example: str = ""  # the last run that did not finish: why


class AgenticLoad:
    """Beside the chat load: agent runs (one side-effecting tool call each, then an
    answer), plain calls of the same tool (`POST .../tools/{name}/invoke`, each with an
    Idempotency-Key, retried with it after a failure, honouring Retry-After), and one
    model download per round, all in flight when a process is killed.

    The human in the loop answers approvals: yes to a tool that asks by definition, no to
    a side-effecting call whose outcome a crash made unknown (so it never runs twice)."""

    TOOL = "chaos-bump"

    def __init__(self, platform: ChaosPlatform) -> None:
        self.platform = platform
        self.outcome = AgenticOutcome()
        self.lock = threading.Lock()
        self.running = threading.Event()
        self.stopping = threading.Event()
        self.idle = [threading.Event(), threading.Event()]
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Bumps)
        self.server.handle_error = lambda *_: None  # a caller killed mid-call: not news
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        api, h = platform.api, platform.headers
        port = self.server.server_address[1]
        tool = httpx.post(f"{api}/v1/tools", headers=h, timeout=30, json={
            "name": self.TOOL, "kind": "http", "effect": "side_effecting",
            "parameters": {"type": "object", "required": ["key"],
                           "properties": {"key": {"type": "string"}}},
            "http": {"method": "POST", "url_template": f"http://127.0.0.1:{port}/bump/{{key}}"},
            "limits": {"timeout_s": 20}})
        assert tool.status_code == 201, tool.text
        agent = ("---\nname: chaos-agent\ndescription: calls the side-effecting tool once\n"
                 f"tools: [{self.TOOL}]\nmodel: default\n---\nUse the tool.\n")
        made = httpx.post(f"{api}/v1/agents", headers=h, json={"markdown": agent}, timeout=30)
        assert made.status_code == 201, made.text
        session = httpx.post(f"{api}/v1/sessions", headers=h, timeout=30, json={
            "policy_rules": {"tools_allow": ["*"]}, "budget": {"limit_usd": 1000}})
        assert session.status_code == 201, session.text
        self.session = session.json()["session_id"]
        self.node_id = wait_until(lambda: next(iter(n["node_id"] for n in httpx.get(
            f"{api}/v1/nodes", headers=h, timeout=10).json()["nodes"]), None), 60, 0.3, "a node")
        self.model = import_model(platform)
        self.tasks: list[str] = []
        self.ended: set[str] = set()
        self.threads = [threading.Thread(target=self._work, args=(i,), daemon=True)
                        for i in range(2)]

    def start(self) -> AgenticLoad:
        self.running.set()
        for t in self.threads:
            t.start()
        return self

    def pause(self, timeout: float = 120) -> None:
        self.running.clear()
        for idle in self.idle:
            assert idle.wait(timeout), "an agentic load worker did not finish its call"

    def resume(self) -> None:
        for idle in self.idle:
            idle.clear()
        self.running.set()

    def close(self) -> None:
        self.stopping.set()
        self.running.set()
        for t in self.threads:
            t.join(60)
        self.server.shutdown()

    def _work(self, i: int) -> None:
        client = httpx.Client(timeout=httpx.Timeout(30, connect=5), headers=self.platform.headers)
        while not self.stopping.is_set():
            if not self.running.is_set():
                self.idle[i].set()
                self.running.wait()
                continue
            try:
                (self._start_run if i == 0 else self._invoke)(client)
            except httpx.HTTPError:
                time.sleep(0.5)
        client.close()
        self.idle[i].set()

    def _start_run(self, client: httpx.Client) -> None:
        """Start a run (retried with its Idempotency-Key); don't wait for it."""
        key = uuid.uuid4().hex
        script = json.dumps({"steps": [[{"name": self.TOOL, "arguments": {"key": key}}]],
                             "answer": "bumped: {last_tool}"})
        for _ in range(6):
            try:
                resp = client.post(f"{self.platform.api}/v1/sessions/{self.session}/runs",
                                   headers={"Idempotency-Key": key},
                                   json={"agent": "chaos-agent", "input": f"go FAKE_AGENT={script}"})
            except httpx.HTTPError:
                time.sleep(1)
                continue
            if resp.status_code == 202:
                with self.lock:
                    self.outcome.runs[resp.json()["run_id"]] = key
                break
            time.sleep(1)
        time.sleep(1.5)  # a few runs per round, not hundreds

    def _invoke(self, client: httpx.Client) -> None:
        """One tool call: retried with the same Idempotency-Key until it has an answer."""
        key = "inv-" + uuid.uuid4().hex
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            try:
                resp = client.post(
                    f"{self.platform.api}/v1/sessions/{self.session}/tools/{self.TOOL}/invoke",
                    headers={"Idempotency-Key": key}, json={"arguments": {"key": key}})
                status: int | str = resp.status_code
            except httpx.HTTPError as exc:
                resp, status = None, type(exc).__name__
            with self.lock:
                self.outcome.invokes[status] += 1
                if status == 200:
                    self.outcome.invoked.append(key)
            if status in (200, 202, 400, 403, 404, 422):
                break
            wait = resp.headers.get("retry-after") if resp is not None else None
            time.sleep(min(float(wait), 5) if wait and wait.isdigit() else 0.5)
        time.sleep(0.3)

    # per round
    def pull(self) -> None:
        """A download of the round's model onto the node (removed first if there)."""
        api, h = self.platform.api, self.platform.headers
        for _ in range(20):
            try:
                httpx.delete(f"{api}/v1/nodes/{self.node_id}/models/{self.model}", headers=h,
                             timeout=30)
                resp = httpx.post(f"{api}/v1/nodes/{self.node_id}/models/pull", headers=h,
                                  timeout=30, json={"model": self.model})
            except httpx.HTTPError:
                time.sleep(1)
                continue
            if resp.status_code == 202:
                self.tasks.append(resp.json()["task_id"])
                return
            time.sleep(1)
        raise AssertionError(f"could not start a download: {resp.status_code} {resp.text}")

    def settle(self, timeout: float = 90) -> dict:
        """After the load paused: answer approvals until every run has ended, and every
        download task has ended (completed, or failed with a reason, or cancelled)."""
        api, h = self.platform.api, self.platform.headers
        started = time.monotonic()
        pending_runs = set(self.outcome.runs) - self.ended
        pending_tasks = set(self.tasks)
        while pending_runs or pending_tasks:
            assert time.monotonic() - started < timeout, (
                f"still running after {timeout:.0f}s: runs {[self._run(r) for r in pending_runs][:3]}"
                f", tasks {[self._task(t) for t in pending_tasks][:3]}")
            for run_id in list(pending_runs):
                run = self._run(run_id)
                if run is None:
                    continue
                if run_id in self.ended:
                    pending_runs.discard(run_id)
                    continue
                for pending in run["pending_approvals"]:
                    yes = pending["reason"] == "needs_approval"
                    answer = httpx.post(f"{api}/v1/runs/{run_id}/approvals", headers=h, timeout=30,
                                        json={"tool_call_id": pending["tool_call_id"],
                                              "decision": "approve" if yes else "reject"})
                    if answer.status_code == 200:
                        self.outcome.approvals[pending["reason"]] += 1
                if run["status"] in ("finished", "failed", "cancelled"):
                    pending_runs.discard(run_id)
                    self.ended.add(run_id)
                    if run["status"] != "finished":
                        self.outcome.run_failures[f"{run['status']}: {run.get('error')}"] += 1
                        self.outcome.failure_example = f"{run.get('error')}: {run.get('detail')}"
            for task_id in list(pending_tasks):
                task = self._task(task_id)
                if task and task["status"] in ("completed", "failed", "cancelled"):
                    assert task["status"] != "failed" or task["error"], f"failed without a reason: {task}"
                    self.outcome.downloads[task["status"] if task["status"] != "failed"
                                           else f"failed: {task['error']}"] += 1
                    pending_tasks.discard(task_id)
            time.sleep(0.3)
        self.tasks.clear()
        return {"settled_s": time.monotonic() - started}

    def _run(self, run_id: str) -> dict | None:
        try:
            resp = httpx.get(f"{self.platform.api}/v1/runs/{run_id}",
                             headers=self.platform.headers, timeout=10)
            return resp.json() if resp.status_code == 200 else None
        except httpx.HTTPError:
            return None

    def _task(self, task_id: str) -> dict | None:
        try:
            resp = httpx.get(f"{self.platform.api}/v1/tasks/{task_id}",
                             headers=self.platform.headers, timeout=10)
            return resp.json() if resp.status_code == 200 else None
        except httpx.HTTPError:
            return None


def import_model(platform: ChaosPlatform) -> str:
    """A tiny real GGUF put into the platform's model store (`nexus models import`)."""
    from shared.infra.gguf import write_tiny

    path = write_tiny(platform.data_dir / "chaos-tiny.gguf", payload_bytes=DOWNLOAD_BYTES)
    done = subprocess.run([sys.executable, "-m", "ops.cli", "models", "import", str(path),
                           "--name", "chaos-tiny"], cwd=REPO, env=platform.env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return "chaos-tiny"


async def check_agentic(database_url: str, load: AgenticLoad) -> None:
    """Every run ended exactly once; no side-effecting call ran twice without a yes."""
    from shared.infra.eventstore.store import create_pool

    pool = await create_pool(database_url, max_size=1)
    try:
        rows = await pool.fetch(
            "SELECT data ->> 'run_id' AS run_id, count(*) AS n FROM events"
            " WHERE type = ANY($1::text[]) AND data ->> 'run_id' = ANY($2::text[]) GROUP BY 1",
            list(TERMINAL_RUN), list(load.outcome.runs))
        ends = {r["run_id"]: r["n"] for r in rows}
        wrong = {r: ends.get(r, 0) for r in load.outcome.runs if ends.get(r, 0) != 1}
        assert not wrong, f"runs without exactly one terminal event: {list(wrong.items())[:5]}"
    finally:
        await pool.close()
    with _Bumps.lock:  # the human never said yes to running one again
        twice = [k for k, n in _Bumps.hits.items() if n > 1]
    load.outcome.twice = twice
    assert not twice, f"side-effecting calls ran twice without an approval: {twice}"



# -- invariants ---------------------------------------------------------------------------


async def _table(conn, table: str) -> list[tuple]:
    rows = await conn.fetch(f"SELECT * FROM {table}")  # our own table names
    return sorted((tuple(r) for r in rows), key=repr)


async def _explain(pool, budget_ids: list[str]) -> list:
    """What the store says about budgets: their events and the projection's view."""
    out = []
    for budget_id in budget_ids:
        events = await pool.fetch("SELECT position, type, data::text FROM events"
                                  " WHERE stream_id = $1 ORDER BY stream_version", budget_id)
        state = await pool.fetchval("SELECT state::text FROM budgets WHERE budget_id = $1",
                                    budget_id)
        checkpoint = await pool.fetchval(
            "SELECT position FROM projection_checkpoints WHERE name = 'budgets'")
        out.append({"budget": budget_id, "checkpoint": checkpoint, "state": state,
                    "events": [tuple(e) for e in events][-4:]})
    return out


async def check_store(database_url: str, acked: list[str], reservation_wait_s: float) -> dict:
    """The invariants against the real store; raises AssertionError naming the broken one.
    Returns figures (how long the open reservations took to close)."""
    from services.orchestrator.read_models import PROJECTIONS
    from shared.infra.eventstore import EventStore, ProjectionRunner
    from shared.infra.eventstore.store import create_pool

    pool = await create_pool(database_url, max_size=3)
    try:
        # 1. nothing acknowledged is lost
        rows = await pool.fetch(
            "SELECT data ->> 'call_id' AS call_id, type, count(*) AS n FROM events"
            " WHERE type IN ('LLMCallCompleted', 'BudgetCommitted', 'MessageAppended')"
            " AND data ->> 'call_id' = ANY($1::text[]) GROUP BY 1, 2", acked)
        found: dict[str, Counter] = defaultdict(Counter)
        for r in rows:
            found[r["call_id"]][r["type"]] += r["n"]
        lost = {c: dict(found[c]) for c in acked
                if found[c]["LLMCallCompleted"] < 1 or found[c]["BudgetCommitted"] < 1
                or found[c]["MessageAppended"] < 2}
        assert not lost, f"{len(lost)} acknowledged calls lack their events: {list(lost.items())[:5]}"

        # 2. no reservation left open (committed, released or swept after the TTL)
        started = time.monotonic()
        while True:
            open_ = await pool.fetch("SELECT budget_id, open_reservations FROM budgets"
                                     " WHERE open_reservations > 0")
            if not open_:
                break
            if time.monotonic() - started > reservation_wait_s:
                raise AssertionError(f"reservations still open after {reservation_wait_s:.0f}s "
                                     f"(now {time.time():.1f}): "
                                     f"{await _explain(pool, [r['budget_id'] for r in open_])}")
            await asyncio.sleep(0.2)
        reservations_closed_s = time.monotonic() - started

        # 3. no budget overspent
        over = await pool.fetch(
            "SELECT budget_id, committed_tokens, limit_tokens, committed_micro_usd, limit_micro_usd"
            " FROM budgets WHERE committed_tokens > limit_tokens"
            " OR committed_micro_usd > limit_micro_usd")
        assert not over, f"budgets overspent: {[tuple(r) for r in over]}"

        # 4. every projection equals its rebuild (compared while the head stood still)
        runner = ProjectionRunner(EventStore(pool), PROJECTIONS)
        for projection in PROJECTIONS:
            for _try in range(20):
                head = await runner.store.head()
                deadline = time.monotonic() + 30
                while await runner.pending(projection.name):
                    assert time.monotonic() < deadline, f"projection {projection.name} is stuck"
                    await asyncio.sleep(0.1)
                async with pool.acquire() as conn:
                    live = {t: await _table(conn, t) for t in projection.tables}
                await runner.rebuild(projection.name)
                async with pool.acquire() as conn:
                    rebuilt = {t: await _table(conn, t) for t in projection.tables}
                if await runner.store.head() != head:
                    continue  # an event arrived meanwhile: compare again
                assert live == rebuilt, f"projection {projection.name} differs from its rebuild"
                break
            else:
                raise AssertionError(f"{projection.name}: the log never stood still")
        return {"reservations_closed_s": reservations_closed_s}
    finally:
        await pool.close()


# -- rounds -------------------------------------------------------------------------------


@dataclass
class Report:
    rounds: int = 0
    recovery_s: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    reservations_s: list[float] = field(default_factory=list)
    outcome: Outcome | None = None
    agentic: AgenticOutcome | None = None
    settled_s: list[float] = field(default_factory=list)
    unhandled: list[str] = field(default_factory=list)  # the services' 500s, from their logs

    def lines(self) -> list[str]:
        o = self.outcome or Outcome()
        out = [f"chaos: {self.rounds} rounds, {len(o.acked)} acknowledged calls, 0 lost, "
               f"{o.replays} idempotent replays, {o.hung} hung; client outcomes "
               f"{dict(o.statuses)}"]
        for kind, times in self.recovery_s.items():
            out.append(f"  {kind:<12} answers again after kill -9: median {statistics.median(times):.1f}s,"
                       f" max {max(times):.1f}s ({len(times)} kills)")
        if self.reservations_s:
            out.append(f"  open reservations closed after the load paused: max "
                       f"{max(self.reservations_s):.1f}s (TTL {RESERVATION_TTL_S:g}s)")
        if (a := self.agentic) is not None:
            out.append(f"  agent runs: {len(a.runs)} started, each ended exactly once "
                       f"(not finished: {dict(a.run_failures) or 'none'}); approvals answered "
                       f"{dict(a.approvals) or 'none'}; side-effecting calls run twice: "
                       f"{len(a.twice)}" + (f"; e.g. {a.failure_example[:300]}"
                                            if a.failure_example else ""))
            out.append(f"  tool calls: {len(a.invoked)} acknowledged; client outcomes "
                       f"{dict(a.invokes)}")
            out.append(f"  downloads: {dict(a.downloads)}; runs and downloads ended after "
                       f"the load paused within {max(self.settled_s, default=0):.1f}s")
        out.append(f"  unhandled errors (500s) in the services' logs: {len(self.unhandled)}")
        out += [f"    {line.splitlines()[0]} ... {line.splitlines()[-1]}" for line in self.unhandled[:10]]
        out += [f"  the first in full:\n{self.unhandled[0]}"] if self.unhandled else []
        return out


def run_rounds(platform: ChaosPlatform, kinds: list[str], *, settle_s: float = 2.0,
               recover_bound_s: float = 90.0, say=print) -> Report:
    """Kill each kind of `kinds` in order under load; check the invariants after each."""
    report = Report()
    load = Load(platform).start()
    agentic = AgenticLoad(platform).start()
    try:
        for n, kind in enumerate(kinds, 1):
            agentic.pull()
            time.sleep(settle_s)  # calls, runs, tool calls, a download in flight at the kill
            killed_at = time.monotonic()
            pid = platform.kill(kind)
            wait_until(platform.answers, recover_bound_s, 0.1, f"an answer after killing {kind}")
            recovered = time.monotonic() - killed_at
            report.recovery_s[kind].append(recovered)
            time.sleep(settle_s)
            load.pause()
            agentic.pause()
            report.settled_s.append(agentic.settle()["settled_s"])
            asyncio.run(check_agentic(platform.database_url(), agentic))
            figures = asyncio.run(check_store(platform.database_url(), list(load.outcome.acked),
                                              RESERVATION_TTL_S + 15))
            report.reservations_s.append(figures["reservations_closed_s"])
            assert not load.outcome.twice, f"idempotency keys spent twice: {load.outcome.twice}"
            try:
                wait_until(lambda: not platform.tree_problems(), 30, 0.2, "no orphan")
            except AssertionError:
                raise AssertionError(f"after killing {kind}: {platform.tree_problems()}") from None
            report.rounds = n
            report.outcome = load.outcome
            say(f"round {n}: killed {kind} ({pid}), answering again after {recovered:.1f}s; "
                f"{len(load.outcome.acked)} acknowledged so far, none lost; "
                f"{len(agentic.outcome.runs)} runs ended once, "
                f"{len(agentic.outcome.invoked)} tool calls, downloads "
                f"{dict(agentic.outcome.downloads)}")
            load.resume()
            agentic.resume()
    finally:
        load.close()
        agentic.close()
    report.outcome = load.outcome
    report.agentic = agentic.outcome
    report.unhandled = platform.unhandled()
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["runtime"]:
        runtime_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m tests.chaos",
                                     description="kill -9 each process kind in turn under load")
    parser.add_argument("--rounds", type=int, default=60, help="kills in all (kinds in turn)")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--seed", type=int, default=None, help="shuffle the kinds each cycle")
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    order: list[str] = []
    rng = random.Random(args.seed)
    while len(order) < args.rounds:
        cycle = list(kinds)
        if args.seed is not None:
            rng.shuffle(cycle)
        order += cycle
    tmp = Path(tempfile.mkdtemp(prefix="nexus-chaos-"))
    platform = ChaosPlatform(tmp / "nexus")
    started = time.monotonic()
    try:
        platform.start()
        print(f"nexus up answering after {time.monotonic() - started:.1f}s", flush=True)
        report = run_rounds(platform, order[:args.rounds], say=lambda s: print(s, flush=True))
    except BaseException:
        print(platform.output()[-4000:], file=sys.stderr)
        print(f"logs kept in {platform.data_dir / 'logs'}", file=sys.stderr)
        raise
    finally:
        platform.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(report.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

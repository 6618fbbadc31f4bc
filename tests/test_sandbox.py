"""The tool sandbox contains what a tool does, and says why it stopped it.

Each hostile program runs in a real bubblewrap sandbox next to a normal call started at
the same time: the hostile one ends within its limit with its reason named, the normal
one completes unaffected, and nothing of the hostile one is left running. Secrets
outside the workspace stay unreadable, nothing outside the workspace is writable, there
is no network but the egress proxy's allowlist, and never the node's NATS or Postgres.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import pytest

from services.node import sandbox_exec
from services.node.egress import host_allowed
from services.node.sandbox import Sandbox, SandboxResult
from shared.contracts.messages import ToolLimits

TIGHT = ToolLimits(timeout_s=2.0, cpu_s=1.0, memory_mb=128, max_output_bytes=64 * 1024,
                   processes=32)
NORMAL = ToolLimits(timeout_s=20.0, cpu_s=10.0, memory_mb=256)
SECRET = f"node-secret-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory, infra) -> Sandbox:
    nats, pg = urlsplit(infra.nats_url), urlsplit(infra.database_url)
    return Sandbox(tmp_path_factory.mktemp("sandbox"),
                   denied=(f"{nats.hostname}:{nats.port}", f"{pg.hostname}:{pg.port}"))


@pytest.fixture
def workspaces(tmp_path: Path) -> tuple[Path, Path, Path]:
    """This session's workspace, another session's, and the node's credentials file."""
    mine, other = tmp_path / "ws-mine", tmp_path / "ws-other"
    mine.mkdir()
    other.mkdir()
    (mine / "notes.txt").write_text("mine\n")
    (other / "private.txt").write_text(SECRET)
    creds = tmp_path / "node-credentials.json"
    creds.write_text(f'{{"nats_password": "{SECRET}"}}')
    creds.chmod(0o600)
    return mine, other, creds


def py(sandbox: Sandbox, code: str, *args: str) -> list[str]:
    return [*sandbox.python, "-c", code, *args]


def leftovers(marker: str) -> list[int]:
    """Host pids whose command line carries `marker` (a run's processes still alive)."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    out.append(int(pid))
            except OSError:
                pass
    return out


async def contained(sandbox: Sandbox, argv: list[str], limits: ToolLimits = TIGHT,
                    **kw) -> SandboxResult:
    """Run a hostile argv beside a normal call; the normal call must be unaffected."""
    marker = f"marker-{uuid.uuid4().hex}"
    hostile, normal = await asyncio.gather(
        sandbox.run([*argv, marker], limits=limits, **kw),
        sandbox.run(py(sandbox, "print(sum(range(1000)))"), limits=NORMAL))
    assert (normal.outcome, normal.stdout) == ("ok", b"499500\n"), normal
    assert leftovers(marker) == [], "a sandboxed process outlived its run"
    return hostile


async def test_a_tool_runs_as_an_unprivileged_user_with_only_its_workspace(
        sandbox: Sandbox, workspaces) -> None:
    mine, _, _ = workspaces
    code = ("import os; print(os.getuid(), os.getgid()); print(sorted(os.listdir('/')));"
            "print(open('notes.txt').read().strip()); open('out.txt', 'w').write('done');"
            "print(sorted(os.environ))")
    r = await sandbox.run(py(sandbox, code), limits=NORMAL, workspace=mine, writable=True,
                          env={"TOOL_ARG": "1"})
    assert r.outcome == "ok", r
    uid_line, root, notes, env = r.stdout.decode().splitlines()
    assert uid_line == "1000 1000"
    assert "workspace" in root and "root" not in root and "home" not in root
    assert notes == "mine"
    assert "TOOL_ARG" in env and "NATS_URL" not in env and "DATABASE_URL" not in env
    assert (mine / "out.txt").read_text() == "done"
    owner = (mine / "out.txt").stat().st_uid
    assert owner >= sandbox_exec.UID_BASE if os.geteuid() == 0 else owner == os.geteuid()
    assert r.cpu_s > 0 and r.peak_memory_mb > 1 and r.duration_ms > 0


async def test_a_fork_bomb_is_held_to_its_process_limit_and_killed_at_the_deadline(
        sandbox: Sandbox) -> None:
    bomb = ("import os, time\nwhile True:\n  try:\n    os.fork()\n  except OSError as e:\n"
            "    print('fork failed', e.errno, flush=True); time.sleep(0.05)")
    r = await contained(sandbox, py(sandbox, bomb))
    assert r.outcome in ("timeout", "cpu"), r
    assert b"fork failed 11" in r.stdout     # EAGAIN: RLIMIT_NPROC, not the host's pid table


async def test_a_memory_bomb_stops_at_the_memory_limit(sandbox: Sandbox) -> None:
    r = await contained(sandbox, py(sandbox, "x = []\nwhile True: x.append(bytearray(8 << 20))"))
    assert (r.outcome, r.detail) == ("memory", "memory limit 128 MiB"), r
    assert r.peak_memory_mb <= 128


async def test_an_endless_loop_stops_at_the_cpu_limit(sandbox: Sandbox) -> None:
    # a wall deadline far beyond the CPU limit: on a loaded machine the loop may get less
    # than a CPU second in TIGHT's two wall seconds (then the deadline, not the CPU
    # limit, would stop it, and its CPU would go uncounted)
    r = await contained(sandbox, py(sandbox, "while True: pass"),
                        limits=msgspec.structs.replace(TIGHT, timeout_s=120.0))
    assert (r.outcome, r.detail) == ("cpu", "cpu limit 1 s"), r
    assert r.cpu_s >= 0.8     # rusage is tick-accounted; the kernel killed it at 1 s


async def test_a_sleeper_is_killed_at_the_deadline(sandbox: Sandbox) -> None:
    r = await contained(sandbox, ["/bin/sh", "-c", "sleep 1e9 & sleep 1e9", "sh"])
    assert (r.outcome, r.detail) == ("timeout", "timeout after 2 s"), r
    assert r.exit_code is None and r.signal == "SIGKILL"


async def test_kill_minus_one_reaches_only_the_sandbox_itself(sandbox: Sandbox) -> None:
    r = await contained(sandbox, ["/bin/sh", "-c", "sleep 30 & kill -9 -1; echo survived",
                                  "sh"])
    assert r.outcome == "ok" and r.stdout == b"survived\n", r


async def test_a_gigabyte_of_output_is_cut_off_and_counted(sandbox: Sandbox) -> None:
    flood = ("import sys\nb = b'x' * (1 << 20)\nfor _ in range(1024): "
             "sys.stdout.buffer.write(b)")
    r = await contained(sandbox, py(sandbox, flood))
    assert r.outcome == "output", r
    assert r.truncated and len(r.stdout) == TIGHT.max_output_bytes
    assert 8 << 20 < r.output_bytes < 1 << 30


async def test_there_is_no_network_without_an_allowlist(sandbox: Sandbox, infra) -> None:
    nats, pg = urlsplit(infra.nats_url), urlsplit(infra.database_url)
    probe = ("import socket, sys\nfor hp in sys.argv[1:-1]:\n  h, p = hp.rsplit(':', 1)\n"
             "  try:\n    socket.create_connection((h, int(p)), timeout=2); print(hp, 'OPEN')\n"
             "  except OSError as e:\n    print(hp, 'refused', e.errno)")
    targets = [f"{nats.hostname}:{nats.port}", f"{pg.hostname}:{pg.port}", "1.1.1.1:443",
               "8.8.8.8:53"]
    r = await contained(sandbox, py(sandbox, probe, *targets))
    assert r.outcome == "ok", r
    lines = r.stdout.decode().splitlines()
    assert len(lines) == 4 and all("refused" in ln for ln in lines), lines


async def test_secrets_outside_the_workspace_are_unreadable(sandbox: Sandbox,
                                                            workspaces) -> None:
    mine, other, creds = workspaces
    os.environ["NEXUS_TEST_NODE_SECRET"] = SECRET     # in the node's own environment
    try:
        paths = ["/etc/shadow", "/proc/1/environ", str(creds), str(other / "private.txt"),
                 f"/proc/{os.getpid()}/environ", "/proc/self/environ"]
        code = ("import sys\nfor p in sys.argv[1:-1]:\n  try:\n"
                "    print(p, open(p, 'rb').read())\n  except OSError as e:\n"
                "    print(p, 'denied', type(e).__name__)")
        r = await contained(sandbox, py(sandbox, code, *paths), workspace=mine)
    finally:
        del os.environ["NEXUS_TEST_NODE_SECRET"]
    assert r.outcome == "ok", r
    assert SECRET.encode() not in r.stdout + r.stderr
    out = r.stdout.decode()
    for p in ("/etc/shadow", str(creds), str(other / "private.txt")):
        assert f"{p} denied" in out


async def test_nothing_outside_the_workspace_is_writable(sandbox: Sandbox, workspaces,
                                                         tmp_path: Path) -> None:
    mine, other, _ = workspaces
    targets = ["/usr/evil", "/etc/passwd", "/evil", str(other / "evil"),
               str(tmp_path / "evil"), "/workspace/evil"]
    code = ("import sys\nfor p in sys.argv[1:-1]:\n  try:\n    open(p, 'w').write('x')\n"
            "    print(p, 'WROTE')\n  except OSError as e:\n    print(p, 'denied')")
    r = await contained(sandbox, py(sandbox, code, *targets), workspace=mine, writable=False)
    assert r.outcome == "ok", r
    assert "WROTE" not in r.stdout.decode(), r.stdout
    assert not (other / "evil").exists() and not (tmp_path / "evil").exists()
    assert not (mine / "evil").exists()     # the workspace read-only when the tool says so


async def test_seccomp_denies_namespaces_tracing_and_raw_sockets(sandbox: Sandbox) -> None:
    code = ("import ctypes, socket\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "print('unshare', libc.unshare(0x10000000), ctypes.get_errno())\n"
            "print('ptrace', libc.ptrace(16, 1, 0, 0), ctypes.get_errno())\n"
            "for fam, kind in ((socket.AF_INET, socket.SOCK_RAW), (17, socket.SOCK_RAW)):\n"
            "  try:\n    socket.socket(fam, kind); print('raw OPEN')\n"
            "  except OSError as e:\n    print('raw', e.errno)")
    r = await contained(sandbox, py(sandbox, code))
    assert r.stdout.decode().splitlines() == ["unshare -1 1", "ptrace -1 1", "raw 1", "raw 97"]


@pytest.fixture(scope="module")
def web() -> Iterator[int]:
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"hello from the allowed host"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


async def test_the_egress_proxy_lets_only_the_allowlist_through(sandbox: Sandbox, infra,
                                                                web: int) -> None:
    nats = urlsplit(infra.nats_url)
    fetch = ("import sys, urllib.request\nfor u in sys.argv[1:-1]:\n  try:\n"
             "    print(u, urllib.request.urlopen(u, timeout=5).read().decode())\n"
             "  except Exception as e:\n    print(u, 'refused', getattr(e, 'code', e))")
    allowed = f"http://127.0.0.1:{web}/"
    other_host = f"http://localhost:{web}/"
    nats_url = f"http://{nats.hostname}:{nats.port}/"
    r = await contained(sandbox, py(sandbox, fetch, allowed, other_host, nats_url),
                        limits=NORMAL,
                        network=(f"127.0.0.1:{web}", f"{nats.hostname}:{nats.port}"))
    lines = r.stdout.decode().splitlines()
    assert lines == [f"{allowed} hello from the allowed host", f"{other_host} refused 403",
                     f"{nats_url} refused 403"], r
    assert any("node endpoint" in x for x in r.egress_refused)


def test_the_allowlist_matches_host_and_port_exactly() -> None:
    allow = ("api.example.com", "db.example.com:8443", "*.cdn.example.org", "[::1]:9000")
    assert host_allowed(allow, "api.example.com", 443)
    assert host_allowed(allow, "API.example.com.", 80)
    assert not host_allowed(allow, "api.example.com", 22)
    assert not host_allowed(allow, "evil-api.example.com", 443)
    assert not host_allowed(allow, "api.example.com.evil.net", 443)
    assert host_allowed(allow, "db.example.com", 8443)
    assert not host_allowed(allow, "db.example.com", 443)
    assert host_allowed(allow, "img.cdn.example.org", 443)
    assert not host_allowed(allow, "cdn.example.org", 443)
    assert host_allowed(allow, "::1", 9000)
    assert not host_allowed((), "api.example.com", 443)


async def test_a_wrapped_argv_runs_under_the_same_isolation(sandbox: Sandbox) -> None:
    argv = sandbox.wrap(py(sandbox, "import os, socket, sys\nline = sys.stdin.readline()\n"
                                    "try:\n  socket.create_connection(('1.1.1.1', 443), 2)\n"
                                    "  net = 'OPEN'\nexcept OSError:\n  net = 'none'\n"
                                    "print(os.getuid(), net, line.strip(), flush=True)\nwhile True: pass"),
                        limits=TIGHT)
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(b"ping\n"), 30)
    assert out == b"1000 none ping\n"
    assert proc.returncode == 128 + 9     # the endless loop: killed at its cpu limit
    await sandbox.release(argv)


def _slot_free(sandbox: Sandbox, slot: int) -> bool:
    import fcntl
    fd = os.open(os.path.join(sandbox._slots, f"{slot}.lock"), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)   # (releases the probe's own lock, if it got one)
    return True


async def test_a_wrapped_run_cannot_give_its_slot_away(sandbox: Sandbox) -> None:
    """The slot (the run's uid) stays taken while the run lives, whatever the tool does
    to the descriptors it has; `release` frees it."""
    if not sandbox.as_root:
        pytest.skip("slots (a uid per run) exist only when the node runs as root")
    argv = sandbox.wrap(py(sandbox, "import fcntl, os, sys\n"
                                    "for fd in range(3, 1024):\n"
                                    "  try: fcntl.flock(fd, fcntl.LOCK_UN); os.close(fd)\n"
                                    "  except OSError: pass\n"
                                    "print('unlocked', flush=True)\nsys.stdin.readline()"),
                        limits=NORMAL)
    slot = json.loads(argv[-1])["slot"]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"unlocked\n"
        assert not _slot_free(sandbox, slot)
        assert not _slot_free(sandbox, slot)   # nobody else got it meanwhile either
    finally:
        proc.stdin.write(b"done\n")
        await asyncio.wait_for(proc.wait(), 30)
        await sandbox.release(argv)
    assert _slot_free(sandbox, slot)


async def test_a_runs_peak_memory_is_its_own_not_the_nodes(sandbox: Sandbox) -> None:
    """Sandboxes are forked by the small spawner, never by the (large) node process, whose
    size would otherwise be every run's `peak_memory_mb` (ru_maxrss survives exec)."""
    ballast = bytearray(256 << 20)
    for i in range(0, len(ballast), 4096):   # touched: resident in this process
        ballast[i] = 1
    r = await sandbox.run(py(sandbox, "print(1)"), limits=NORMAL)
    assert r.outcome == "ok" and r.stdout == b"1\n", r
    assert r.peak_memory_mb < 64, r.peak_memory_mb
    del ballast

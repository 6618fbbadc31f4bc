"""Child processes that we own: started one way (`spawn`), stopped one way
(`stop_process`: a signal, a bounded wait, then SIGKILL), restarted with one backoff
(`restart_delay`); `ChildServer` is an embedded server built on them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path


try:  # loaded here, in the parent: after fork (and setuid) the child may not read our files
    import ctypes

    _prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
except OSError:
    _prctl = None


def die_with_parent() -> None:
    """In a forked child (preexec_fn): get SIGTERM when the parent dies, even by SIGKILL.

    Linux only (prctl PR_SET_PDEATHSIG); elsewhere a no-op. This is what keeps a
    crashed supervisor or test run from leaving servers behind.
    """
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def spawn(command: Sequence[str], log_path: Path, **popen: object) -> subprocess.Popen[bytes]:
    """Start `command` as our child: stdout and stderr appended to `log_path`, no stdin,
    its own session (Ctrl-C on the terminal reaches only us), SIGTERM when we die.
    `popen` adds to (or overrides) those `subprocess.Popen` arguments."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    options: dict = {"stdin": subprocess.DEVNULL, "start_new_session": True,
                     "preexec_fn": die_with_parent, **popen}
    with open(log_path, "ab") as log:  # the child has its own copy of the descriptor
        return subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, **options)


def stop_processes(procs: Iterable[subprocess.Popen | None], timeout: float = 10.0,
                   sig: int = signal.SIGTERM) -> list[subprocess.Popen]:
    """Stop children together: `sig` to each that runs, then wait for them up to
    `timeout` in all, then SIGKILL (and reap) the rest. Returns the ones killed."""
    procs = [p for p in procs if p is not None]
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(sig)
    deadline = time.monotonic() + timeout
    killed = []
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            killed.append(proc)
    return killed


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0,
                 sig: int = signal.SIGTERM) -> bool:
    """`sig`, wait up to `timeout`, then SIGKILL. True when it stopped by itself."""
    return not stop_processes([proc], timeout, sig)


def kill_process(proc: subprocess.Popen | None) -> None:
    """SIGKILL and reap, as a crash would: no cleanup."""
    stop_process(proc, 0, signal.SIGKILL)


def stop_pid(pid: int, timeout: float = 10.0, sig: int = signal.SIGTERM) -> bool:
    """`stop_process` for a process that is not our child (known by its pid only)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not pid_alive(pid):
        return True
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return False


def restart_delay(restarts: int, first_s: float, max_s: float = 30.0) -> float:
    """Backoff before restart number `restarts + 1`: first_s, doubling, at most max_s."""
    return min(max_s, first_s * 2 ** min(restarts, 30))


class ServerStartError(RuntimeError):
    """A child server did not come up; the message carries the tail of its log."""


class ChildServer:
    """Base for an embedded server: one child process, a log file, a readiness check."""

    name = "server"
    host = "127.0.0.1"

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    # -- to implement -------------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Create/repair the data dir before a start."""

    def popen_kwargs(self) -> dict:
        return {}

    @property
    def log_path(self) -> Path:
        return self.data_dir / f"{self.name}.log"

    # -- lifecycle ----------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.prepare()
        self.proc = spawn(self.command(), self.log_path, **self.popen_kwargs())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"{self.name} exited with code {self.proc.returncode} on start; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if port_open(self.host, self.port) and self.ready():
                return
            time.sleep(0.05)
        self.kill()
        raise ServerStartError(
            f"{self.name} not ready on {self.host}:{self.port} within {timeout:.0f}s; "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def ready(self) -> bool:
        return True

    def stop(self, timeout: float = 15.0) -> None:
        """Graceful stop (`stop_signal`, then SIGKILL after `timeout`)."""
        stop_process(self.proc, timeout, self.stop_signal)

    stop_signal = signal.SIGTERM

    def kill(self) -> None:
        """SIGKILL, as a crash would: no cleanup, stale files stay behind."""
        kill_process(self.proc)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> ChildServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_exit(returncode: int | None) -> tuple[str, int | None, str | None]:
    """A process's exit in words, with its exit code or signal name.

    -4 -> ("signal SIGILL (illegal instruction)", None, "SIGILL"); 1 -> ("exit code 1", 1, None).
    """
    if returncode is None:
        return "exited", None, None
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}", None, str(-returncode)
        words = signal.strsignal(-returncode) or name
        return f"signal {name} ({words.lower()})", None, name
    return f"exit code {returncode}", returncode, None

"""A server running as a child process that we own."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO


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
        self._log: IO[bytes] | None = None

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
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C on the terminal reaches the supervisor, not us
            preexec_fn=die_with_parent,
            **self.popen_kwargs(),
        )
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
        """Graceful stop (SIGTERM, then SIGKILL after `timeout`)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close()

    stop_signal = signal.SIGTERM

    def kill(self) -> None:
        """SIGKILL, as a crash would: no cleanup, stale files stay behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def _close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

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

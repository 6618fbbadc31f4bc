"""`nexus up` owns its servers: starts, stops, survives kill -9, recovers after a crash."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from shared.infra.process import die_with_parent, free_port, pid_alive
from tests.support import REPO, wait_http_ok, wait_until

pytestmark = pytest.mark.slow


class Up:
    """`nexus up` as a process, on random ports and its own data dir."""

    def __init__(self, data_dir: Path, **env: str) -> None:
        self.data_dir = data_dir
        self.http_port = free_port()
        base = {k: v for k, v in os.environ.items()
                if k not in ("NATS_URL", "DATABASE_URL") and not k.startswith(("NEXUS_", "OTEL_"))}
        self.env = {
            **base,
            "NEXUS_DATA_DIR": str(data_dir),
            "NEXUS_HTTP_PORT": str(self.http_port),
            "NEXUS_NATS_PORT": str(free_port()),
            "NEXUS_NATS_MONITOR_PORT": str(free_port()),
            "NEXUS_PG_PORT": str(free_port()),
            "NEXUS_METRICS_PORT": str(free_port()),  # the provider's; the node's is the next
            "NEXUS_ADMIN_KEY": "admin-key-for-tests-" + data_dir.name,
            "NEXUS_RUNTIME": "none",  # the real-model tests cover llama-server
            **env,
        }
        self.headers = {"Authorization": f"Bearer {self.env['NEXUS_ADMIN_KEY']}"}
        self.api = f"http://127.0.0.1:{self.http_port}"
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> Up:
        self.out = open(self.data_dir.parent / f"{self.data_dir.name}-up.out", "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "up"], cwd=REPO,
                                     env=self.env, stdout=self.out, stderr=subprocess.STDOUT,
                                     text=True, preexec_fn=die_with_parent)
        wait_http_ok(f"{self.api}/health", timeout=90)
        wait_until(self.all_pong, 30, 0.2, "every service to answer a ping")
        return self

    def all_pong(self) -> bool:
        body = httpx.get(f"{self.api}/v1/system/ping", timeout=10, headers=self.headers).json()
        return all(body[s]["ok"] for s in ("orchestrator", "provider", "node"))

    def state(self) -> dict:
        return json.loads((self.data_dir / "up.json").read_text())

    def output(self) -> str:
        return Path(self.out.name).read_text()

    def child_pids(self) -> list[int]:
        state = self.state()
        return [p for p in [*state["servers"].values(), *state["services"].values()] if p]


def test_up_starts_everything_and_ctrl_c_stops_it(tmp_path) -> None:
    up = Up(tmp_path / "nexus").start()
    pids = up.child_pids()
    assert len(pids) == 5  # NATS, Postgres, three services
    out = up.output()
    assert "Nexus is up." in out and up.api in out
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(60) == 0, up.output()
    assert "Nexus stopped." in up.output()
    for pid in pids:
        wait_until(lambda pid=pid: not pid_alive(pid), 10, what=f"child {pid} to exit")
    assert not (up.data_dir / "up.json").exists()


def test_killed_postgres_is_restarted_and_the_api_recovers(tmp_path) -> None:
    up = Up(tmp_path / "nexus").start()
    try:
        pg_pid = up.state()["servers"]["postgres"]
        os.kill(pg_pid, signal.SIGKILL)

        def session_created() -> bool:
            return httpx.post(f"{up.api}/v1/sessions", json={}, timeout=5,
                              headers=up.headers).status_code == 201

        wait_until(session_created, 60, 0.3, "the API to create sessions again")
        assert "postgres exited unexpectedly; restarting it" in up.output()
    finally:
        up.proc.send_signal(signal.SIGINT)
        up.proc.wait(60)


def test_crash_of_everything_is_recovered_on_next_start(tmp_path) -> None:
    up = Up(tmp_path / "nexus").start()
    session = httpx.post(f"{up.api}/v1/sessions", json={"metadata": {"survives": "yes"}},
                         headers=up.headers).json()
    state = up.state()
    # A crash: the servers die without shutting down, then the supervisor itself.
    os.kill(state["servers"]["postgres"], signal.SIGKILL)
    os.kill(state["servers"]["nats"], signal.SIGKILL)
    up.proc.kill()
    up.proc.wait()
    for pid in up.child_pids():
        wait_until(lambda pid=pid: not pid_alive(pid), 40, what=f"orphan {pid} to exit")
    assert (up.data_dir / "postgres" / "pgdata" / "postmaster.pid").exists()  # stale

    again = Up(up.data_dir)
    again.env = up.env
    again.api = up.api
    again.headers = up.headers
    again.start()
    try:
        fetched = httpx.get(f"{again.api}/v1/sessions/{session['session_id']}", headers=again.headers)
        assert fetched.status_code == 200
        assert fetched.json()["metadata"] == {"survives": "yes"}
    finally:
        again.proc.send_signal(signal.SIGINT)
        assert again.proc.wait(60) == 0


def test_up_uses_external_servers_when_urls_are_set(tmp_path, infra) -> None:
    up = Up(tmp_path / "nexus", NATS_URL=infra.nats_url, DATABASE_URL=infra.database_url).start()
    try:
        state = up.state()
        assert state["servers"] == {}
        assert state["nats_url"] == infra.nats_url
        assert "starting embedded" not in up.output()
    finally:
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(60) == 0


def environ(pid: int) -> dict[str, str]:
    """The environment a real child process was started with."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode(errors="replace").partition("=")[::2]
                for item in raw.split(b"\0") if item)


def test_up_from_a_private_directory_gives_each_service_only_its_credentials(tmp_path) -> None:
    """A data dir inside a 0700 directory (a clone in `mktemp -d` or /root) works, and
    opens nothing up; the admin key reaches only the orchestrator, the database (and its
    password) only orchestrator and provider; no output or state file holds a password."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    up = Up(private / "nexus", NEXUS_API_KEY="cli-key-for-tests").start()
    try:
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
        password_file = up.data_dir / "postgres" / "password"
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        password = password_file.read_text().strip()
        admin_key = up.env["NEXUS_ADMIN_KEY"]

        services = up.state()["services"]
        env = {name: environ(pid) for name, pid in services.items()}
        assert env["orchestrator"]["NEXUS_ADMIN_KEY"] == admin_key
        assert password in env["orchestrator"]["DATABASE_URL"]
        assert password in env["provider"]["DATABASE_URL"]
        for name in ("provider", "node"):
            assert "NEXUS_ADMIN_KEY" not in env[name], name
            assert admin_key not in "\n".join(env[name].values()), name
        assert "DATABASE_URL" not in env["node"]
        assert password not in "\n".join(env["node"].values())
        for name in services:
            assert "NEXUS_API_KEY" not in env[name], name

        assert "postgres:***@" in up.output()
        assert password not in up.output()
        assert password not in (up.data_dir / "up.json").read_text()
        for log in (up.data_dir / "logs").iterdir():
            assert password not in log.read_text(errors="replace"), log
        # CLI commands find the database through up.json and the password file.
        listed = subprocess.run([sys.executable, "-m", "ops.cli", "projections", "list"],
                                cwd=REPO, env=up.env, capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        assert password not in listed.stdout + listed.stderr
    finally:
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(60) == 0, up.output()
    for log in [*(up.data_dir / "logs").iterdir(), up.data_dir / "postgres" / "postgres.log"]:
        assert password not in log.read_text(errors="replace"), log

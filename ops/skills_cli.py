"""`nexus skills list|apply`, `nexus explain CALL_ID` and `nexus replay --routing FILE`:
thin clients of `/v1/skills`, `/v1/calls/{id}/explain` and `/v1/replays` (the key in
`NEXUS_API_KEY`, default the admin key)."""

from __future__ import annotations

import json
import tomllib
import urllib.parse
from pathlib import Path

import click


def _client():
    from ops.cli import _api, _problem  # the CLI's one HTTP helper

    return _api, _problem


def _load(path: Path) -> dict:
    text = path.read_text()
    return tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)


@click.group(help="Skills: list the tenant's (system and own), apply definitions from files.")
def skills() -> None:
    pass


@skills.command("list", help="The skills the key's tenant can route with.")
def skills_list() -> None:
    api, problem = _client()
    status, body = api("GET", "/v1/skills")
    if status != 200:
        raise problem(status, body)
    for s in body["skills"]:
        r = s["spec"]["llm_routing"]
        click.echo(f"{s['name']:<20} {s['source']:<7} v{s['version']:<3} preferred {r['preferred']}"
                   f" fallback {','.join(r['fallback']) or '-'} cost {r['cost_weight']}"
                   f" performance {r['performance_weight']}")


@skills.command("apply", help="Define (or update) skills from TOML or JSON files.")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
def skills_apply(files: tuple[Path, ...]) -> None:
    api, problem = _client()
    for path in files:
        status, body = api("POST", "/v1/skills", _load(path))
        if status != 201:
            raise problem(status, body)
        click.echo(f"{body['name']}: version {body['version']}")


@click.command(help="A call's whole decision chain from its events (routing, policy, budget, "
                    "plan, attempts, cost, latency).")
@click.argument("call_id")
@click.option("--json", "as_json", is_flag=True, help="The API's JSON instead of text.")
def explain(call_id: str, as_json: bool) -> None:
    from services.orchestrator.explain import explain_text

    api, problem = _client()
    status, body = api("GET", f"/v1/calls/{urllib.parse.quote(call_id, safe='')}/explain")
    if status != 200:
        raise problem(status, body)
    click.echo(json.dumps(body, indent=2) if as_json else explain_text(body))


@click.command(help="Re-decide the routed calls of a period under other routing (FILE: TOML or "
                    "JSON with cost_weight, performance_weight, models) and compare.")
@click.option("--routing", "routing_file", type=click.Path(exists=True, path_type=Path), default=None)
@click.option("--since", default="24h", show_default=True, help="ISO time or a duration (24h, 30m, 7d).")
@click.option("--until", default=None)
@click.option("--execute", type=int, default=0, help="Re-run this many changed calls on the real models.")
@click.option("--grader", default=None, help="A model that scores each re-run answer 0..10 (measured quality).")
@click.option("--json", "as_json", is_flag=True)
def replay(routing_file: Path | None, since: str, until: str | None, execute: int,
           grader: str | None, as_json: bool) -> None:
    api, problem = _client()
    body = {k: v for k, v in (_load(routing_file) if routing_file else {}).items()
            if k in ("cost_weight", "performance_weight", "models")}
    body.update(since=since, execute=execute, **({"until": until} if until else {}),
                **({"grader": grader} if grader else {}))
    status, out = api("POST", "/v1/replays", body, timeout=300)
    if status != 200:
        raise problem(status, out)
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    s = out["summary"]
    click.echo(f"{s['calls']} routed calls, {s['changed']} would change model")
    click.echo(f"cost     recorded {s['recorded_cost_micro_usd']:.0f} micro-USD -> projected "
               f"{s['projected_cost_micro_usd']:.0f}")
    if s["calls"]:
        click.echo(f"quality  recorded {s['recorded_quality']:.3f} ± {s['recorded_quality_std']:.3f}"
                   f" -> projected {s['projected_quality']:.3f} ± {s['projected_quality_std']:.3f}")
    for row in out["changed_calls"][:20]:
        click.echo(f"  {row['call_id']}  {row['recorded']} -> {row['counterfactual']}")
    for run in out["executed"]:
        click.echo(f"  executed {run['call_id']} on {run.get('model')}: " + (
            run["error"] if "error" in run else
            f"{run['cost_micro_usd']} micro-USD (recorded {run['recorded_cost_micro_usd']:.0f}), "
            f"{run['latency_ms']:.0f} ms, quality "
            + (f"{run['quality']:.2f}" if run.get("quality") is not None else
               run.get("quality_error", "not measured (no --grader)"))
            + (f" (recorded feedback {run['recorded_feedback']})"
               if run.get("recorded_feedback") is not None else "")))

"""`nexus models list|import|distribute|pull|rm` and `nexus tasks [--watch]`.

`import` writes straight into the model store (NATS Object Store `NEXUS_MODELS`) with
the orchestrator's NATS credentials (those of `nexus up`, or NEXUS_NATS_USER /
NEXUS_NATS_PASSWORD); the rest go through the HTTP API with the CLI's key.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import urllib.request
from pathlib import Path

import click

from shared.infra.settings import get_settings


def _nats_login() -> tuple[str, str | None, str | None]:
    from ops.supervisor import resolve_urls
    from shared.infra.nats_auth import CREDENTIALS_FILE, load_credentials

    settings = get_settings()
    nats_url = resolve_urls(settings)[0]
    if settings.nats_user:
        return nats_url, settings.nats_user, settings.nats_password
    path = settings.data_dir / "nats" / CREDENTIALS_FILE
    if path.exists():
        user = load_credentials(path).service("orchestrator")
        return nats_url, user.name, user.password
    return nats_url, None, None


def resolve_source(source: str, work: Path, say=click.echo) -> tuple[Path, str, str]:
    """FILE, URL or PACKAGE (a bundled model's name) -> (local file, model name, source)."""
    from shared.infra.llama import LOCAL_MODELS, ensure_model

    if source in LOCAL_MODELS:
        return ensure_model(say, source), source, f"package {LOCAL_MODELS[source].source}"
    if source.startswith(("http://", "https://")):
        name = Path(source.split("?")[0]).name or "model.gguf"
        target = work / name
        with urllib.request.urlopen(source, timeout=60) as resp, open(target, "wb") as out:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
        return target, Path(name).stem, source
    path = Path(source)
    if not path.is_file():
        raise click.ClickException(f"{source}: no such file, URL or bundled model")
    return path, path.stem, f"file {path.name}"


async def import_model(path: Path, name: str, source: str, *, nats_url: str, user: str | None,
                       password: str | None, progress=None) -> object:
    stored, _uploaded = await import_if_changed(path, name, source, nats_url=nats_url, user=user,
                                                password=password, progress=progress)
    return stored


async def _off_loop(fn, *args, **kwargs):
    """`fn` in a daemon thread of its own (not the loop's executor, which the interpreter
    waits for at exit): a cancelled import never holds `nexus up` open while it hashes or
    reads a GGUF header."""
    import threading

    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(ok: bool, value) -> None:
        if not future.done():
            (future.set_result if ok else future.set_exception)(value)

    def run() -> None:
        try:
            result = (True, fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            result = (False, exc)
        try:
            loop.call_soon_threadsafe(settle, *result)
        except RuntimeError:  # the loop is gone: nobody waits any more
            pass

    threading.Thread(target=run, name=f"import-{getattr(fn, '__name__', 'work')}",
                     daemon=True).start()
    return await future


async def import_if_changed(path: Path, name: str, source: str, *, nats_url: str,
                            user: str | None, password: str | None,
                            progress=None) -> tuple[object, bool]:
    """Put `path` into the store as `name` unless the store already has it with the same
    SHA-256: (the stored model, whether it was uploaded)."""
    from shared.contracts.subjects import MODEL_BUCKET
    from shared.infra.gguf import describe, sha256_file
    from shared.infra.messaging import Bus
    from shared.infra.model_store import ModelStore

    sha = await _off_loop(sha256_file, path)
    bus = await Bus.connect(nats_url, "nexus-cli", user=user, password=password)
    try:
        await bus.ensure_object_stores((MODEL_BUCKET,))
        store = ModelStore(bus.js)
        existing = await store.get(name)
        if existing is not None and existing.artifact.sha256 == sha:
            return existing, False  # already there: importing again changes nothing
        artifact = await _off_loop(describe, path, name=name, sha256=sha, source=source)
        return await store.put(path, artifact, progress), True
    finally:
        await bus.close()


SHIPPED_MODEL = "gemma-3-270m"  # a dependency of the project: always there to import


def shipped_models(local_model: str, local_model_available: bool) -> list[str]:
    """What `nexus up` puts into the store: the Gemma model the project ships, and the
    configured local model when it is another one and it is on this machine (or a
    runtime here fetches it anyway)."""
    from shared.infra.llama import LOCAL_MODELS

    names = [SHIPPED_MODEL]
    if local_model != SHIPPED_MODEL and local_model in LOCAL_MODELS and local_model_available:
        names.append(local_model)
    return names


async def import_shipped(names: list[str], *, nats_url: str, user: str | None,
                         password: str | None, say=print, locate=None) -> dict[str, bool]:
    """Import each bundled model (assembled or fetched first if need be: `locate`, by
    default `ensure_model`) unless the store holds it already with the same SHA-256:
    model -> whether it was uploaded."""
    from shared.infra.llama import LOCAL_MODELS, ensure_model

    done = {}
    for name in names:
        path = await _off_loop(locate or ensure_model, say, name)
        _, done[name] = await import_if_changed(
            path, name, f"package {LOCAL_MODELS[name].source}", nats_url=nats_url, user=user,
            password=password)
    return done


@click.group(help="The fleet's models: the store, what nodes hold, distribution.")
def models() -> None:
    pass


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


@models.command("list", help="Models in the store: size, metadata, memory needed, fit per node.")
def models_list() -> None:
    from rich.console import Console
    from rich.table import Table

    from ops.cli import _api, _problem

    status, body = _api("GET", "/v1/models/available")
    if status != 200:
        raise _problem(status, body)
    table = Table("MODEL", "ARCH", "PARAMS", "QUANT", "SIZE", "NEEDS", "FITS", "SHA256")
    for m in body["models"]:  # type: ignore[index]
        fits = ", ".join(f"{f['node_id'][:8]}{'' if f['fits'] else ' (no)'}" for f in m["fit"]) or "-"
        table.add_row(m["name"], m["architecture"], f"{m['parameters'] / 1e6:.0f}M",
                      m["quantization"], _gib(m["size_bytes"]), _gib(m["memory_needed_bytes"]),
                      fits, m["sha256"][:12])
    Console().print(table)


@models.command("import", help="Put a GGUF (FILE, URL or a bundled PACKAGE name) into the store.")
@click.argument("source")
@click.option("--name", default=None, help="the model's name (default: from the source)")
def models_import(source: str, name: str | None) -> None:
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with tempfile.TemporaryDirectory() as work:
        path, default_name, where = resolve_source(source, Path(work))
        name = name or default_name
        nats_url, user, password = _nats_login()
        with Progress("[bold]{task.description}", BarColumn(), DownloadColumn(),
                      TransferSpeedColumn()) as bar:
            task = bar.add_task(f"import {name}", total=path.stat().st_size)
            stored = asyncio.run(import_model(
                path, name, where, nats_url=nats_url, user=user, password=password,
                progress=lambda done: bar.update(task, completed=done)))
            bar.update(task, completed=path.stat().st_size)
    a = stored.artifact  # type: ignore[attr-defined]
    click.echo(f"{a.name}: {a.architecture}, {a.parameters / 1e6:.0f}M parameters, "
               f"{a.quantization}, context {a.context_length}, sha256 {a.sha256}")


def _tasks_or_fail(status: int, body: object) -> list[dict]:
    from ops.cli import _problem

    if status not in (200, 202):
        raise _problem(status, body)
    if isinstance(body, dict) and "tasks" in body:
        return body["tasks"]
    return [body]  # type: ignore[list-item]


@models.command("distribute", help="Put a model on all nodes, specific ones, or where it fits (auto).")
@click.argument("model")
@click.option("--target", type=click.Choice(["all", "specific", "auto"]), default="auto")
@click.option("--node", "node_ids", multiple=True, help="a node id (target specific)")
@click.option("--watch/--no-watch", default=True, help="follow the tasks until they end")
def models_distribute(model: str, target: str, node_ids: tuple[str, ...], watch: bool) -> None:
    from ops.cli import _api

    tasks = _tasks_or_fail(*_api("POST", "/v1/models/distribute",
                                 {"model": model, "target": target, "node_ids": list(node_ids)}))
    _follow([t["task_id"] for t in tasks]) if watch else _print_tasks(tasks)


@models.command("pull", help="Pull a model from the store onto one node.")
@click.argument("node_id")
@click.argument("model")
@click.option("--watch/--no-watch", default=True)
def models_pull(node_id: str, model: str, watch: bool) -> None:
    from ops.cli import _api

    tasks = _tasks_or_fail(*_api("POST", f"/v1/nodes/{node_id}/models/pull", {"model": model}))
    _follow([t["task_id"] for t in tasks]) if watch else _print_tasks(tasks)


@models.command("rm", help="Remove an installed model from a node.")
@click.argument("node_id")
@click.argument("model")
def models_rm(node_id: str, model: str) -> None:
    from ops.cli import _api, _problem

    status, body = _api("DELETE", f"/v1/nodes/{node_id}/models/{model}")
    if status != 204:
        raise _problem(status, body)
    click.echo(f"{model} removed from {node_id}")


def _print_tasks(tasks: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("TASK", "NODE", "MODEL", "STATUS", "PROGRESS", "SPEED", "ERROR")
    for t in tasks:
        table.add_row(t["task_id"][:8], t["node_id"][:12], t["model"], t["status"],
                      f"{t['progress'] * 100:5.1f}%", f"{t['speed_bps'] / 1024**2:.1f} MiB/s",
                      t["error"] or "")
    Console().print(table)


def _follow(task_ids: list[str]) -> None:
    """docker-pull-style bars, one per task, until every task has ended."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from ops.cli import _api

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TextColumn("{task.fields[status]}")) as bars:
        ids = {}
        while True:
            ended = 0
            for task_id in task_ids:
                status, t = _api("GET", f"/v1/tasks/{task_id}")
                if status != 200:
                    continue
                if task_id not in ids:
                    ids[task_id] = bars.add_task(f"{t['model']} -> {t['node_id'][:12]}",
                                                 total=t["total_bytes"], status=t["status"])
                label = t["status"] + (f": {t['error']}" if t["error"] else "")
                bars.update(ids[task_id], completed=t["bytes_done"], status=label)
                ended += t["status"] in ("completed", "failed", "cancelled")
            if ended == len(task_ids):
                return
            time.sleep(0.5)


@click.command("tasks", help="Model download tasks, newest first (--watch: refresh).")
@click.option("--status", default=None, type=click.Choice(
    ["pending", "in_progress", "completed", "failed", "cancelled"]))
@click.option("--node", default=None)
@click.option("--watch", is_flag=True)
def tasks(status: str | None, node: str | None, watch: bool) -> None:
    from urllib.parse import urlencode

    from ops.cli import _api, _problem

    query = urlencode({k: v for k, v in (("status", status), ("node", node)) if v})
    while True:
        code, body = _api("GET", f"/v1/tasks{'?' + query if query else ''}")
        if code != 200:
            raise _problem(code, body)
        if watch:
            click.clear()
        _print_tasks(body["tasks"])  # type: ignore[index]
        if not watch:
            return
        time.sleep(1)

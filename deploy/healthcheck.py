"""Health checks of the Nexus container image (Docker HEALTHCHECK, Kubernetes exec probes).

    healthcheck.py orchestrator        GET /health of this container: healthy only when
                                       it says "ok" (NATS and Postgres reachable); /health
                                       answers 200 with "degraded" otherwise
    healthcheck.py provider | node     the service answers its ping over NATS. The ping
                                       goes to the service's queue group, so any instance
                                       may answer: a fleet-level check, see docs/deploy.md
    healthcheck.py migrations [--wait SECONDS]
                                       no pending migration in DATABASE_URL (dbmate
                                       status); --wait polls until then (init containers)

Exit status 0 healthy, 1 not, with one line saying why. Credentials come from the same
variables as the service's (`NAME_FILE` secrets included, see entrypoint.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from entrypoint import SecretFileError, expand_secret_files

TIMEOUT_S = 3.0


def check_orchestrator(env: Mapping[str, str], timeout: float = TIMEOUT_S) -> tuple[bool, str]:
    host = env.get("NEXUS_HTTP_HOST") or "127.0.0.1"
    if host in ("0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    url = f"http://{host}:{env.get('NEXUS_HTTP_PORT') or '8080'}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = json.load(resp)
    except (OSError, ValueError) as exc:
        return False, f"{url}: {exc}"
    if body.get("status") != "ok":
        return False, (f"{url}: status {body.get('status')!r} "
                       f"(nats={body.get('nats')}, postgres={body.get('postgres')})")
    return True, f"{url}: ok"


async def _ping(service: str, timeout: float) -> tuple[bool, str]:
    from shared.contracts.messages import Ping, Pong
    from shared.infra.messaging import Bus
    from shared.infra.service import PING_SUBJECTS
    from shared.infra.settings import Settings

    settings = Settings.from_env()
    if not settings.nats_url:
        return False, "NATS_URL is not set"
    subject = PING_SUBJECTS[service][0]
    bus = await Bus.connect(settings.nats_url, f"nexus-healthcheck-{service}",
                            user=settings.nats_user, password=settings.nats_password,
                            connect_timeout=timeout)
    try:
        pong = await bus.request(subject, Ping(sender=f"healthcheck-{settings.instance_id}"),
                                 Pong, timeout=timeout)
    finally:
        await bus.close()
    return True, f"{subject}: answered by {pong.instance_id}"


def check_ping(service: str, timeout: float = TIMEOUT_S) -> tuple[bool, str]:
    logging.disable(logging.WARNING)  # the NATS client's retry chatter; one line says why
    try:
        return asyncio.run(asyncio.wait_for(_ping(service, timeout), timeout * 2))
    except TimeoutError:
        return False, f"{service} ping: no answer within {timeout * 2:g} s"
    except Exception as exc:  # any failure is "unhealthy", said in one line
        return False, f"{service} ping: {type(exc).__name__}: {exc}"


def _with_sslmode(url: str) -> str:
    # The same rule as shared.infra.migrate: dbmate (lib/pq) insists on TLS unless told.
    if "sslmode=" in url:
        return url
    return url + ("&" if "?" in url else "?") + "sslmode=disable"


def check_migrations(env: Mapping[str, str]) -> tuple[bool, str]:
    from shared.infra.migrate import MIGRATIONS_DIR, dbmate_binary

    url = env.get("DATABASE_URL")
    if not url:
        return False, "DATABASE_URL is not set"
    result = subprocess.run(
        [dbmate_binary(), "--url", _with_sslmode(url), "--migrations-dir", str(MIGRATIONS_DIR),
         "status", "--exit-code"],
        capture_output=True, text=True, timeout=30,
    )
    if result.returncode != 0:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["pending migrations"]
        return False, f"migrations: {last[0]}"
    return True, "migrations: up to date"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=["orchestrator", "provider", "node", "migrations"])
    parser.add_argument("--wait", type=float, default=0.0,
                        help="keep checking for up to this many seconds until healthy")
    args = parser.parse_args(argv)
    try:
        expand_secret_files(os.environ)
    except SecretFileError as exc:
        print(exc)
        return 1
    deadline = time.monotonic() + args.wait
    while True:
        if args.check == "orchestrator":
            ok, why = check_orchestrator(os.environ)
        elif args.check == "migrations":
            ok, why = check_migrations(os.environ)
        else:
            ok, why = check_ping(args.check)
        if ok or time.monotonic() >= deadline:
            print(why, flush=True)
            return 0 if ok else 1
        time.sleep(2)


if __name__ == "__main__":
    sys.exit(main())

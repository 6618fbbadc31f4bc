"""NATS users and permissions for the embedded (dev) server that `nexus up` runs.

Every process authenticates with its own user. The services (`orchestrator`,
`provider`) may publish and subscribe anywhere, JetStream API included. Each node is
the user `node-<node_id>` and may publish only under its own prefix
`nexus.node.<node_id>.`; it subscribes to its own prefix, the node ping and inboxes,
and may answer the requests it received (`allow_responses`) without a blanket publish
right on `_INBOX.>`. So a node cannot speak (heartbeat, register, status, reply) as
another node, and never sees another node's requests.

Passwords are random URL-safe tokens, kept in a JSON file of mode 0600 (by default
`<nats data dir>/credentials.json`) so a restart keeps them. They are never logged:
the `repr` of every object here leaves them out, and errors name users, never
passwords.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import msgspec

from shared.contracts import subjects

CREDENTIALS_FILE = "credentials.json"
SERVICE_USERS = ("orchestrator", "provider")
NODE_USER_PREFIX = "node-"
INBOX_PREFIX = "_INBOX"

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # no dots or wildcards: one subject token (as NodeId)
_PASSWORD = re.compile(r"[A-Za-z0-9_-]{32,256}")  # what secrets.token_urlsafe produces
_PASSWORD_BYTES = 32                              # 256 bits -> 43 characters


class CredentialsError(RuntimeError):
    """The credentials file is unreadable or malformed (the message never quotes it)."""


def _check_name(kind: str, value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(f"{kind} {value!r} must be 1-64 characters of A-Z a-z 0-9 _ -")
    return value


def node_user(node_id: str) -> str:
    """The NATS user name of a node: `node-<node_id>`."""
    return NODE_USER_PREFIX + _check_name("node id", node_id)


def node_inbox_prefix(node_id: str) -> str:
    """The inbox prefix a node uses with `private_inboxes` (nats-py `inbox_prefix=`)."""
    return f"{INBOX_PREFIX}.{node_user(node_id)}"


def new_password() -> str:
    return secrets.token_urlsafe(_PASSWORD_BYTES)


@dataclass(frozen=True)
class NatsUser:
    """One NATS user. `node_id` is None for a service (full rights)."""

    name: str
    password: str = field(repr=False)
    node_id: str | None = None

    def __str__(self) -> str:
        return self.name


class _File(msgspec.Struct, forbid_unknown_fields=True):
    """On-disk format of the credentials file."""

    version: int = 1
    services: dict[str, str] = {}
    nodes: dict[str, str] = {}


@dataclass(frozen=True)
class NatsCredentials:
    """Service and node users, by service name and by node id."""

    services: Mapping[str, NatsUser]
    nodes: Mapping[str, NatsUser]

    def __repr__(self) -> str:
        return f"NatsCredentials(services={sorted(self.services)}, nodes={sorted(self.nodes)})"

    def service(self, name: str) -> NatsUser:
        try:
            return self.services[name]
        except KeyError:
            raise KeyError(f"no NATS user for service {name!r}") from None

    def node(self, node_id: str) -> NatsUser:
        try:
            return self.nodes[node_id]
        except KeyError:
            raise KeyError(f"no NATS user for node {node_id!r}") from None

    def users(self) -> tuple[NatsUser, ...]:
        return (*self.services.values(), *self.nodes.values())


def _build(data: _File) -> NatsCredentials:
    services = {name: NatsUser(name, pw) for name, pw in sorted(data.services.items())}
    nodes = {nid: NatsUser(node_user(nid), pw, nid) for nid, pw in sorted(data.nodes.items())}
    return NatsCredentials(MappingProxyType(services), MappingProxyType(nodes))


def _read(path: Path) -> _File | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CredentialsError(f"cannot read NATS credentials {path}: {exc.strerror}") from None
    try:
        data = msgspec.json.decode(raw, type=_File)
    except msgspec.DecodeError:  # the error text could quote the file: leave it out
        raise CredentialsError(f"NATS credentials {path} are malformed; "
                               "fix or delete the file (new ones are generated)") from None
    if data.version != 1:
        raise CredentialsError(f"NATS credentials {path} have version {data.version}; "
                               "this Nexus reads version 1")
    for kind, names in (("service", data.services), ("node id", data.nodes)):
        for name, password in names.items():
            try:
                _check_name(kind, name)
            except ValueError as exc:
                raise CredentialsError(f"NATS credentials {path}: {exc}") from None
            if not _PASSWORD.fullmatch(password):
                raise CredentialsError(f"NATS credentials {path}: the password of {kind} "
                                       f"{name!r} is not a 32+ character URL-safe token")
    return data


def _write(path: Path, data: _File) -> None:
    """Atomically replace `path`; the file is 0600 from its first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(msgspec.json.format(msgspec.json.encode(data), indent=2) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_credentials(path: Path) -> NatsCredentials:
    """The credentials in `path` (CredentialsError if missing or malformed)."""
    data = _read(Path(path))
    if data is None:
        raise CredentialsError(f"no NATS credentials at {path}")
    return _build(data)


def load_or_create_credentials(path: Path, *, services: Iterable[str] = SERVICE_USERS,
                               node_ids: Iterable[str] = ()) -> NatsCredentials:
    """Users for `services` and `node_ids`, keeping those already in `path`.

    Missing users get new random passwords; the file is written (mode 0600) only when
    something was added, and its mode is tightened to 0600 if it was looser. Repeating
    the call returns the same credentials.
    """
    path = Path(path)
    data = _read(path) or _File()
    changed = not path.exists()
    for name in services:
        if _check_name("service", name) not in data.services:
            data.services[name] = new_password()
            changed = True
    for node_id in node_ids:
        if _check_name("node id", node_id) not in data.nodes:
            data.nodes[node_id] = new_password()
            changed = True
    if changed:
        _write(path, data)
    elif path.stat().st_mode & 0o077:
        path.chmod(0o600)
    return _build(data)


# -- nats.conf ------------------------------------------------------------------------

def _q(value: str) -> str:
    """A double-quoted nats.conf string (only characters that need no escaping)."""
    # `$` only as JetStream's own prefix (`$JS.`, `$O.`): quoted, it is no variable
    if not re.fullmatch(r"(\$(JS|O)\.)?[A-Za-z0-9_.>*-]+", value):  # not quoted back: may be a password
        raise ValueError("refusing to write a nats.conf string with characters "
                         "other than A-Z a-z 0-9 _ . > * - (and a leading $JS. or $O.)")
    return f'"{value}"'


def _list(values: Iterable[str]) -> str:
    return "[" + ", ".join(_q(v) for v in values) + "]"


def node_permissions(node_id: str, *, private_inboxes: bool = False) -> tuple[list[str], list[str]]:
    """(publish allow, subscribe allow) of a node user.

    `private_inboxes`: the node may subscribe only to its own inboxes
    (`node_inbox_prefix(node_id)`), so it cannot read replies meant for others; the
    node must then connect with that `inbox_prefix`.
    """
    own = f"{subjects.NODE_PREFIX}.{_check_name('node id', node_id)}.>"
    inbox = f"{node_inbox_prefix(node_id)}.>" if private_inboxes else f"{INBOX_PREFIX}.>"
    buckets = [s for spec in subjects.OBJECT_STORES if spec not in subjects.NODE_READ_ONLY_STORES
               for s in object_store_permissions(spec)]
    buckets += [s for spec in subjects.NODE_READ_ONLY_STORES
                for s in object_store_read_permissions(spec)]
    # nats-py's ordered consumer (an object get) looks its stream up by subject: this
    # lists stream names only, never their configuration or content
    return [own, *buckets, "$JS.API.STREAM.NAMES"], [own, subjects.PING_NODE, inbox]


def object_store_permissions(spec: subjects.ObjectStoreSpec) -> list[str]:
    """What a client needs to put, get, list and delete objects of one Object Store
    bucket (nats-py's ObjectStore), and nothing to create, change or delete the bucket
    itself nor to touch any other stream: its chunk and metadata subjects, and the
    JetStream API calls on its stream only (info, message get, purge of one object's
    chunks, the ordered consumer a get reads through and its flow control)."""
    stream = spec.stream
    api = "$JS.API"
    return [f"$O.{spec.bucket}.>",
            f"{api}.STREAM.INFO.{stream}",
            f"{api}.STREAM.MSG.GET.{stream}",
            f"{api}.STREAM.PURGE.{stream}",
            f"{api}.CONSUMER.CREATE.{stream}",
            f"{api}.CONSUMER.CREATE.{stream}.>",
            f"{api}.CONSUMER.DELETE.{stream}.*",
            f"$JS.FC.{stream}.>"]


def object_store_read_permissions(spec: subjects.ObjectStoreSpec) -> list[str]:
    """What a client needs to read objects of one bucket (info, list, get through an
    ordered consumer from any sequence) and nothing to write, purge or delete them."""
    stream = spec.stream
    api = "$JS.API"
    return [f"{api}.STREAM.INFO.{stream}",
            f"{api}.STREAM.MSG.GET.{stream}",
            f"{api}.CONSUMER.CREATE.{stream}",
            f"{api}.CONSUMER.CREATE.{stream}.>",
            f"{api}.CONSUMER.DELETE.{stream}.*",
            f"$JS.FC.{stream}.>"]


def _responses(max_responses: int, response_ttl_s: int) -> str:
    if (max_responses, response_ttl_s) == (1, 120):  # the server's defaults for `true`
        return "allow_responses: true"
    if max_responses == 0 or response_ttl_s <= 0:
        raise ValueError("max_responses must be non-zero (-1: unlimited), response_ttl_s > 0")
    return f'allow_responses: {{ max: {int(max_responses)}, expires: "{int(response_ttl_s)}s" }}'


def authorization_config(credentials: NatsCredentials, *, private_inboxes: bool = False,
                         max_responses: int = 1, response_ttl_s: int = 120) -> str:
    """The `authorization { users = [...] }` block for nats.conf.

    Services have no `permissions` (everything allowed, JetStream API included). All
    users are in the global account, where JetStream runs, so node heartbeats are
    captured by NEXUS_HEARTBEATS like any publish. A node may answer each request it
    received with `max_responses` messages (-1: any number, for streamed replies)
    within `response_ttl_s`; the defaults are those of `allow_responses: true`.
    The block holds passwords: EmbeddedNats writes nats.conf with mode 0600.
    """
    responses = _responses(max_responses, response_ttl_s)
    lines = ["authorization {", "  users = ["]
    for user in credentials.services.values():
        lines.append(f"    {{ user: {_q(user.name)}, password: {_q(user.password)} }}"
                     "  # full rights")
    for node_id, user in credentials.nodes.items():
        publish, subscribe = node_permissions(node_id, private_inboxes=private_inboxes)
        lines += [
            "    {",
            f"      user: {_q(user.name)}, password: {_q(user.password)}",
            "      permissions: {",
            f"        publish: {{ allow: {_list(publish)} }}",
            f"        subscribe: {{ allow: {_list(subscribe)} }}",
            f"        {responses}",
            "      }",
            "    }",
        ]
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def dev_credentials(nats_dir: Path, node_ids: Iterable[str] = ()) -> NatsCredentials:
    """`nexus up`'s users: the services and the given nodes, in `nats_dir/credentials.json`."""
    return load_or_create_credentials(Path(nats_dir) / CREDENTIALS_FILE, node_ids=node_ids)

"""Session workspaces in a JetStream Object Store, and whole tool outputs beside them.

A session's files live in the bucket `subjects.WORKSPACE_BUCKET`, so they survive the
node that wrote them and follow the session to any other node:

    <tenant>/<session_id>/manifest         {"files": {path: {"digest", "size"}}}
    <tenant>/<session_id>/blobs/<sha256>   the content of one or more files

Blobs are content-addressed and the manifest is one object, so a sync out commits
atomically: blobs first, then the manifest (a single rollup message); a node that dies
half-way leaves only unreferenced blobs, never a manifest naming a missing or
half-written file. A commit applies *this call's changes* (by path) to the manifest as
it is at commit time, so two calls of one session on two nodes lose nothing unless they
change the same path (the later wins). On one node, calls of one session are serialized.

Quota: the sum of the sizes of a session's files; a commit that would exceed it is
refused before anything is uploaded (`WorkspaceError("quota")`), so nothing partial is
kept.

When the session closes, the orchestrator deletes its workspace (`purge`: every blob the
manifest names, then the manifest; services/orchestrator/workspaces.py).

A node holds credentials for every session's workspace it may serve (see
docs/ARCHITECTURE.md, "Tools on nodes"): the isolation between sessions is the
sandbox, which sees only the private copy of its own session's files.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import nats.errors
from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError, NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from shared.contracts import subjects

MAX_PATH = 1024
MAX_FILES = 10_000  # per session: bounds every listing, sync and manifest
_ID = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
_PARALLEL = 8  # blob transfers at once per sync


class WorkspaceError(Exception):
    """A workspace operation refused or failed; `reason` is the `Failed.error` to answer."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason  # "invalid_arguments", "not_found", "quota", "workspace_unavailable"
        self.detail = detail


def clean_path(path: object, *, allow_root: bool = False) -> str:
    """A workspace-relative path in normal form (`a/b.txt`), or WorkspaceError.

    Refused: non-strings, absolute paths, `..`, NUL and control characters, over-long
    names. `.` and repeated slashes are dropped. The root (`""`) only with `allow_root`.
    """
    if not isinstance(path, str):
        raise WorkspaceError("invalid_arguments", "path: must be a string")
    if len(path) > MAX_PATH:
        raise WorkspaceError("invalid_arguments", f"path: longer than {MAX_PATH} characters")
    if path.startswith(("/", "\\")):
        raise WorkspaceError("invalid_arguments",
                             "path: must be relative to the session workspace, not absolute")
    if any(ord(c) < 32 or c == "\x7f" for c in path):
        raise WorkspaceError("invalid_arguments", "path: control characters are not allowed")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise WorkspaceError("invalid_arguments", "path: `..` is not allowed")
    if any(len(p.encode()) > 255 for p in parts):
        raise WorkspaceError("invalid_arguments", "path: a name is longer than 255 bytes")
    if not parts and not allow_root:
        raise WorkspaceError("invalid_arguments", "path: names no file")
    return "/".join(parts)


@dataclass(frozen=True)
class Entry:
    digest: str  # sha256 hex of the content
    size: int


Manifest = dict[str, Entry]


@dataclass(frozen=True)
class SyncOut:
    """What a sync out changed."""

    written: tuple[str, ...]
    deleted: tuple[str, ...]
    skipped: tuple[str, ...]  # symlinks, special files, undecodable names: not kept
    total_bytes: int


def _session_prefix(tenant: str, session_id: str) -> str:
    for what, value in (("tenant", tenant), ("session_id", session_id)):
        if not _ID.fullmatch(value):
            raise WorkspaceError("invalid_arguments", f"{what}: not a valid id")
    return f"{tenant}/{session_id}"


def _encode_manifest(files: Manifest) -> bytes:
    return json.dumps({"version": 1, "files": {
        p: {"digest": e.digest, "size": e.size} for p, e in sorted(files.items())}},
        separators=(",", ":")).encode()


def _decode_manifest(data: bytes) -> Manifest:
    raw = json.loads(data)
    return {p: Entry(str(e["digest"]), int(e["size"])) for p, e in raw["files"].items()}


def scan(root: Path) -> tuple[Manifest, tuple[str, ...]]:
    """The regular files under `root` with their digests (blocking: run in a thread),
    and the paths skipped (symlinks, devices, fifos, names that are not UTF-8)."""
    files: Manifest = {}
    skipped: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        for name in [*filenames, *(d for d in dirnames if os.path.islink(os.path.join(dirpath, d)))]:
            full = os.path.join(dirpath, name)
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            try:
                rel.encode("utf-8")
                rel = clean_path(rel)
            except (UnicodeEncodeError, WorkspaceError):
                skipped.append(rel.encode("utf-8", "replace").decode())
                continue
            try:
                fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:  # a symlink (ELOOP), or unreadable
                skipped.append(rel)
                continue
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    skipped.append(rel)
                    continue
                h = hashlib.sha256()
                size = 0
                while chunk := os.read(fd, 1 << 20):
                    h.update(chunk)
                    size += len(chunk)
            finally:
                os.close(fd)
            files[rel] = Entry(h.hexdigest(), size)
            if len(files) > MAX_FILES:
                raise WorkspaceError("quota", f"the workspace holds more than {MAX_FILES} files")
    return files, tuple(skipped)


class WorkspaceStore:
    """Session workspaces and whole tool outputs in JetStream Object Stores."""

    def __init__(self, js: JetStreamContext, *, quota_bytes: int,
                 workspace: subjects.ObjectStoreSpec = subjects.WORKSPACE_BUCKET,
                 outputs: subjects.ObjectStoreSpec = subjects.TOOL_OUTPUT_BUCKET,
                 timeout_s: float = 30.0) -> None:
        self.js = js
        self.quota_bytes = quota_bytes
        self.specs = {"workspace": workspace, "outputs": outputs}
        self.timeout_s = timeout_s
        self._stores: dict[str, ObjectStore] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def _store(self, which: str) -> ObjectStore:
        store = self._stores.get(which)
        if store is None:
            spec = self.specs[which]
            try:
                store = await self.js.object_store(spec.bucket)
            except BucketNotFoundError:
                # not yet created by a service: create it as they would (services may;
                # a node without the right gets a timeout below)
                from shared.infra.messaging import Bus

                await Bus(self.js._nc, "node").ensure_object_stores((spec,))
                store = await self.js.object_store(spec.bucket)
            self._stores[which] = store
        return store

    async def _op(self, coro):
        try:
            return await asyncio.wait_for(coro, self.timeout_s)
        except (WorkspaceError, ObjectNotFoundError, NotFoundError):
            raise
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            raise WorkspaceError("workspace_unavailable",
                                 f"the workspace store did not answer: {type(exc).__name__}") from None

    def lock(self, tenant: str, session_id: str) -> asyncio.Lock:
        """Serializes this node's calls on one session (the lock of an idle session is
        dropped by `release`)."""
        return self._locks.setdefault(_session_prefix(tenant, session_id), asyncio.Lock())

    def release(self, tenant: str, session_id: str) -> None:
        key = _session_prefix(tenant, session_id)
        lock = self._locks.get(key)
        if lock is not None and not lock.locked() and not getattr(lock, "_waiters", None):
            self._locks.pop(key, None)

    # -- manifest ---------------------------------------------------------------------

    async def manifest(self, tenant: str, session_id: str) -> Manifest:
        name = f"{_session_prefix(tenant, session_id)}/manifest"
        store = await self._op(self._store("workspace"))
        try:
            result = await self._op(store.get(name))
        except (ObjectNotFoundError, NotFoundError):
            return {}
        return _decode_manifest(result.data or b'{"files": {}}')

    async def _commit(self, tenant: str, session_id: str, changes: dict[str, Entry | None],
                      blobs: dict[str, Path | bytes]) -> Manifest:
        """Apply `changes` (path -> new entry, or None: deleted) to the current manifest:
        quota first, then the new blobs, then the manifest; old blobs no file uses any
        more are removed last."""
        prefix = _session_prefix(tenant, session_id)
        store = await self._op(self._store("workspace"))
        current = await self.manifest(tenant, session_id)
        merged = dict(current)
        for path, entry in changes.items():
            if entry is None:
                merged.pop(path, None)
            else:
                merged[path] = entry
        total = sum(e.size for e in merged.values())
        if total > self.quota_bytes:
            raise WorkspaceError("quota", (
                f"the session workspace would hold {total / 2**20:.2f} MiB, over its quota of "
                f"{self.quota_bytes / 2**20:g} MiB; nothing of this call was kept"))
        if len(merged) > MAX_FILES:
            raise WorkspaceError("quota", f"the session workspace would hold {len(merged)} "
                                          f"files, over {MAX_FILES}; nothing was kept")
        have = {e.digest for e in current.values()}
        sem = asyncio.Semaphore(_PARALLEL)

        async def upload(digest: str, source: Path | bytes) -> None:
            async with sem:
                if isinstance(source, Path):
                    with source.open("rb") as f:
                        await self._op(store.put(f"{prefix}/blobs/{digest}", f))
                else:
                    await self._op(store.put(f"{prefix}/blobs/{digest}", io.BytesIO(source)))

        await asyncio.gather(*(upload(d, s) for d, s in blobs.items() if d not in have))
        await self._op(store.put(f"{prefix}/manifest", _encode_manifest(merged)))
        used = {e.digest for e in merged.values()}
        for digest in have - used:
            try:
                await self._op(store.delete(f"{prefix}/blobs/{digest}"))
            except (WorkspaceError, ObjectNotFoundError, NotFoundError):
                pass  # an unreferenced blob left behind costs space, never correctness
        return merged

    # -- sync -------------------------------------------------------------------------

    async def sync_in(self, tenant: str, session_id: str, dest: Path) -> Manifest:
        """Write the session's files into the (empty, private) directory `dest`."""
        prefix = _session_prefix(tenant, session_id)
        files = await self.manifest(tenant, session_id)
        store = await self._op(self._store("workspace"))
        sem = asyncio.Semaphore(_PARALLEL)

        async def fetch(path: str, entry: Entry) -> None:
            target = dest / clean_path(path)
            async with sem:
                target.parent.mkdir(parents=True, exist_ok=True)
                if entry.size == 0:
                    target.write_bytes(b"")
                    return
                with target.open("wb") as f:
                    await self._op(store.get(f"{prefix}/blobs/{entry.digest}", writeinto=f))

        await asyncio.gather(*(fetch(p, e) for p, e in files.items()))
        return files

    async def sync_out(self, tenant: str, session_id: str, src: Path, base: Manifest) -> SyncOut:
        """Commit what changed in `src` since `base` (the manifest it was synced from)."""
        now, skipped = await asyncio.to_thread(scan, src)
        changes: dict[str, Entry | None] = {}
        blobs: dict[str, Path | bytes] = {}
        for path, entry in now.items():
            if base.get(path) != entry:
                changes[path] = entry
                blobs.setdefault(entry.digest, src / path)
        deleted = tuple(sorted(p for p in base if p not in now))
        for path in deleted:
            changes[path] = None
        if not changes:
            return SyncOut((), (), skipped, sum(e.size for e in base.values()))
        merged = await self._commit(tenant, session_id, changes, blobs)
        written = tuple(sorted(p for p, e in changes.items() if e is not None))
        return SyncOut(written, deleted, skipped, sum(e.size for e in merged.values()))

    # -- single files (files.read / files.write / files.list) ----------------------------

    async def read(self, tenant: str, session_id: str, path: str) -> tuple[bytes, Entry]:
        path = clean_path(path)
        entry = (await self.manifest(tenant, session_id)).get(path)
        if entry is None:
            raise WorkspaceError("not_found", f"path: no file {path!r} in the session workspace")
        if entry.size == 0:
            return b"", entry
        store = await self._op(self._store("workspace"))
        result = await self._op(store.get(
            f"{_session_prefix(tenant, session_id)}/blobs/{entry.digest}"))
        return result.data or b"", entry

    async def write(self, tenant: str, session_id: str, path: str, data: bytes) -> Manifest:
        path = clean_path(path)
        entry = Entry(hashlib.sha256(data).hexdigest(), len(data))
        files = await self.manifest(tenant, session_id)
        if any(p.startswith(path + "/") for p in files) or any(
                path.startswith(p + "/") for p in files):
            raise WorkspaceError("invalid_arguments",
                                 f"path: {path!r} is a directory or lies under a file")
        return await self._commit(tenant, session_id, {path: entry}, {entry.digest: data})

    async def purge(self, tenant: str, session_id: str) -> tuple[int, int]:
        """Delete the session's workspace: each blob its manifest names, then the manifest
        (so an interrupted purge is simply run again). (objects deleted, their bytes).
        Blobs a crashed commit left unreferenced are not found this way (an object store
        cannot be listed by prefix without reading every name in the bucket)."""
        prefix = _session_prefix(tenant, session_id)
        files = await self.manifest(tenant, session_id)
        store = await self._op(self._store("workspace"))
        sizes = {e.digest: e.size for e in files.values() if e.size > 0}
        deleted = [0, 0]
        sem = asyncio.Semaphore(_PARALLEL)

        async def delete(name: str, size: int) -> None:
            async with sem:
                try:
                    await self._op(store.delete(name))
                except (ObjectNotFoundError, NotFoundError):
                    return
                deleted[0] += 1
                deleted[1] += size

        await asyncio.gather(*(delete(f"{prefix}/blobs/{d}", n) for d, n in sizes.items()))
        await delete(f"{prefix}/manifest", 0)
        return deleted[0], deleted[1]

    # -- whole outputs --------------------------------------------------------------------

    async def put_output(self, tenant: str, session_id: str, tool_call_id: str,
                         data: bytes) -> str:
        """Keep a call's whole output; its `output_ref`."""
        ref = subjects.tool_output_ref(_session_prefix(tenant, session_id).split("/")[0],
                                       session_id, tool_call_id)
        _, name = subjects.parse_output_ref(ref)
        store = await self._op(self._store("outputs"))
        await self._op(store.put(name, io.BytesIO(data)))
        return ref

    async def get_output(self, ref: str) -> bytes:
        _, name = subjects.parse_output_ref(ref)
        store = await self._op(self._store("outputs"))
        return (await self._op(store.get(name))).data or b""

"""The fleet's model store: the JetStream Object Store bucket `NEXUS_MODELS`.

One object per model, named by the model; its description holds the `ModelArtifact`
(SHA-256 of the whole file and the GGUF header's metadata) as JSON. NATS chunks the
file (128 KiB), checks each object's own digest and replicates it in a cluster.

Nodes read a model chunk by chunk through an ordered consumer on the object's chunk
subject (`read_chunks`), starting at a stream sequence: a resumed download asks for
the chunks after the last one it wrote, so bytes already on disk are never fetched
again.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
from nats.js import api
from nats.js.errors import NotFoundError
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE

from shared.contracts.subjects import MODEL_BUCKET
from shared.domain.placement import ModelArtifact

CHUNK_BYTES = 128 * 1024


class StoredModel(msgspec.Struct, frozen=True, kw_only=True):
    artifact: ModelArtifact
    nuid: str
    chunks: int
    modified: str = ""


class _Progress(io.RawIOBase):
    """A file reader that reports bytes read (the import's progress bar)."""

    def __init__(self, f, progress: Callable[[int], None] | None) -> None:
        self.f = f
        self.done = 0
        self.progress = progress

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        self.done += n or 0
        if self.progress is not None and n:
            self.progress(self.done)
        return n or 0


class ModelStore:
    def __init__(self, js, bucket: str = MODEL_BUCKET.bucket) -> None:
        self.js = js
        self.bucket = bucket
        self.stream = f"OBJ_{bucket}"
        self._obs = None

    async def obs(self):
        if self._obs is None:
            self._obs = await self.js.object_store(self.bucket)
        return self._obs

    async def put(self, path: Path, artifact: ModelArtifact,
                  progress: Callable[[int], None] | None = None) -> StoredModel:
        obs = await self.obs()
        meta = api.ObjectMeta(name=artifact.name,
                              description=msgspec.json.encode(artifact).decode(),
                              options=api.ObjectMetaOptions(max_chunk_size=CHUNK_BYTES))
        with open(path, "rb") as f:  # noqa: ASYNC230 - nats-py reads it in its executor
            info = await obs.put(artifact.name, _Progress(f, progress), meta=meta)
        return StoredModel(artifact=artifact, nuid=info.nuid, chunks=info.chunks or 0,
                           modified=info.mtime or "")

    async def get(self, name: str) -> StoredModel | None:
        obs = await self.obs()
        try:
            info = await obs.get_info(name)
        except NotFoundError:
            return None
        return _stored(info)

    async def list(self) -> list[StoredModel]:
        obs = await self.obs()
        try:
            infos = await obs.list()
        except NotFoundError:
            return []
        return sorted((s for i in infos if (s := _stored(i)) is not None),
                      key=lambda s: s.artifact.name)

    async def delete(self, name: str) -> bool:
        obs = await self.obs()
        try:
            await obs.delete(name)
        except NotFoundError:
            return False
        return True

    def chunk_subject(self, nuid: str) -> str:
        return OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=self.bucket, obj=nuid)

    async def read_chunks(self, stored: StoredModel, after_seq: int = 0,
                          idle_s: float = 5.0) -> AsyncIterator[tuple[int, bytes, int]]:
        """(stream sequence, bytes, chunks still pending) of each chunk after
        `after_seq` (0: from the first). Raises TimeoutError when no chunk arrives for
        `idle_s` (a stall is the caller's to report)."""
        config = None
        policy = api.DeliverPolicy.ALL
        if after_seq:
            policy = api.DeliverPolicy.BY_START_SEQUENCE
            config = api.ConsumerConfig(opt_start_seq=after_seq + 1)
        sub = await self.js.subscribe(self.chunk_subject(stored.nuid), ordered_consumer=True,
                                      deliver_policy=policy, config=config)
        try:
            while True:
                msg = await sub.next_msg(timeout=idle_s)
                meta = msg.metadata
                yield meta.sequence.stream, msg.data, meta.num_pending
                if meta.num_pending == 0:
                    return
        except TimeoutError:
            raise TimeoutError(f"no chunk of {stored.artifact.name} for {idle_s:g}s") from None
        finally:
            with contextlib.suppress(Exception):  # connection gone: nothing to undo
                await sub.unsubscribe()


def _stored(info) -> StoredModel | None:
    if getattr(info, "deleted", False) or not info.description:
        return None
    try:
        artifact = msgspec.json.decode(info.description, type=ModelArtifact)
    except msgspec.DecodeError:
        return None  # not put by Nexus
    return StoredModel(artifact=artifact, nuid=info.nuid, chunks=info.chunks or 0,
                       modified=info.mtime or "")

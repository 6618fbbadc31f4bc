"""A fake hosted-LLM upstream: a real HTTP server speaking the real wire protocols.

Nexus talks to hosted LLM APIs that tests cannot reach. This module is the stand-in: a
raw ASGI app served by uvicorn (httptools + uvloop when installed) that speaks

* OpenAI chat completions  ``POST /v1/chat/completions`` (JSON and SSE ``chat.completion.chunk``
  streams, ``stream_options.include_usage``, ``max_tokens``/``max_completion_tokens``, ``stop``,
  ``tools``) and ``GET /v1/models``;
* Anthropic Messages ``POST /v1/messages`` (JSON and the real SSE event sequence) and
  ``GET /v1/models`` when an ``anthropic-version`` header is sent;
* Ollama ``POST /api/chat`` (NDJSON stream by default, single JSON with ``"stream": false``),
  ``GET /api/tags`` and ``GET /api/version``; and its model management: ``POST /api/pull``
  (NDJSON progress ``{status, digest, total, completed}`` per layer, bytes advancing at
  ``pull_rate_bps``, then ``success``; the pulled model joins ``/api/tags``, ``/v1/models``
  and is served) and ``DELETE /api/delete``. Pull names script the failures: ``missing*``
  has no manifest (an ``{"error"}`` line), ``broken*`` fails half-way through its first
  layer (digest mismatch), ``stall*`` stops sending after its first progress line. A pull
  cut off half-way resumes from the bytes it had, as Ollama's blob parts do.

Everything is deterministic so tests can check usage accounting exactly:

* The reply is ``reply_text(n)`` = ``"tok0 tok1 ... tok{n-1}"``, streamed one word per chunk
  (``"tok0"``, ``" tok1"``, ...). ``n`` is the configured ``reply_tokens`` (or ``N`` when the last
  user message contains ``FAKE_TOKENS=N``), cut to the request's token limit (``max_tokens`` /
  ``max_completion_tokens`` / Anthropic ``max_tokens`` / Ollama ``options.num_predict``), in
  which case the finish reason is ``length`` (Anthropic ``max_tokens``).
* A stop string (``stop`` / ``stop_sequences`` / ``options.stop``) found in that text cuts the
  reply just before it (finish ``stop``; Anthropic ``stop_sequence`` with the matched string).
* Completion tokens = number of whitespace-separated words in the reply = number of content
  chunks streamed. Prompt tokens = ``estimate_prompt_tokens(messages, system)``: words of the
  text in every message (plus the Anthropic ``system``) + 3 per message, + the configured
  ``template_tokens`` (default 0): what a real runtime's chat template adds to each prompt
  (BOS, turn markers, a system preamble), so the usage can be larger than a naive count.
* With ``tools`` in the request and ``CALL_TOOL`` in the last user message (``CALL_TOOL:name``
  picks a tool, otherwise the first), the reply is a tool call whose arguments are filled from
  the tool's JSON schema; its completion tokens are the words of ``json.dumps(arguments)``.
* ``FAKE_AGENT={"steps": [[{"name": ..., "arguments": {...}}, ...], ...], "answer": "..."}`` in
  the first user message scripts a multi-step agent (OpenAI protocol): with k assistant
  tool-call messages already in the request, the reply is the tool calls of ``steps[k]``
  (several in one answer: parallel calls), after the last step the answer text.

Fault injection: ``script(*behaviours)`` (or ``POST /_fake/script`` with a JSON list) queues
behaviours consumed FIFO, one per completion request (after auth and validation); then
requests are normal again. A behaviour is a dict combining any of:

* ``{}``                                 answer normally
* ``{"status": 500}``                    error with the protocol's error body; add
  ``"retry_after": 1`` for a ``Retry-After`` header, ``"message"`` to set the text
* ``{"hang": True}``                     accept, never answer until the client goes away
* ``{"slow_first_byte_ms": N}``          wait N ms before the response headers
* ``{"drop_before_first_token": True}``  send 200 headers, then close without any chunk
  (non-streaming: headers with a Content-Length, then close without the body)
* ``{"drop_after_tokens": K}``           stream K content chunks, then cut the connection
  (non-streaming: half the body, then close)
* ``{"token_delay_ms": N}``              N ms before every content chunk (non-streaming: the
  response waits N ms per token)
* ``{"ignore_max_tokens": True}``        answer in full whatever token limit was asked
  (a provider that ignores ``max_tokens``)
* ``{"no_usage": True}``                 an OpenAI stream without its usage chunk, even when
  ``stream_options.include_usage`` asks for it (a runtime that reports no usage)

Streams (and every wait) watch the connection: a client that disconnects stops the
generation, and the request is counted in ``stats.cancelled`` / ``stats.cancelled_ids``.

Control endpoints (for a fake run as its own process): ``POST /_fake/script``,
``GET /_fake/stats``, ``POST /_fake/reset`` (script and counters), ``GET|POST /_fake/config``
(``reply_tokens``, ``token_delay_ms``, ``first_byte_delay_ms``, ``template_tokens``).

In-process::

    with FakeUpstream(reply_tokens=8).start() as fake:
        client = openai.OpenAI(base_url=fake.openai_base_url, api_key="x")

As a process (prints ``READY <port>`` on stdout once listening; ``--port 0`` picks one)::

    python -m tests.fake_upstream --port 8911 --delay-ms 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import dataclasses
import functools
import json
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import msgspec
import uvicorn

__all__ = [
    "FakeStats",
    "FakeUpstream",
    "FakeUpstreamControl",
    "FakeUpstreamProcess",
    "estimate_prompt_tokens",
    "reply_text",
]

REPO = Path(__file__).resolve().parents[1]
COMPLETION_PATHS = ("/v1/chat/completions", "/v1/messages", "/api/chat")

_encode = msgspec.json.encode
_decode = msgspec.json.decode

# ------------------------------------------------------------------ deterministic content


@functools.lru_cache(maxsize=256)
def _pieces(n: int) -> tuple[str, ...]:
    return tuple(f"tok{i}" if i == 0 else f" tok{i}" for i in range(max(n, 0)))


def reply_text(n: int) -> str:
    """The text of an ``n``-token reply: ``"tok0 tok1 ... tok{n-1}"``."""
    return "".join(_pieces(n))


def _text_of(content: Any) -> str:
    """The text inside a message's content: a string, or a list of content parts/blocks."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(_text_of(part) for part in content)
    if isinstance(content, dict):
        if isinstance(content.get("text"), str):
            return content["text"]
        if "content" in content:  # Anthropic tool_result
            return _text_of(content["content"])
    return ""


def estimate_prompt_tokens(messages: Iterable[dict[str, Any]], system: Any = None) -> int:
    """The fake's prompt token count: words of each message's text + 3 per message.

    ``system`` (Anthropic's top-level system prompt), when given, counts as one more message.
    """
    total = 0
    if system:
        total += len(_text_of(system).split()) + 3
    for message in messages:
        total += len(_text_of(message.get("content") if isinstance(message, dict) else None)
                     .split()) + 3
    return total


_FAKE_TOKENS = re.compile(r"FAKE_TOKENS=(\d+)")
_WORD = re.compile(r"\s*\S+")


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _text_of(message.get("content"))
    return ""


_AGENT = re.compile(r"FAKE_AGENT=(\{.*\})", re.DOTALL)


def _agent_script(messages: list[Any]) -> dict[str, Any] | None:
    """``FAKE_AGENT={...}`` in the first user message: a scripted multi-step agent
    (OpenAI protocol). ``{"steps": [[{"name": t, "arguments": {...}}, ...], ...],
    "answer": "..."}``: the reply to a request with k assistant tool-call messages
    already in it is the tool calls of ``steps[k]`` (several at once: parallel calls),
    after the last step the answer (``{last_tool}`` in it: the last tool result's text).
    Stateless, so concurrent and retried runs get the same replies."""
    for message in messages:
        if isinstance(message, dict) and message.get("role") == "user":
            found = _AGENT.search(_text_of(message.get("content")))
            if not found:
                return None
            try:
                script = json.loads(found.group(1))
            except ValueError:
                return None
            return script if isinstance(script, dict) else None
    return None


def _example_value(spec: Any) -> Any:
    if not isinstance(spec, dict):
        return None
    if spec.get("enum"):
        return spec["enum"][0]
    kind = spec.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    return {"string": "fake", "integer": 1, "number": 1.5, "boolean": True, "array": [],
            "object": {}}.get(kind)


@dataclasses.dataclass(slots=True)
class _Plan:
    pieces: list[str]          # content pieces (text) or argument fragments (tool call)
    finish: str                # "stop" | "length" | "stop_sequence" | "tool"
    stop_sequence: str | None
    prompt_tokens: int
    tool_name: str | None = None
    tool_args: dict[str, Any] | None = None
    tool_json: str | None = None
    agent_calls: list[tuple[str, str]] | None = None  # FAKE_AGENT: (name, arguments JSON), all at once

    @property
    def completion_tokens(self) -> int:
        return len(self.pieces)

    @property
    def text(self) -> str:
        return "".join(self.pieces) if self.tool_name is None else ""


def _make_plan(*, messages: list[Any], system: Any, limit: Any, stops: Any, tools: Any,
               tools_disabled: bool, reply_tokens: int) -> _Plan:
    prompt = estimate_prompt_tokens(messages, system)
    last_user = _last_user_text(messages)
    agent = _agent_script(messages)
    if agent is not None:
        done = sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "assistant"
                   and m.get("tool_calls"))
        steps = agent.get("steps") or []
        if tools and done < len(steps):
            calls = [(str(c["name"]), json.dumps(c.get("arguments", {}))) for c in steps[done]]
            words = [w for _, j in calls for w in _WORD.findall(j)]
            return _Plan(words, "tool", None, prompt, calls[0][0], None, calls[0][1],
                         agent_calls=calls)
        answer = str(agent.get("answer", "done"))
        if "{last_tool}" in answer:  # the answer quotes the last tool result it read
            last = next((_text_of(m.get("content")) for m in reversed(messages)
                         if isinstance(m, dict) and m.get("role") == "tool"), "")
            answer = answer.replace("{last_tool}", last.strip())
        return _Plan(_WORD.findall(answer), "stop", None, prompt)
    if tools and not tools_disabled and "CALL_TOOL" in last_user:
        specs = []
        for tool in tools:
            if not isinstance(tool, dict):
                continue
            fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
            schema = fn.get("parameters") or fn.get("input_schema") or {}
            specs.append((str(fn.get("name", "tool")), schema))
        if specs:
            wanted = re.search(r"CALL_TOOL:(\S+)", last_user)
            name, schema = next((s for s in specs if wanted and s[0] == wanted.group(1)),
                                specs[0])
            props = schema.get("properties") if isinstance(schema, dict) else None
            args = {k: _example_value(v) for k, v in (props or {}).items()}
            args_json = json.dumps(args)
            return _Plan(_WORD.findall(args_json), "tool", None, prompt, name, args, args_json)
    marker = _FAKE_TOKENS.search(last_user)
    full = int(marker.group(1)) if marker else reply_tokens
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 <= limit < full:
        n, finish = limit, "length"
    else:
        n, finish = full, "stop"
    pieces = list(_pieces(n))
    if isinstance(stops, str):
        stops = [stops]
    if stops and pieces:
        text = "".join(pieces)
        hits = [(text.find(s), s) for s in stops if isinstance(s, str) and s and s in text]
        if hits:
            cut, seq = min(hits)
            kept: list[str] = []
            pos = 0
            for piece in pieces:
                if pos + len(piece) <= cut:
                    kept.append(piece)
                    pos += len(piece)
                    continue
                part = piece[: cut - pos]
                if part.strip():
                    kept.append(part)
                break
            return _Plan(kept, "stop_sequence", seq, prompt)
    return _Plan(pieces, finish, None, prompt)


# ------------------------------------------------------------------ behaviours and stats

_BEHAVIOUR_KEYS: dict[str, tuple[type, ...]] = {
    "status": (int,),
    "retry_after": (int, float),
    "message": (str,),
    "hang": (bool,),
    "slow_first_byte_ms": (int, float),
    "drop_before_first_token": (bool,),
    "drop_after_tokens": (int,),
    "token_delay_ms": (int, float),
    "ignore_max_tokens": (bool,),
    "no_usage": (bool,),
}


def _check_behaviour(behaviour: Any) -> dict[str, Any]:
    if not isinstance(behaviour, dict):
        raise TypeError(f"a behaviour is a dict, not {behaviour!r}")
    for key, value in behaviour.items():
        kinds = _BEHAVIOUR_KEYS.get(key)
        if kinds is None:
            raise ValueError(f"unknown behaviour key {key!r}; known: {sorted(_BEHAVIOUR_KEYS)}")
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise ValueError(f"behaviour {key!r} must be {kinds[0].__name__}, got {value!r}")
        if not isinstance(value, bool) and isinstance(value, (int, float)) and value < 0:
            raise ValueError(f"behaviour {key!r} must not be negative")
    if "status" in behaviour and not 400 <= behaviour["status"] <= 599:
        raise ValueError("behaviour 'status' must be an HTTP error status (400-599)")
    return dict(behaviour)


@dataclasses.dataclass(frozen=True)
class FakeStats:
    """A snapshot of what the fake has seen (also served as JSON by ``GET /_fake/stats``).

    ``requests``: count per path (control paths excluded). ``recent``: the last completion
    requests, oldest first, as ``{"id", "path", "headers", "body"}``. ``outcomes``: per
    completion request ``{"id", "path", "stream", "status", "tokens_sent", "outcome"}``, where
    outcome is ``completed`` | ``cancelled`` (the client went away first) | ``dropped``
    (a scripted cut) | ``error`` (an error status) | ``aborted`` (the fake was stopping).
    """

    requests: dict[str, int]
    total: int
    in_flight: int
    completed: int
    cancelled: int
    cancelled_ids: list[str]
    dropped: int
    errors: int
    tokens_sent: int
    script_pending: int
    recent: list[dict[str, Any]] = dataclasses.field(repr=False)
    outcomes: list[dict[str, Any]] = dataclasses.field(repr=False)

    @property
    def bodies(self) -> list[Any]:
        return [r["body"] for r in self.recent]

    @property
    def last_body(self) -> Any:
        return self.recent[-1]["body"] if self.recent else None

    @property
    def last_headers(self) -> dict[str, str]:
        return self.recent[-1]["headers"] if self.recent else {}

    def count(self, path: str) -> int:
        return self.requests.get(path, 0)

    def outcome(self, request_id: str) -> dict[str, Any] | None:
        return next((o for o in reversed(self.outcomes) if o["id"] == request_id), None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FakeStats:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


class _State:
    """Script FIFO and counters, shared between the server loop and test threads."""

    def __init__(self, keep: int = 100) -> None:
        self.lock = threading.Lock()
        self.keep = keep
        self.script: deque[dict[str, Any]] = deque()
        self.reset_counters()

    def reset_counters(self) -> None:
        self.requests: dict[str, int] = {}
        self.total = 0
        self.in_flight = 0
        self.completed = 0
        self.cancelled = 0
        self.cancelled_ids: deque[str] = deque(maxlen=1000)
        self.dropped = 0
        self.errors = 0
        self.tokens_sent = 0
        self.recent: deque[dict[str, Any]] = deque(maxlen=self.keep)
        self.outcomes: deque[dict[str, Any]] = deque(maxlen=1000)

    def snapshot(self) -> FakeStats:
        with self.lock:
            return FakeStats(
                requests=dict(self.requests), total=self.total, in_flight=self.in_flight,
                completed=self.completed, cancelled=self.cancelled,
                cancelled_ids=list(self.cancelled_ids), dropped=self.dropped,
                errors=self.errors, tokens_sent=self.tokens_sent,
                script_pending=len(self.script), recent=list(self.recent),
                outcomes=list(self.outcomes),
            )


# ------------------------------------------------------------------ ASGI plumbing

# Set inside a request's task when the fake cuts a connection on purpose, so uvicorn's
# "returned without completing response" error for that request is not logged.
_DELIBERATE = contextvars.ContextVar("fake_upstream_deliberate_drop", default=False)


class _QuietDeliberateDrops(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _DELIBERATE.get()


def _install_log_filter() -> None:
    log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietDeliberateDrops) for f in log.filters):
        log.addFilter(_QuietDeliberateDrops())


class _Watch:
    """Watches one request's connection: ``event`` is set when the client disconnects
    (``disconnected``) or the fake is stopping."""

    __slots__ = ("_registry", "_task", "disconnected", "event")

    def __init__(self, receive: Callable[[], Any], registry: set[_Watch]) -> None:
        self.event = asyncio.Event()
        self.disconnected = False
        self._registry = registry
        registry.add(self)
        self._task = asyncio.get_running_loop().create_task(self._run(receive))

    async def _run(self, receive: Callable[[], Any]) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                self.event.set()
                return

    async def sleep(self, seconds: float) -> bool:
        """Wait ``seconds``; True when the request was aborted meanwhile."""
        if self.event.is_set():
            return True
        if seconds <= 0:
            return False
        try:
            await asyncio.wait_for(self.event.wait(), seconds)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self._task.cancel()
        self._registry.discard(self)


def _hdr(name: str, value: str | int) -> tuple[bytes, bytes]:
    return name.encode("latin-1"), str(value).encode("latin-1")


_JSON = (b"content-type", b"application/json")
_SSE = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
_NDJSON = [(b"content-type", b"application/x-ndjson")]


async def _send_body(send: Callable[..., Any], status: int, body: bytes,
                     headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_json(send: Callable[..., Any], status: int, obj: Any,
                     headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    await _send_body(send, status, _encode(obj), [_JSON, *headers])


# ------------------------------------------------------------------ protocol specifics

_OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
                       403: "permission_error", 404: "invalid_request_error",
                       429: "requests"}
_OPENAI_ERROR_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded",
                       404: "model_not_found"}
_ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                          403: "permission_error", 404: "not_found_error",
                          413: "request_too_large", 429: "rate_limit_error",
                          500: "api_error", 503: "overloaded_error", 529: "overloaded_error"}
_DEFAULT_MESSAGES = {400: "Bad request.", 401: "Incorrect API key provided.",
                     403: "Permission denied.", 404: "Not found.",
                     429: "Rate limit reached for requests. Please try again later.",
                     500: "The server had an error while processing your request.",
                     503: "The engine is currently overloaded, please try again later.",
                     529: "Overloaded"}


def _error_body(proto: str, status: int, message: str | None) -> dict[str, Any]:
    text = message or _DEFAULT_MESSAGES.get(status, f"HTTP {status}")
    if proto == "anthropic":
        kind = _ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500
                                          else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": text}}
    if proto == "ollama":
        return {"error": text}
    kind = _OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500
                                   else "invalid_request_error")
    return {"error": {"message": text, "type": kind, "param": None,
                      "code": _OPENAI_ERROR_CODES.get(status)}}


@dataclasses.dataclass(slots=True)
class _Ctx:
    proto: str
    rid: str
    path: str
    model: str
    stream: bool
    created: int
    started_ns: int
    include_usage: bool = False

    @property
    def ollama_time(self) -> str:
        return datetime.fromtimestamp(self.created, UTC).strftime(
            "%Y-%m-%dT%H:%M:%S.000000000Z")


_OPENAI_FINISH = {"stop": "stop", "length": "length", "stop_sequence": "stop",
                  "tool": "tool_calls"}
_ANTHROPIC_STOP = {"stop": "end_turn", "length": "max_tokens",
                   "stop_sequence": "stop_sequence", "tool": "tool_use"}


def _openai_usage(plan: _Plan) -> dict[str, Any]:
    c = plan.completion_tokens
    return {"prompt_tokens": plan.prompt_tokens, "completion_tokens": c,
            "total_tokens": plan.prompt_tokens + c,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0,
                                          "rejected_prediction_tokens": 0}}


def _anthropic_usage(plan: _Plan, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": plan.prompt_tokens, "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


def _tool_call_id(ctx: _Ctx, prefix: str) -> str:
    return prefix + ctx.rid.rsplit("-", 1)[-1].rsplit("_", 1)[-1]


def _full_response(ctx: _Ctx, plan: _Plan) -> dict[str, Any]:
    if ctx.proto == "openai":
        message: dict[str, Any] = {"role": "assistant", "content": plan.text, "refusal": None,
                                   "annotations": []}
        if plan.agent_calls:
            message["content"] = None
            message["tool_calls"] = [{
                "id": f"{_tool_call_id(ctx, 'call_')}_{i}", "type": "function",
                "function": {"name": name, "arguments": args}}
                for i, (name, args) in enumerate(plan.agent_calls)]
        elif plan.tool_name is not None:
            message["content"] = None
            message["tool_calls"] = [{
                "id": _tool_call_id(ctx, "call_"), "type": "function",
                "function": {"name": plan.tool_name, "arguments": plan.tool_json}}]
        return {"id": ctx.rid, "object": "chat.completion", "created": ctx.created,
                "model": ctx.model,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": _OPENAI_FINISH[plan.finish]}],
                "usage": _openai_usage(plan), "service_tier": "default",
                "system_fingerprint": "fp_fake"}
    if ctx.proto == "anthropic":
        if plan.tool_name is not None:
            content = [{"type": "tool_use", "id": _tool_call_id(ctx, "toolu_"),
                        "name": plan.tool_name, "input": plan.tool_args}]
        else:
            content = [{"type": "text", "text": plan.text}] if plan.pieces else []
        return {"id": ctx.rid, "type": "message", "role": "assistant", "model": ctx.model,
                "content": content, "stop_reason": _ANTHROPIC_STOP[plan.finish],
                "stop_sequence": plan.stop_sequence,
                "usage": _anthropic_usage(plan, plan.completion_tokens)}
    message = {"role": "assistant", "content": plan.text}
    if plan.tool_name is not None:
        message["tool_calls"] = [{"function": {"name": plan.tool_name,
                                               "arguments": plan.tool_args}}]
    return {"model": ctx.model, "created_at": ctx.ollama_time, "message": message,
            "done": True, **_ollama_done(ctx, plan)}


def _ollama_done(ctx: _Ctx, plan: _Plan) -> dict[str, Any]:
    elapsed = time.monotonic_ns() - ctx.started_ns
    return {"done_reason": "length" if plan.finish == "length" else "stop",
            "total_duration": elapsed, "load_duration": 0,
            "prompt_eval_count": plan.prompt_tokens, "prompt_eval_duration": 0,
            "eval_count": plan.completion_tokens, "eval_duration": elapsed}


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _encode(data) + b"\n\n"


def _stream_parts(ctx: _Ctx, plan: _Plan
                  ) -> tuple[list[tuple[bytes, bytes]], bytes, Callable[[str], bytes],
                             Callable[[], bytes], list[str]]:
    """(headers, head, piece -> bytes, () -> tail, pieces to emit) for a streamed reply."""
    if ctx.proto == "openai":
        base = {"id": ctx.rid, "object": "chat.completion.chunk", "created": ctx.created,
                "model": ctx.model, "system_fingerprint": "fp_fake"}
        if ctx.include_usage:
            base["usage"] = None

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return b"data: " + _encode({**base, "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            ) + b"\n\n"

        if plan.agent_calls:  # every call whole in one chunk: no pieces to emit
            head = chunk({"role": "assistant", "content": None, "tool_calls": [{
                "index": i, "id": f"{_tool_call_id(ctx, 'call_')}_{i}", "type": "function",
                "function": {"name": name, "arguments": args}}
                for i, (name, args) in enumerate(plan.agent_calls)]})

            def piece(p: str) -> bytes:
                return b""
        elif plan.tool_name is not None:
            head = chunk({"role": "assistant", "content": None, "tool_calls": [{
                "index": 0, "id": _tool_call_id(ctx, "call_"), "type": "function",
                "function": {"name": plan.tool_name, "arguments": ""}}]})

            def piece(p: str) -> bytes:
                return chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]})
        else:
            head = chunk({"role": "assistant", "content": "", "refusal": None})

            def piece(p: str) -> bytes:
                return chunk({"content": p})

        def tail() -> bytes:
            out = chunk({}, _OPENAI_FINISH[plan.finish])
            if ctx.include_usage:
                out += b"data: " + _encode({**base, "choices": [],
                                            "usage": _openai_usage(plan)}) + b"\n\n"
            return out + b"data: [DONE]\n\n"

        return ([*_SSE, _hdr("x-request-id", ctx.rid)], head, piece, tail,
                [] if plan.agent_calls else plan.pieces)

    if ctx.proto == "anthropic":
        start = {"type": "message_start", "message": {
            "id": ctx.rid, "type": "message", "role": "assistant", "model": ctx.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": _anthropic_usage(plan, 1)}}
        if plan.tool_name is not None:
            block: dict[str, Any] = {"type": "tool_use", "id": _tool_call_id(ctx, "toolu_"),
                                     "name": plan.tool_name, "input": {}}

            def piece(p: str) -> bytes:
                return _sse("content_block_delta", {
                    "type": "content_block_delta", "index": 0,
                    "delta": {"type": "input_json_delta", "partial_json": p}})
        else:
            block = {"type": "text", "text": ""}

            def piece(p: str) -> bytes:
                return _sse("content_block_delta", {
                    "type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": p}})

        head = (_sse("message_start", start)
                + _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                               "content_block": block})
                + _sse("ping", {"type": "ping"}))

        def tail() -> bytes:
            return (_sse("content_block_stop", {"type": "content_block_stop", "index": 0})
                    + _sse("message_delta", {
                        "type": "message_delta",
                        "delta": {"stop_reason": _ANTHROPIC_STOP[plan.finish],
                                  "stop_sequence": plan.stop_sequence},
                        "usage": {"output_tokens": plan.completion_tokens}})
                    + _sse("message_stop", {"type": "message_stop"}))

        return [*_SSE, _hdr("request-id", ctx.rid)], head, piece, tail, plan.pieces

    created_at = ctx.ollama_time

    def line(message: dict[str, Any]) -> bytes:
        return _encode({"model": ctx.model, "created_at": created_at, "message": message,
                        "done": False}) + b"\n"

    def piece(p: str) -> bytes:
        return line({"role": "assistant", "content": p})

    def tail() -> bytes:
        return _encode({"model": ctx.model, "created_at": created_at,
                        "message": {"role": "assistant", "content": ""}, "done": True,
                        **_ollama_done(ctx, plan)}) + b"\n"

    head, emit = b"", plan.pieces
    if plan.tool_name is not None:  # Ollama sends a tool call as one whole message
        head, emit = line({"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": plan.tool_name, "arguments": plan.tool_args}}]}), []
    return list(_NDJSON), head, piece, tail, emit


# ------------------------------------------------------------------ the app


@dataclasses.dataclass
class _Config:
    models: tuple[str, ...]
    reply_tokens: int
    api_key: str | None
    token_delay_ms: float
    first_byte_delay_ms: float
    strict_models: bool
    template_tokens: int = 0
    pull_bytes: int = 3 * 1024 * 1024  # an Ollama pull's model layer (plus a 1 KiB params layer)
    pull_rate_bps: float = 8 * 1024 * 1024


_RUNTIME_CONFIG = ("reply_tokens", "token_delay_ms", "first_byte_delay_ms", "template_tokens",
                   "pull_bytes", "pull_rate_bps")


class _App:
    """The raw ASGI application."""

    def __init__(self, config: _Config, state: _State) -> None:
        self.config = config
        self.state = state
        self.watches: set[_Watch] = set()
        self._seq = 0
        self._prefix = uuid.uuid4().hex[:8]
        self.routes: dict[tuple[str, str], Callable[..., Any]] = {
            ("POST", "/v1/chat/completions"): self._openai_chat,
            ("POST", "/v1/messages"): self._anthropic_messages,
            ("POST", "/api/chat"): self._ollama_chat,
            ("GET", "/v1/models"): self._models,
            ("GET", "/api/tags"): self._ollama_tags,
            ("GET", "/api/version"): self._ollama_version,
            ("POST", "/api/pull"): self._ollama_pull,
            ("DELETE", "/api/delete"): self._ollama_delete,
            ("GET", "/"): self._root,
            ("POST", "/_fake/script"): self._ctl_script,
            ("GET", "/_fake/stats"): self._ctl_stats,
            ("POST", "/_fake/reset"): self._ctl_reset,
            ("GET", "/_fake/config"): self._ctl_config,
            ("POST", "/_fake/config"): self._ctl_config,
        }
        self._paths = {p for _, p in self.routes}
        self._pulled: dict[str, int] = {}  # layer digest -> bytes an earlier pull got

    def abort_all(self) -> None:
        for watch in list(self.watches):
            watch.event.set()

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any],
                       send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if not path.startswith("/_fake/"):
            with self.state.lock:
                self.state.requests[path] = self.state.requests.get(path, 0) + 1
                self.state.total += 1
        message = await receive()
        body = message.get("body", b"")
        if message.get("more_body"):
            parts = [body]
            while message.get("more_body"):
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                parts.append(message.get("body", b""))
            body = b"".join(parts)
        handler = self.routes.get((method, path))
        if handler is None:
            status = 405 if path in self._paths else 404
            await _send_json(send, status, _error_body(
                "ollama" if path.startswith("/api/") else "openai", status,
                f"Invalid URL ({method} {path})"))
            return
        await handler(scope, receive, send, body)

    # ---------------------------------------------------------- helpers

    def _next_id(self, prefix: str) -> str:
        self._seq += 1  # only touched from the server's loop
        return f"{prefix}{self._prefix}{self._seq:06d}"

    def _authorized(self, scope: dict[str, Any], proto: str) -> bool:
        key = self.config.api_key
        if key is None or proto == "ollama":
            return True
        for name, value in scope["headers"]:
            if name == b"authorization" and value.decode("latin-1") == f"Bearer {key}":
                return True
            if proto == "anthropic" and name == b"x-api-key" and value.decode("latin-1") == key:
                return True
        return False

    def _known_model(self, model: str) -> bool:
        if not self.config.strict_models:
            return True
        models = self.config.models
        return model in models or (model.endswith(":latest") and model[:-7] in models)

    def _finish(self, rid: str, path: str, stream: bool, status: int, tokens: int,
                outcome: str) -> None:
        with self.state.lock:
            st = self.state
            st.in_flight -= 1
            st.tokens_sent += tokens
            if outcome == "completed":
                st.completed += 1
            elif outcome == "cancelled":
                st.cancelled += 1
                st.cancelled_ids.append(rid)
            elif outcome == "dropped":
                st.dropped += 1
            elif outcome == "error":
                st.errors += 1
            st.outcomes.append({"id": rid, "path": path, "stream": stream, "status": status,
                                "tokens_sent": tokens, "outcome": outcome})

    # ---------------------------------------------------------- completions

    async def _openai_chat(self, scope: dict[str, Any], receive: Any, send: Any,
                           body: bytes) -> None:
        await self._complete("openai", "chatcmpl-", scope, receive, send, body)

    async def _anthropic_messages(self, scope: dict[str, Any], receive: Any, send: Any,
                                  body: bytes) -> None:
        await self._complete("anthropic", "msg_", scope, receive, send, body)

    async def _ollama_chat(self, scope: dict[str, Any], receive: Any, send: Any,
                           body: bytes) -> None:
        await self._complete("ollama", "ollama-", scope, receive, send, body)

    def _validate(self, proto: str, req: Any, scope: dict[str, Any]) -> tuple[int, str] | None:
        if not isinstance(req, dict):
            return 400, "We could not parse the JSON body of your request."
        model = req.get("model")
        if not isinstance(model, str) or not model:
            return 400, "you must provide a model parameter"
        messages = req.get("messages")
        if not isinstance(messages, list) or (proto != "ollama" and not messages):
            return 400, "messages: a non-empty list of messages is required"
        if proto == "anthropic":
            if not any(n == b"anthropic-version" for n, _ in scope["headers"]):
                return 400, "anthropic-version: header is required"
            if not isinstance(req.get("max_tokens"), int):
                return 400, "max_tokens: Field required"
        if not self._known_model(model):
            if proto == "ollama":
                return 404, f'model "{model}" not found, try pulling it first'
            if proto == "anthropic":
                return 404, f"model: {model}"
            return 404, f"The model `{model}` does not exist or you do not have access to it."
        return None

    def _plan(self, proto: str, req: dict[str, Any], ignore_limit: bool = False) -> _Plan:
        reply = self.config.reply_tokens
        if ignore_limit:
            req = {k: v for k, v in req.items()
                   if k not in ("max_tokens", "max_completion_tokens", "options")}
        if proto == "openai":
            limit = req.get("max_completion_tokens")
            if limit is None:
                limit = req.get("max_tokens")
            return _make_plan(messages=req["messages"], system=None, limit=limit,
                              stops=req.get("stop"), tools=req.get("tools"),
                              tools_disabled=req.get("tool_choice") == "none",
                              reply_tokens=reply)
        if proto == "anthropic":
            choice = req.get("tool_choice")
            return _make_plan(messages=req["messages"], system=req.get("system"),
                              limit=req.get("max_tokens"), stops=req.get("stop_sequences"),
                              tools=req.get("tools"),
                              tools_disabled=isinstance(choice, dict)
                              and choice.get("type") == "none",
                              reply_tokens=reply)
        options = req.get("options") if isinstance(req.get("options"), dict) else {}
        return _make_plan(messages=req["messages"], system=None,
                          limit=options.get("num_predict"), stops=options.get("stop"),
                          tools=req.get("tools"), tools_disabled=False, reply_tokens=reply)

    async def _complete(self, proto: str, id_prefix: str, scope: dict[str, Any],
                        receive: Any, send: Any, raw: bytes) -> None:
        rid = self._next_id(id_prefix)
        path = scope["path"]
        try:
            req: Any = _decode(raw) if raw else None
        except msgspec.DecodeError:
            req = None
        stream = bool(req.get("stream", proto == "ollama")) if isinstance(req, dict) else False
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        with self.state.lock:
            self.state.in_flight += 1
            self.state.recent.append({"id": rid, "path": path, "headers": headers,
                                      "body": req if req is not None else raw.decode(
                                          "utf-8", "replace")})
        status, tokens, outcome = 200, 0, "completed"
        watch: _Watch | None = None
        try:
            if not self._authorized(scope, proto):
                status, outcome = 401, "error"
                message = ("invalid x-api-key" if proto == "anthropic" else
                           "Incorrect API key provided. You can find your API key at "
                           "https://platform.openai.com/account/api-keys.")
                await _send_json(send, 401, _error_body(proto, 401, message))
                return
            problem = self._validate(proto, req, scope)
            if problem is not None:
                status, outcome = problem[0], "error"
                await _send_json(send, status, _error_body(proto, *problem))
                return
            with self.state.lock:
                behaviour = self.state.script.popleft() if self.state.script else {}
            plan = self._plan(proto, req, ignore_limit=behaviour.get("ignore_max_tokens", False))
            plan.prompt_tokens += self.config.template_tokens
            ctx = _Ctx(proto, rid, path, req["model"], stream, int(time.time()),
                       time.monotonic_ns())
            if proto == "openai":
                opts = req.get("stream_options")
                ctx.include_usage = bool(isinstance(opts, dict) and opts.get("include_usage")
                                         and not behaviour.get("no_usage", False))
            first_byte_ms = behaviour.get("slow_first_byte_ms", self.config.first_byte_delay_ms)
            token_delay = behaviour.get("token_delay_ms", self.config.token_delay_ms) / 1000
            hang = behaviour.get("hang", False)
            if stream or hang or first_byte_ms or (token_delay and plan.pieces):
                watch = _Watch(receive, self.watches)
                gone = bool(first_byte_ms) and await watch.sleep(first_byte_ms / 1000)
                if hang and not gone:
                    await watch.event.wait()  # until the client goes away (or the fake stops)
                    gone = True
                if gone:
                    outcome = "cancelled" if watch.disconnected else "aborted"
                    _DELIBERATE.set(True)
                    return
            if "status" in behaviour:
                status, outcome = behaviour["status"], "error"
                extra = [(b"x-request-id" if proto == "openai" else b"request-id",
                          rid.encode())]
                if "retry_after" in behaviour:
                    ra = behaviour["retry_after"]
                    extra.append(_hdr("retry-after", int(ra) if float(ra).is_integer() else ra))
                await _send_json(send, status, _error_body(proto, status,
                                                           behaviour.get("message")), extra)
                return
            if stream:
                assert watch is not None
                tokens, outcome = await self._stream(ctx, plan, behaviour, token_delay,
                                                     watch, send)
            else:
                tokens, outcome = await self._respond(ctx, plan, behaviour, token_delay,
                                                      watch, send)
            if outcome != "completed":
                _DELIBERATE.set(True)
        finally:
            if watch is not None:
                watch.close()
            self._finish(rid, path, stream, status, tokens, outcome)

    async def _respond(self, ctx: _Ctx, plan: _Plan, behaviour: dict[str, Any],
                       token_delay: float, watch: _Watch | None, send: Any) -> tuple[int, str]:
        if watch is not None and token_delay and await watch.sleep(
                token_delay * len(plan.pieces)):
            return 0, "cancelled" if watch.disconnected else "aborted"
        body = _encode(_full_response(ctx, plan))
        headers = [_JSON, (b"x-request-id" if ctx.proto == "openai" else b"request-id",
                           ctx.rid.encode())]
        if behaviour.get("drop_before_first_token") or "drop_after_tokens" in behaviour:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            if not behaviour.get("drop_before_first_token"):
                await send({"type": "http.response.body", "body": body[: len(body) // 2],
                            "more_body": True})
            return 0, "dropped"
        await _send_body(send, 200, body, headers)
        return plan.completion_tokens, "completed"

    async def _stream(self, ctx: _Ctx, plan: _Plan, behaviour: dict[str, Any],
                      token_delay: float, watch: _Watch, send: Any) -> tuple[int, str]:
        headers, head, piece, tail, emit = _stream_parts(ctx, plan)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if behaviour.get("drop_before_first_token"):
            return 0, "dropped"
        if head:
            await send({"type": "http.response.body", "body": head, "more_body": True})
        drop_after = behaviour.get("drop_after_tokens")
        sent = 0
        for p in emit:
            if drop_after is not None and sent >= drop_after:
                return sent, "dropped"
            if await watch.sleep(token_delay):
                return sent, "cancelled" if watch.disconnected else "aborted"
            await send({"type": "http.response.body", "body": piece(p), "more_body": True})
            sent += 1
        if drop_after is not None:
            return sent, "dropped"
        if watch.event.is_set():
            return sent, "cancelled" if watch.disconnected else "aborted"
        await send({"type": "http.response.body", "body": tail(), "more_body": False})
        return (sent if emit else plan.completion_tokens), "completed"

    # ---------------------------------------------------------- listings

    async def _models(self, scope: dict[str, Any], receive: Any, send: Any, body: bytes) -> None:
        anthropic = any(n == b"anthropic-version" for n, _ in scope["headers"])
        proto = "anthropic" if anthropic else "openai"
        if not self._authorized(scope, proto):
            await _send_json(send, 401, _error_body(proto, 401, None))
            return
        if anthropic:
            data = [{"type": "model", "id": m, "display_name": m,
                     "created_at": "2025-01-01T00:00:00Z"} for m in self.config.models]
            await _send_json(send, 200, {"data": data, "has_more": False,
                                         "first_id": data[0]["id"] if data else None,
                                         "last_id": data[-1]["id"] if data else None})
            return
        await _send_json(send, 200, {"object": "list", "data": [
            {"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "fake-upstream"}
            for m in self.config.models]})

    async def _ollama_tags(self, scope: dict[str, Any], receive: Any, send: Any,
                           body: bytes) -> None:
        models = []
        for m in self.config.models:
            name = m if ":" in m else f"{m}:latest"
            models.append({"name": name, "model": name,
                           "modified_at": "2025-01-01T00:00:00.000000000Z", "size": 1_000_000,
                           "digest": uuid.uuid5(uuid.NAMESPACE_OID, name).hex * 2,
                           "details": {"parent_model": "", "format": "gguf", "family": "fake",
                                       "families": ["fake"], "parameter_size": "1B",
                                       "quantization_level": "Q4_0"}})
        await _send_json(send, 200, {"models": models})

    async def _ollama_version(self, scope: dict[str, Any], receive: Any, send: Any,
                              body: bytes) -> None:
        await _send_json(send, 200, {"version": "0.6.0"})

    # ---------------------------------------------------------- Ollama model management

    @staticmethod
    def _pull_name(body: bytes) -> str | None:
        try:
            req = _decode(body)
        except (msgspec.DecodeError, ValueError):
            return None
        name = req.get("model") or req.get("name") if isinstance(req, dict) else None
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9._/-]*(:[a-z0-9._-]+)?", name):
            return None
        return name.removesuffix(":latest")

    async def _ollama_pull(self, scope: dict[str, Any], receive: Any, send: Any,
                           body: bytes) -> None:
        name = self._pull_name(body)
        if name is None:
            await _send_json(send, 400, {"error": "invalid model name"})
            return
        stream = _decode(body).get("stream", True) is not False
        layers = [(f"sha256:{uuid.uuid5(uuid.NAMESPACE_URL, name + '/model').hex * 2}",
                   max(1, self.config.pull_bytes - 1024)),
                  (f"sha256:{uuid.uuid5(uuid.NAMESPACE_URL, name + '/params').hex * 2}", 1024)]
        watch = _Watch(receive, self.watches)
        lines: list[dict[str, Any]] = []
        started = False

        async def emit(obj: dict[str, Any]) -> None:
            nonlocal started
            if not stream:
                lines.append(obj)
                return
            if not started:
                await send({"type": "http.response.start", "status": 200, "headers": _NDJSON})
                started = True
            await send({"type": "http.response.body", "body": _encode(obj) + b"\n",
                        "more_body": True})

        async def fail(message: str) -> None:
            if stream:
                await emit({"error": message})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                await _send_json(send, 500, {"error": message})

        try:
            await emit({"status": "pulling manifest"})
            if name.startswith("missing"):
                await fail("pull model manifest: file does not exist")
                return
            tick = 0.05
            step = max(1, int(self.config.pull_rate_bps * tick))
            for index, (digest, total) in enumerate(layers):
                done = min(self._pulled.get(digest, 0), total)
                status = f"pulling {digest[7:19]}"
                await emit({"status": status, "digest": digest, "total": total, "completed": done})
                if name.startswith("stall"):
                    await watch.event.wait()
                    return
                while done < total:
                    if await watch.sleep(tick):
                        return  # the client went away: the bytes so far are kept
                    done = min(total, done + step)
                    self._pulled[digest] = done
                    if index == 0 and name.startswith("broken") and done >= total // 2:
                        self._pulled.pop(digest, None)
                        await fail(f"digest mismatch, file must be downloaded again: {digest}")
                        return
                    await emit({"status": status, "digest": digest, "total": total,
                                "completed": done})
            for status in ("verifying sha256 digest", "writing manifest", "success"):
                await emit({"status": status})
            if name not in self.config.models:
                self.config.models = (*self.config.models, name)
            for digest, _ in layers:
                self._pulled.pop(digest, None)
            if stream:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                await _send_json(send, 200, lines[-1])
        finally:
            watch.close()

    async def _ollama_delete(self, scope: dict[str, Any], receive: Any, send: Any,
                             body: bytes) -> None:
        name = self._pull_name(body)
        if name is None or name not in self.config.models:
            await _send_json(send, 404, {"error": f"model '{name}' not found"})
            return
        self.config.models = tuple(m for m in self.config.models if m != name)
        await _send_body(send, 200, b"", [])

    async def _root(self, scope: dict[str, Any], receive: Any, send: Any, body: bytes) -> None:
        await _send_body(send, 200, b"Ollama is running", [(b"content-type", b"text/plain")])

    # ---------------------------------------------------------- control

    async def _ctl_script(self, scope: dict[str, Any], receive: Any, send: Any,
                          body: bytes) -> None:
        try:
            data = _decode(body)
            if isinstance(data, dict) and "behaviours" in data:
                data = data["behaviours"]
            items = data if isinstance(data, list) else [data]
            behaviours = [_check_behaviour(b) for b in items]
        except (msgspec.DecodeError, ValueError, TypeError) as exc:
            await _send_json(send, 400, {"error": str(exc)})
            return
        with self.state.lock:
            self.state.script.extend(behaviours)
            pending = len(self.state.script)
        await _send_json(send, 200, {"pending": pending})

    async def _ctl_stats(self, scope: dict[str, Any], receive: Any, send: Any,
                         body: bytes) -> None:
        await _send_json(send, 200, self.state.snapshot().to_dict())

    async def _ctl_reset(self, scope: dict[str, Any], receive: Any, send: Any,
                         body: bytes) -> None:
        with self.state.lock:
            self.state.script.clear()
            self.state.reset_counters()
        await _send_json(send, 200, {"reset": True})

    async def _ctl_config(self, scope: dict[str, Any], receive: Any, send: Any,
                          body: bytes) -> None:
        if scope["method"] == "POST":
            try:
                _apply_config(self.config, _decode(body))
            except (msgspec.DecodeError, ValueError, TypeError) as exc:
                await _send_json(send, 400, {"error": str(exc)})
                return
        await _send_json(send, 200, {k: getattr(self.config, k) for k in _RUNTIME_CONFIG})


def _apply_config(config: _Config, changes: Any) -> None:
    if not isinstance(changes, dict):
        raise TypeError("config changes are a JSON object")
    for key, value in changes.items():
        if key not in _RUNTIME_CONFIG:
            raise ValueError(f"unknown config key {key!r}; known: {list(_RUNTIME_CONFIG)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{key} must be a non-negative number")
    for key, value in changes.items():
        setattr(config, key, int(value) if key in ("reply_tokens", "template_tokens", "pull_bytes")
                else value)


# ------------------------------------------------------------------ public API


def _http_impl() -> str:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return "h11"
    return "httptools"


class FakeUpstream:
    """The fake upstream server. ``start()`` serves it from a background thread."""

    def __init__(self, *, models: Iterable[str] = ("fake-small", "fake-large"),
                 reply_tokens: int = 8, api_key: str | None = None,
                 token_delay_ms: float = 0, first_byte_delay_ms: float = 0,
                 host: str = "127.0.0.1", port: int = 0, strict_models: bool = True) -> None:
        self._config = _Config(tuple(models), reply_tokens, api_key, token_delay_ms,
                               first_byte_delay_ms, strict_models)
        self._state = _State()
        self._app = _App(self._config, self._state)
        self.host = host
        self._want_port = port
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # ---------------------------------------------------------- addresses

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("the fake upstream is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    @property
    def anthropic_base_url(self) -> str:
        return self.url

    @property
    def ollama_base_url(self) -> str:
        return self.url

    @property
    def models(self) -> tuple[str, ...]:
        return self._config.models

    # ---------------------------------------------------------- lifecycle

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._want_port))
        self.port = sock.getsockname()[1]
        return sock

    def _make_server(self) -> uvicorn.Server:
        _install_log_filter()
        config = uvicorn.Config(
            self._app, lifespan="off", log_config=None, access_log=False,
            http=_http_impl(), loop="auto", server_header=False, backlog=4096,
            timeout_keep_alive=60, timeout_graceful_shutdown=3,
        )
        self._server = uvicorn.Server(config)
        return self._server

    async def _serve(self, sock: socket.socket, on_ready: Callable[[], None]) -> None:
        server = self._server
        assert server is not None
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if serving.done():
                await serving
                raise RuntimeError("the fake upstream did not start")
            await asyncio.sleep(0.002)
        on_ready()
        while not server.should_exit and not serving.done():
            await asyncio.sleep(0.05)
        self._app.abort_all()  # wake hanging and slow requests so shutdown is quick
        await serving

    def start(self, timeout: float = 15.0) -> FakeUpstream:
        if self._thread is not None:
            raise RuntimeError("already started")
        sock = self._bind()
        server = self._make_server()
        ready = threading.Event()

        def run() -> None:
            try:
                with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
                    runner.run(self._serve(sock, ready.set))
            except BaseException as exc:  # noqa: BLE001 - reported by start()
                self._error = exc
                ready.set()

        self._thread = threading.Thread(target=run, name=f"fake-upstream-{self.port}",
                                         daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"fake upstream failed to start: {self._error!r}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(5)
        self._thread = None

    def serve_forever(self, announce: bool = True) -> None:
        """Serve from this (main) thread until SIGINT/SIGTERM; print ``READY <port>`` first."""
        sock = self._bind()
        server = self._make_server()

        def ready() -> None:
            if announce:
                print(f"READY {self.port}", flush=True)

        with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
            runner.run(self._serve(sock, ready))

    def __enter__(self) -> Self:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------- scripting and inspection

    def script(self, *behaviours: dict[str, Any]) -> None:
        """Queue behaviours, consumed one per completion request (FIFO)."""
        checked = [_check_behaviour(b) for b in behaviours]
        with self._state.lock:
            self._state.script.extend(checked)

    def clear_script(self) -> None:
        with self._state.lock:
            self._state.script.clear()

    def reset(self) -> None:
        """Forget the script and all counters."""
        with self._state.lock:
            self._state.script.clear()
            self._state.reset_counters()

    def configure(self, **changes: Any) -> None:
        """Change ``reply_tokens``, ``token_delay_ms``, ``first_byte_delay_ms`` or
        ``template_tokens`` live."""
        _apply_config(self._config, changes)

    @property
    def stats(self) -> FakeStats:
        return self._state.snapshot()

    def wait_for(self, predicate: Callable[[FakeStats], bool], timeout: float = 5.0,
                 what: str = "condition") -> FakeStats:
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats
            if predicate(stats):
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"fake upstream: timed out waiting for {what}: {stats}")
            time.sleep(0.01)

    def wait_cancelled(self, count: int = 1, timeout: float = 5.0) -> FakeStats:
        """Wait until ``count`` requests were cancelled by their clients."""
        return self.wait_for(lambda s: s.cancelled >= count, timeout,
                             f"{count} cancelled request(s)")

    def wait_idle(self, timeout: float = 5.0) -> FakeStats:
        """Wait until no request is in flight."""
        return self.wait_for(lambda s: s.in_flight == 0, timeout, "no request in flight")


class FakeUpstreamControl:
    """Scripts and inspects a fake upstream over HTTP (e.g. one running as its own process)."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise ValueError(f"{method} {path}: {exc.code} {exc.read().decode()}") from exc

    def script(self, *behaviours: dict[str, Any]) -> int:
        return self._call("POST", "/_fake/script", list(behaviours))["pending"]

    def reset(self) -> None:
        self._call("POST", "/_fake/reset", {})

    def configure(self, **changes: Any) -> dict[str, Any]:
        return self._call("POST", "/_fake/config", changes)

    @property
    def stats(self) -> FakeStats:
        return FakeStats.from_dict(self._call("GET", "/_fake/stats"))


class FakeUpstreamProcess:
    """``python -m tests.fake_upstream`` as a child process, with an HTTP control client."""

    def __init__(self, *, port: int = 0, delay_ms: float = 0, first_byte_ms: float = 0,
                 reply_tokens: int = 8, models: Iterable[str] = ("fake-small", "fake-large"),
                 api_key: str | None = None, host: str = "127.0.0.1",
                 env: dict[str, str] | None = None) -> None:
        self.args = [sys.executable, "-m", "tests.fake_upstream", "--host", host,
                     "--port", str(port), "--delay-ms", str(delay_ms),
                     "--first-byte-ms", str(first_byte_ms), "--reply-tokens", str(reply_tokens),
                     "--models", ",".join(models)]
        if api_key is not None:
            self.args += ["--api-key", api_key]
        self.host = host
        self.env = env
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def control(self) -> FakeUpstreamControl:
        return FakeUpstreamControl(self.url)

    def start(self, timeout: float = 20.0) -> FakeUpstreamProcess:
        preexec = None
        try:
            from shared.infra.process import die_with_parent as preexec
        except ImportError:  # pragma: no cover
            pass
        self.proc = subprocess.Popen(self.args, cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                     text=True, preexec_fn=preexec)
        lines: queue.Queue[str] = queue.Queue()
        stdout = self.proc.stdout
        assert stdout is not None
        threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line.startswith("READY "):
                self.port = int(line.split()[1])
                return self
        self.stop()
        raise RuntimeError("fake upstream process did not print READY")

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> Self:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.fake_upstream",
                                     description="Fake OpenAI/Anthropic/Ollama upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--delay-ms", type=float, default=0,
                        help="delay before every content token (streaming) / per token")
    parser.add_argument("--first-byte-ms", type=float, default=0,
                        help="delay before the response headers of every completion")
    parser.add_argument("--reply-tokens", type=int, default=8)
    parser.add_argument("--models", default="fake-small,fake-large",
                        help="comma-separated model ids")
    parser.add_argument("--api-key", default=os.environ.get("FAKE_UPSTREAM_API_KEY"))
    parser.add_argument("--any-model", action="store_true",
                        help="accept any model id instead of answering 404")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="fake_upstream %(levelname)s %(name)s: %(message)s")
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal with these
    # handlers in place: exit 0 instead of dying by the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    FakeUpstream(
        models=[m for m in args.models.split(",") if m], reply_tokens=args.reply_tokens,
        api_key=args.api_key, token_delay_ms=args.delay_ms,
        first_byte_delay_ms=args.first_byte_ms, host=args.host, port=args.port,
        strict_models=not args.any_model,
    ).serve_forever()


if __name__ == "__main__":
    main()

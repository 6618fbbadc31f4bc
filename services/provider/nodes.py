"""Targets of kind `node`: a self-hosted runtime behind a node daemon, over NATS
(`nexus.node.<id>.infer`).

The node already speaks frames (shared.contracts.frames): its `Delta`s are passed on to
the orchestrator as they are, and its `Done` carries the usage, latency and time to
first token it measured at its runtime; the router adds only what the node cannot know
(cost, attempts, fallbacks).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from shared.contracts import subjects
from shared.contracts.frames import Delta, Done
from shared.contracts.messages import ChatMessage, CompletionRequest
from shared.infra.messaging import Bus, MessagingError
from shared.infra.streaming import StreamReceiver
from shared.infra.upstreams import UpstreamError

_TRY_NEXT_NODE = ("NodeBusy", "RuntimeNotReady")


class NodeAdapter:
    """The orchestrator chose the nodes (load-based selection) and put them in the
    request; they are tried in order until one starts answering."""

    def __init__(self, name: str, bus: Bus | None, *, first_frame_timeout_s: float) -> None:
        self.name = name
        self.bus = bus
        self.first_frame_timeout_s = first_frame_timeout_s

    async def close(self) -> None:
        pass

    async def stream(self, model: str, request: CompletionRequest,
                     messages: tuple[ChatMessage, ...]) -> AsyncIterator[Delta | Done]:
        planned = next((t.nodes for t in request.targets if t.name == f"{self.name}/{model}"), ())
        candidates = planned or request.nodes.get(model, ())
        if not candidates:
            raise UpstreamError("NoNode", f"no online node serves {model!r}", status=503,
                                retryable=False)
        assert self.bus is not None, "node targets need the bus"
        last: UpstreamError | None = None
        for node_id in candidates:
            node_request = msgspec.structs.replace(request, model=model, messages=messages,
                                                   nodes={}, targets=(), plan_loads=())
            sent = False
            try:
                async with StreamReceiver(self.bus, subjects.node_infer(node_id), node_request,
                                          first_frame_timeout_s=self.first_frame_timeout_s
                                          ) as stream:
                    async for frame in stream.frames():
                        if isinstance(frame, Delta):
                            sent = True
                            yield frame
                        elif isinstance(frame, Done):
                            yield frame
                            return
                        elif frame.error in _TRY_NEXT_NODE and not sent:
                            # this node cannot take it now; the orchestrator's spare may
                            last = UpstreamError(frame.error, f"node {node_id}: {frame.detail}",
                                                 status=frame.status)
                            break
                        else:
                            raise UpstreamError(frame.error, f"node {node_id}: {frame.detail}",
                                                status=frame.status,
                                                retryable=not frame.after_first_token)
            except MessagingError as exc:
                last = UpstreamError("NodeUnavailable", f"node {node_id}: {exc}", status=503)
                if sent:
                    raise last from None
        raise last or UpstreamError("NoNode", "no node answered", status=503)

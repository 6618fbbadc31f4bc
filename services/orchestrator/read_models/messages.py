"""The `messages` read model: the conversation of every session."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
import msgspec

from shared.contracts.events import MessageAppended, RecordedEvent, conversation_stream
from shared.contracts.messages import ChatMessage
from shared.domain.budget import micro_to_usd
from shared.infra.eventstore import EventStore, Projection
from services.orchestrator.schemas import MessageOut


class MessagesProjection(Projection):
    """`messages` table: the conversation of every session."""

    name = "messages"
    handles = frozenset({"MessageAppended"})
    tables = ("messages",)

    async def apply(self, conn: asyncpg.Connection, rec: RecordedEvent) -> None:
        await conn.execute(
            "INSERT INTO messages (position, session_id, message_id, role, content, call_id, model,"
            " provider, node, input_tokens, output_tokens, cost_micro_usd, finish_reason, created_at,"
            " tool_calls, tool_call_id, run_id)"
            " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15::jsonb,$16,$17)",
            *_row(rec))

    async def apply_batch(self, conn: asyncpg.Connection, events: Sequence[RecordedEvent]) -> None:
        """Every message of the step in one INSERT (a call appends two), the rows as one
        JSON document: 17 array parameters would each be checked element by element by
        asyncpg in Python (issue 16, round 11)."""
        if len(events) == 1:
            return await self.apply(conn, events[0])
        await conn.execute(
            "INSERT INTO messages (position, session_id, message_id, role, content, call_id, model,"
            " provider, node, input_tokens, output_tokens, cost_micro_usd, finish_reason, created_at,"
            " tool_calls, tool_call_id, run_id)"
            " SELECT (r->>0)::bigint, r->>1, r->>2, r->>3, r->>4, r->>5, r->>6, r->>7, r->>8,"
            " (r->>9)::int, (r->>10)::int, (r->>11)::bigint, r->>12, (r->>13)::timestamptz,"
            " nullif(r->14, 'null'), r->>15, r->>16"
            " FROM jsonb_array_elements($1::jsonb) AS u(r) ORDER BY (r->>0)::bigint",
            _rows.encode([_row(rec, tool_calls_json=False) for rec in events]).decode())


_rows = msgspec.json.Encoder()


def _row(rec: RecordedEvent, *, tool_calls_json: bool = True) -> tuple:
    """The row's values in column order; `tool_calls` as JSON text for a `jsonb`
    parameter, or as it is when the row itself goes as JSON."""
    e = rec.event
    assert isinstance(e, MessageAppended)
    tool_calls: object = e.tool_calls
    if tool_calls_json and tool_calls is not None:
        tool_calls = msgspec.json.encode(tool_calls).decode()
    return (rec.position, e.session_id, e.message_id, e.role, e.content, e.call_id, e.model,
            e.provider, e.node, e.input_tokens, e.output_tokens, e.cost_micro_usd, e.finish_reason,
            rec.recorded_at, tool_calls, e.tool_call_id, e.run_id)


class MessagesReadModel:
    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.pool = store.pool

    async def history(self, session_id: str) -> tuple[ChatMessage, ...]:
        """The session's conversation as chat messages (sent along with its next call).

        Read from the conversation's own stream, not from the table: the answer a client
        has just received is in it (its events commit before the answer's last byte),
        whereas the projection may still be applying them."""
        return tuple(ChatMessage(role=e.role, content=e.content,
                                 tool_calls=list(e.tool_calls) if e.tool_calls is not None else None,
                                 tool_call_id=e.tool_call_id)
                     for e in (r.event for r in await self.store.read_stream(
                         conversation_stream(session_id)))
                     if isinstance(e, MessageAppended))

    async def conversation(self, session_id: str) -> tuple[MessageOut, ...]:
        """Both sides of the session's conversation with model, provider, tokens and cost."""
        rows = await self.pool.fetch(
            "SELECT *, tool_calls::text AS tool_calls_json FROM messages WHERE session_id = $1"
            " ORDER BY position", session_id)
        return tuple(MessageOut(
            message_id=r["message_id"], role=r["role"], content=r["content"],
            call_id=r["call_id"], model=r["model"], provider=r["provider"], node=r["node"],
            input_tokens=r["input_tokens"], output_tokens=r["output_tokens"],
            cost_usd=micro_to_usd(r["cost_micro_usd"]) if r["cost_micro_usd"] is not None else None,
            finish_reason=r["finish_reason"], created_at=r["created_at"],
            tool_calls=msgspec.json.decode(r["tool_calls_json"]) if r["tool_calls_json"] else None,
            tool_call_id=r["tool_call_id"], run_id=r["run_id"]) for r in rows)

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
        """Every message of the step in one INSERT (a call appends two)."""
        if len(events) == 1:
            return await self.apply(conn, events[0])
        rows = [_row(rec) for rec in events]
        await conn.execute(
            "INSERT INTO messages (position, session_id, message_id, role, content, call_id, model,"
            " provider, node, input_tokens, output_tokens, cost_micro_usd, finish_reason, created_at,"
            " tool_calls, tool_call_id, run_id)"
            " SELECT p, s, m, r, c, ci, mo, pr, n, it, ot, cost, f, at, tc::jsonb, tci, run"
            " FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],"
            " $7::text[], $8::text[], $9::text[], $10::int[], $11::int[], $12::bigint[], $13::text[],"
            " $14::timestamptz[], $15::text[], $16::text[], $17::text[])"
            " AS u(p, s, m, r, c, ci, mo, pr, n, it, ot, cost, f, at, tc, tci, run) ORDER BY p",
            *(list(column) for column in zip(*rows, strict=True)))


def _row(rec: RecordedEvent) -> tuple:
    e = rec.event
    assert isinstance(e, MessageAppended)
    return (rec.position, e.session_id, e.message_id, e.role, e.content, e.call_id, e.model,
            e.provider, e.node, e.input_tokens, e.output_tokens, e.cost_micro_usd, e.finish_reason,
            rec.recorded_at,
            msgspec.json.encode(e.tool_calls).decode() if e.tool_calls is not None else None,
            e.tool_call_id, e.run_id)


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

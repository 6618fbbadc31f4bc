"""The orchestrator's read models: each module holds one projection (a fold over events
that owns its tables, see shared.infra.eventstore) and the queries on those tables.
Nobody else reads or writes these tables; the event store answers queries on `events`.
"""

from __future__ import annotations

from shared.infra.eventstore import Projection
from services.orchestrator.read_models.api_keys import ApiKeysProjection
from services.orchestrator.read_models.budgets import BudgetsProjection
from services.orchestrator.read_models.mcp_servers import McpServersProjection
from services.orchestrator.read_models.messages import MessagesProjection
from services.orchestrator.read_models.node_registry import NodesProjection
from services.orchestrator.read_models.policies import PoliciesProjection
from services.orchestrator.read_models.sessions import SessionsProjection
from services.orchestrator.read_models.tools import ToolCallsProjection, ToolsProjection

PROJECTIONS: tuple[Projection, ...] = (
    SessionsProjection(),
    NodesProjection(),
    ApiKeysProjection(),
    BudgetsProjection(),
    MessagesProjection(),
    PoliciesProjection(),
    ToolsProjection(),
    ToolCallsProjection(),
    McpServersProjection(),
)

__all__ = ["PROJECTIONS"]

"""The orchestrator's read models: each module holds one projection (a fold over events
that owns its tables, see shared.infra.eventstore) and the queries on those tables.
Nobody else reads or writes these tables; the event store answers queries on `events`.
"""

from __future__ import annotations

from shared.infra.eventstore import Projection
from services.orchestrator.read_models.agents import AgentsProjection
from services.orchestrator.read_models.api_keys import ApiKeysProjection
from services.orchestrator.read_models.budgets import BudgetsProjection
from services.orchestrator.read_models.mcp_servers import McpServersProjection
from services.orchestrator.read_models.messages import MessagesProjection
from services.orchestrator.read_models.model_tasks import ModelTasksProjection, NodeModelsProjection
from services.orchestrator.read_models.node_registry import NodesProjection
from services.orchestrator.read_models.policies import PoliciesProjection
from services.orchestrator.read_models.routing import RoutingStatsProjection, SkillsProjection
from services.orchestrator.read_models.runs import RunsProjection
from services.orchestrator.read_models.sessions import SessionsProjection
from services.orchestrator.read_models.tools import ToolCallsProjection, ToolsProjection
from services.orchestrator.read_models.workspaces import WorkspacesProjection

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
    WorkspacesProjection(),
    AgentsProjection(),
    SkillsProjection(),
    RoutingStatsProjection(),
    ModelTasksProjection(),
    NodeModelsProjection(),
    RunsProjection(),
)

__all__ = ["PROJECTIONS"]

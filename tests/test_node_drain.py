"""The operator's drain decision (pure): who may be drained or resumed, and what it
records. The API, the node and the button: tests/test_dashboard_pages.py."""

from __future__ import annotations

import pytest

from services.orchestrator.fleet import decide_operator_drain
from shared.contracts.errors import Conflict, NotFound
from shared.contracts.events import NodeCameBack, NodeDraining
from shared.contracts.messages import NodeRegistration
from shared.domain.nodes import DEREGISTERED, DRAINING, LEFT, OFFLINE, ONLINE, NodeRecord


def record(status: str) -> NodeRecord:
    reg = NodeRegistration(node_id="n1", hostname="h", cpu_count=1,
                           memory_total_bytes=1, agent_version="0", heartbeat_interval_s=1.0)
    return NodeRecord("n1", status, reg, 3)


def test_an_online_node_drains_once_and_a_draining_one_resumes() -> None:
    [drained] = decide_operator_drain(record(ONLINE), "n1", True, "key:admin")
    assert isinstance(drained, NodeDraining) and drained.reason == "drain requested by key:admin"
    assert decide_operator_drain(record(DRAINING), "n1", True, "key:admin") == []
    [resumed] = decide_operator_drain(record(DRAINING), "n1", False, "key:admin")
    assert isinstance(resumed, NodeCameBack) and resumed.via == "undrain"
    assert decide_operator_drain(record(ONLINE), "n1", False, "key:admin") == []


@pytest.mark.parametrize("status", [OFFLINE, LEFT])
def test_an_offline_or_departed_node_is_a_conflict(status: str) -> None:
    for drain in (True, False):
        with pytest.raises(Conflict, match=status):
            decide_operator_drain(record(status), "n1", drain, "key:admin")


def test_an_unknown_or_deregistered_node_is_not_found() -> None:
    for state in (None, record(DEREGISTERED)):
        with pytest.raises(NotFound):
            decide_operator_drain(state, "n1", True, "key:admin")

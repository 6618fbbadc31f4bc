"""Node selection (`shared.domain.selection`): what every strategy may and may not choose.

Pure in-memory: a `NodeView` fed with registry records and heartbeats, a fake clock,
seeded randomness. Nothing here measures time (see `bench/nodes_selection.py`).
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from shared.contracts.messages import GpuInfo, GpuLoad, Heartbeat, NodeRegistration, RuntimeInfo
from shared.domain.nodes import DRAINING, LEFT, OFFLINE, ONLINE, STATUSES, NodeLoad, NodeRecord, NodeView
from shared.domain.selection import (
    INSUFFICIENT_GPU_MEMORY,
    MODEL_NOT_SERVED,
    NO_ONLINE_NODE,
    STRATEGIES,
    NoEligibleNode,
    NodeSelector,
    score,
)

STALE_AFTER_S = 6.0


# -- helpers ----------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def registration(node_id: str, models=("m",), gpu_total: int = 0) -> NodeRegistration:
    gpus = (GpuInfo(index=0, name="gpu", uuid=f"GPU-{node_id}", memory_total_bytes=gpu_total),) \
        if gpu_total else ()
    return NodeRegistration(node_id=node_id, hostname=f"{node_id}.local", cpu_count=8,
                            memory_total_bytes=64 << 30, gpus=gpus,
                            runtime=RuntimeInfo(kind="vllm", models=tuple(sorted(models))),
                            agent_version="test", heartbeat_interval_s=2.0)


def register(view: NodeView, node_id: str, models=("m",), gpu_total: int = 0,
             status: str = ONLINE, version: int = 1) -> NodeLoad:
    return view.apply_record(NodeRecord(node_id, status, registration(node_id, models, gpu_total),
                                        version))


_seq: Counter[str] = Counter()


def heartbeat(view: NodeView, node_id: str, now: float, *, cpu: float = 10.0, mem: float = 10.0,
              active: int = 0, queue: int = 0, avg_ms: float | None = None,
              draining: bool = False, gpu_used: int | None = None) -> None:
    _seq[node_id] += 1
    gpus = () if gpu_used is None else (GpuLoad(index=0, utilization_pct=50.0,
                                                 memory_used_bytes=gpu_used),)
    view.apply_heartbeat(Heartbeat(node_id=node_id, seq=_seq[node_id], sent_at=1.0e9,
                                   cpu_pct=cpu, memory_pct=mem, gpus=gpus,
                                   active_requests=active, queue_depth=queue,
                                   avg_response_ms=avg_ms, draining=draining), now=now)


def qualifying(view: NodeView, model: str | None, gpu: int | None) -> list[NodeLoad]:
    """The reference filter, by brute force over the whole view."""
    return [n for n in view.nodes.values()
            if n.status == ONLINE and not n.draining
            and (model is None or model in n.models)
            and (gpu is None or n.gpu_memory_free_bytes >= gpu)]


def expected_reason(view: NodeView, model: str | None) -> str:
    online = [n for n in view.nodes.values() if n.status == ONLINE and not n.draining]
    if not online:
        return NO_ONLINE_NODE
    if model is not None and not any(model in n.models for n in online):
        return MODEL_NOT_SERVED
    return INSUFFICIENT_GPU_MEMORY


def rank(node: NodeLoad, now: float) -> tuple[int, float]:
    """least_loaded's order: nodes without fresh metrics last, then by score."""
    return (0 if node.fresh(now, STALE_AFTER_S) else 1, score(node))


def selector(view: NodeView, strategy: str, clock: Clock, seed: int = 0) -> NodeSelector:
    return NodeSelector(view, strategy, stale_after_s=STALE_AFTER_S, rng=random.Random(seed),
                        clock=clock)


# -- construction, score, errors --------------------------------------------------------


def test_unknown_strategy_is_rejected_with_the_valid_names() -> None:
    with pytest.raises(ValueError) as err:
        NodeSelector(NodeView(), "fastest")
    for name in STRATEGIES:
        assert name in str(err.value)


def test_score_formula() -> None:
    """cpu% + mem% + 10 per request in flight (active, queued, dispatched) + 1 per 100 ms."""
    node = NodeLoad("n", cpu_pct=30.0, memory_pct=40.0, active_requests=2, queue_depth=1,
                    dispatched=3, avg_response_ms=250.0)
    assert score(node) == pytest.approx(30 + 40 + 10 * (2 + 1 + 3) + 2.5)
    assert score(NodeLoad("bare")) == 0.0  # missing metrics count as 0 (ranked by freshness)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_reasons_when_nothing_qualifies(strategy: str) -> None:
    clock = Clock()
    view = NodeView()
    sel = selector(view, strategy, clock)
    with pytest.raises(NoEligibleNode, match="no online node") as err:
        sel.select()
    assert err.value.reason == NO_ONLINE_NODE

    register(view, "off", status=OFFLINE)
    register(view, "drain", status=DRAINING)
    with pytest.raises(NoEligibleNode, match="1 draining, 1 offline") as err:
        sel.select()
    assert err.value.reason == NO_ONLINE_NODE

    register(view, "a", models=("llama",), gpu_total=1000)
    heartbeat(view, "a", clock.now, gpu_used=400)
    with pytest.raises(NoEligibleNode, match="'qwen'") as err:
        sel.select("qwen")
    assert err.value.reason == MODEL_NOT_SERVED and err.value.model == "qwen"

    with pytest.raises(NoEligibleNode, match="1000 bytes of free GPU memory") as err:
        sel.select("llama", gpu_memory_bytes=1000)
    assert err.value.reason == INSUFFICIENT_GPU_MEMORY
    assert "most free: 600" in str(err.value)

    assert sel.select("llama", gpu_memory_bytes=600).node_id == "a"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_selection_records_the_dispatch_and_sees_nodes_from_before_and_after(strategy) -> None:
    clock = Clock()
    view = NodeView()
    register(view, "early")
    sel = selector(view, strategy, clock)
    assert sel.select().node_id == "early"
    assert view.nodes["early"].dispatched == 1
    view.remove("early")
    register(view, "late", models=("x",))
    assert sel.select("x").node_id == "late"
    assert view.nodes["late"].dispatched == 1
    heartbeat(view, "late", clock.now)
    assert view.nodes["late"].dispatched == 0


# -- every strategy: never a node that does not qualify ---------------------------------

NODE_IDS = [f"n{i}" for i in range(6)]
MODELS = ["a", "b", "c"]
GPU_TOTALS = [0, 100, 200]
GPU_USED = [0, 50, 100, 150, 250]
GPU_ASKS = [None, 0, 50, 100, 150, 250]


class SelectionMachine(RuleBasedStateMachine):
    """Arbitrary registrations, status changes, heartbeats (fresh or late), removals and
    clock moves, interleaved with selections by all three strategies on one view. Each
    selection is checked against the brute-force filter `qualifying`:

    - the node chosen qualifies (online, not draining, serves the model, enough free
      GPU memory) and is the view's current object for that id;
    - `NoEligibleNode` is raised exactly when nothing qualifies, with the right reason;
    - least_loaded chooses a node of minimal (stale, score), i.e. fresh before stale;
    - the dispatch is recorded (`dispatched` + 1).
    """

    @initialize()
    def setup(self) -> None:
        self.clock = Clock()
        self.view = NodeView()
        self.regs: dict[str, NodeRegistration] = {}
        self.versions: Counter[str] = Counter()
        self.selectors = {s: selector(self.view, s, self.clock, seed=7) for s in STRATEGIES}

    def _record(self, node_id: str, status: str) -> None:
        self.versions[node_id] += 1
        self.view.apply_record(NodeRecord(node_id, status, self.regs[node_id],
                                          self.versions[node_id]))

    @rule(node_id=st.sampled_from(NODE_IDS), models=st.frozensets(st.sampled_from(MODELS)),
          gpu_total=st.sampled_from(GPU_TOTALS),
          status=st.sampled_from([ONLINE, ONLINE, ONLINE, *STATUSES]))
    def register_or_change_capabilities(self, node_id, models, gpu_total, status) -> None:
        self.regs[node_id] = registration(node_id, models, gpu_total)
        self._record(node_id, status)

    @rule(node_id=st.sampled_from(NODE_IDS), status=st.sampled_from(STATUSES))
    def change_status(self, node_id, status) -> None:
        if node_id in self.regs:
            self._record(node_id, status)

    @rule(node_id=st.sampled_from(NODE_IDS), cpu=st.sampled_from([0.0, 50.0, 100.0]),
          mem=st.sampled_from([0.0, 50.0, 100.0]), active=st.integers(0, 3),
          queue=st.integers(0, 2), avg_ms=st.sampled_from([None, 0.0, 500.0, 3000.0]),
          draining=st.sampled_from([False, False, False, True]),
          gpu_used=st.sampled_from([None, *GPU_USED]), late_by=st.sampled_from([0.0, 0.0, 4.0, 9.0]))
    def heartbeat(self, node_id, cpu, mem, active, queue, avg_ms, draining, gpu_used,
                  late_by) -> None:
        heartbeat(self.view, node_id, self.clock.now - late_by, cpu=cpu, mem=mem, active=active,
                  queue=queue, avg_ms=avg_ms, draining=draining, gpu_used=gpu_used)

    @rule(node_id=st.sampled_from(NODE_IDS))
    def remove(self, node_id) -> None:
        self.view.remove(node_id)

    @rule(dt=st.sampled_from([0.0, 1.0, 2.5, 5.0, 7.0]))
    def advance_clock(self, dt) -> None:
        self.clock.now += dt

    @rule(strategy=st.sampled_from(STRATEGIES), model=st.sampled_from([None, *MODELS, "zz"]),
          gpu=st.sampled_from(GPU_ASKS), times=st.integers(1, 4))
    def select(self, strategy, model, gpu, times) -> None:
        sel = self.selectors[strategy]
        for _ in range(times):
            ok = qualifying(self.view, model, gpu)
            if not ok:
                with pytest.raises(NoEligibleNode) as err:
                    sel.select(model, gpu)
                assert err.value.reason == expected_reason(self.view, model)
                continue
            ranks = {n.node_id: rank(n, self.clock.now) for n in ok}
            before = {n.node_id: n.dispatched for n in ok}
            chosen = sel.select(model, gpu)
            assert chosen.node_id in before, f"{chosen} does not qualify"
            assert self.view.nodes[chosen.node_id] is chosen
            assert chosen.dispatched == before[chosen.node_id] + 1
            if strategy == "least_loaded":
                assert ranks[chosen.node_id] == min(ranks.values())


SelectionMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_selection_state_machine = SelectionMachine.TestCase


# -- round robin ------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(node_models=st.lists(st.frozensets(st.sampled_from(MODELS), min_size=1), min_size=1,
                            max_size=12),
       requests=st.lists(st.sampled_from([None, *MODELS]), max_size=120),
       heartbeat_every=st.integers(1, 7))
def test_round_robin_visits_every_node_once_per_cycle(node_models, requests,
                                                      heartbeat_every) -> None:
    """With a stable set of nodes, the selections made for one request key (a model, or
    any model) come in cycles of len(qualifying nodes), each a permutation of them,
    however requests for other keys and heartbeats interleave."""
    clock = Clock()
    view = NodeView()
    for i, models in enumerate(node_models):
        register(view, f"n{i}", models=models)
    sel = selector(view, "round_robin", clock)
    picks: dict[str | None, list[str]] = {}
    for step, model in enumerate(requests):
        if step % heartbeat_every == 0:
            node_id = f"n{step % len(node_models)}"
            heartbeat(view, node_id, clock.now, cpu=float(step % 100), active=step % 5)
        if not qualifying(view, model, None):
            with pytest.raises(NoEligibleNode):
                sel.select(model)
            continue
        picks.setdefault(model, []).append(sel.select(model).node_id)
    for model, seq in picks.items():
        expected = {n.node_id for n in qualifying(view, model, None)}
        k = len(expected)
        for start in range(0, len(seq) - k + 1, k):
            assert set(seq[start:start + k]) == expected, (model, seq)
        assert len(set(seq[len(seq) - len(seq) % k:])) == len(seq) % k  # partial cycle: no repeats


def test_round_robin_order_is_a_stable_rotation() -> None:
    clock = Clock()
    view = NodeView()
    for node_id in ("a", "b", "c"):
        register(view, node_id)
    sel = selector(view, "round_robin", clock)
    first = [sel.select().node_id for _ in range(3)]
    assert sorted(first) == ["a", "b", "c"]
    assert [sel.select().node_id for _ in range(6)] == first * 2
    register(view, "d")  # joins at the back of the ring
    assert [sel.select().node_id for _ in range(4)] == [*first, "d"]


# -- uniform load: spread ---------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(k=st.integers(1, 30), n=st.integers(0, 300), report_every=st.integers(0, 40))
def test_least_loaded_spreads_uniform_load_evenly(k, n, report_every) -> None:
    """All nodes identical and fresh, requests never finish. Bound: after any number of
    selections, max - min of the per-node counts is <= 1, because `dispatched` is in the
    score and the minimum is always taken. Heartbeats every `report_every` selections
    (0 = never) report each node's true in-flight count as `active_requests` and reset
    `dispatched`: the bound still holds."""
    clock = Clock()
    view = NodeView()
    ids = [f"n{i}" for i in range(k)]
    for node_id in ids:
        register(view, node_id)
        heartbeat(view, node_id, clock.now, cpu=25.0, mem=40.0, avg_ms=800.0)
    sel = selector(view, "least_loaded", clock)
    counts = Counter({node_id: 0 for node_id in ids})
    for i in range(n):
        counts[sel.select("m").node_id] += 1
        assert max(counts.values()) - min(counts.values()) <= 1
        if report_every and i % report_every == 0:
            for node_id in ids:
                heartbeat(view, node_id, clock.now, cpu=25.0, mem=40.0, avg_ms=800.0,
                          active=counts[node_id])


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "stale"])
def test_power_of_two_spreads_uniform_load(seed: int, fresh: bool) -> None:
    """K = 64 identical nodes, N = 100 * K selections, no heartbeat in between (so the
    choice rests on `dispatched`), with fresh or with stale metrics (stale nodes compare
    by score among themselves).

    Bound asserted: max load <= mean + 5 and min load >= mean - 12 (mean = 100).
    Two-choice balancing in the heavily loaded case keeps the maximum within
    mean + ln ln K / ln 2 + O(1) = mean + 2.06 + O(1) with high probability (Berenbrink,
    Czumaj, Steger, Voecking 2006), and the fraction of nodes i below the mean decays
    exponentially in i, so the minimum is mean - O(log K). Over 1000 seeds the worst
    observed were mean + 3 and mean - 7, so these bounds hold with overwhelming
    probability; the seeds here are fixed, so the test is deterministic. For contrast,
    one random choice per request would leave the busiest node near
    mean + sqrt(2 * mean * ln K) ~= mean + 29."""
    k, per = 64, 100
    clock = Clock()
    view = NodeView()
    ids = [f"n{i}" for i in range(k)]
    for node_id in ids:
        register(view, node_id)
        heartbeat(view, node_id, clock.now if fresh else clock.now - 60, cpu=30.0, mem=30.0)
    sel = selector(view, "power_of_two", clock, seed=seed)
    counts = Counter({node_id: 0 for node_id in ids})
    for _ in range(k * per):
        counts[sel.select().node_id] += 1
    assert max(counts.values()) <= per + 5, counts.most_common(3)
    assert min(counts.values()) >= per - 12, counts.most_common()[-3:]


# -- freshness --------------------------------------------------------------------------


def test_least_loaded_ranks_nodes_without_fresh_metrics_last() -> None:
    clock = Clock(100.0)
    view = NodeView()
    register(view, "busy")
    heartbeat(view, "busy", 99.0, cpu=95.0, mem=95.0, active=50, avg_ms=20_000.0)
    register(view, "stale")
    heartbeat(view, "stale", 100.0 - STALE_AFTER_S - 0.5, cpu=0.0, mem=0.0)
    register(view, "silent")  # never sent a heartbeat
    sel = selector(view, "least_loaded", clock)
    assert {sel.select().node_id for _ in range(20)} == {"busy"}


def test_a_stale_node_is_picked_only_when_no_fresh_node_qualifies() -> None:
    clock = Clock(100.0)
    view = NodeView()
    register(view, "fresh", models=("a",), gpu_total=100)
    heartbeat(view, "fresh", 100.0, cpu=90.0, mem=90.0, active=10, gpu_used=80)
    register(view, "stale", models=("a", "b"), gpu_total=100)
    heartbeat(view, "stale", 50.0, cpu=0.0, mem=0.0, gpu_used=0)
    sel = selector(view, "least_loaded", clock)
    assert sel.select("a").node_id == "fresh"
    assert sel.select("b").node_id == "stale"                          # fresh lacks the model
    assert sel.select("a", gpu_memory_bytes=50).node_id == "stale"    # fresh lacks memory
    heartbeat(view, "fresh", 100.0, cpu=90.0, mem=90.0, gpu_used=80, draining=True)
    assert sel.select("a").node_id == "stale"                          # fresh is draining
    heartbeat(view, "fresh", 100.0, cpu=90.0, mem=90.0, gpu_used=80)
    assert sel.select("a").node_id == "fresh"


def test_nodes_turn_stale_as_time_passes_and_fresh_with_a_heartbeat() -> None:
    clock = Clock(0.0)
    view = NodeView()
    register(view, "idle")
    heartbeat(view, "idle", 0.0, cpu=0.0, mem=0.0)
    register(view, "busy")
    heartbeat(view, "busy", 5.0, cpu=80.0, mem=80.0, active=5)
    sel = selector(view, "least_loaded", clock)
    clock.now = 5.0
    assert sel.select().node_id == "idle"
    clock.now = STALE_AFTER_S + 0.1  # idle's metrics are now too old, busy's are not
    assert sel.select().node_id == "busy"
    heartbeat(view, "idle", clock.now, cpu=0.0, mem=0.0)
    assert sel.select().node_id == "idle"


def test_nodes_without_metrics_share_work_among_themselves() -> None:
    clock = Clock()
    view = NodeView()
    for node_id in ("x", "y", "z"):
        register(view, node_id)
    sel = selector(view, "least_loaded", clock)
    counts = Counter(sel.select().node_id for _ in range(30))
    assert counts == {"x": 10, "y": 10, "z": 10}


def test_power_of_two_prefers_fresh_metrics() -> None:
    """With two nodes both are always drawn, so the comparison decides every time."""
    clock = Clock(100.0)
    view = NodeView()
    register(view, "busy")
    heartbeat(view, "busy", 100.0, cpu=99.0, mem=99.0, active=30)
    register(view, "stale")
    heartbeat(view, "stale", 10.0, cpu=0.0, mem=0.0)
    sel = selector(view, "power_of_two", clock)
    assert {sel.select().node_id for _ in range(20)} == {"busy"}


# -- least_loaded prefers the less loaded -----------------------------------------------


@pytest.mark.parametrize(("metric", "light", "heavy"), [
    ("cpu", 10.0, 60.0),
    ("mem", 20.0, 70.0),
    ("active", 1, 4),
    ("queue", 0, 3),
    ("avg_ms", 200.0, 4000.0),
])
def test_least_loaded_prefers_the_lighter_node(metric, light, heavy) -> None:
    clock = Clock()
    view = NodeView()
    register(view, "heavy")
    register(view, "light")
    heartbeat(view, "heavy", clock.now, **{metric: heavy})
    heartbeat(view, "light", clock.now, **{metric: light})
    sel = selector(view, "least_loaded", clock)
    assert sel.select().node_id == "light"


def test_least_loaded_example_ranking() -> None:
    clock = Clock()
    view = NodeView()
    register(view, "a")
    heartbeat(view, "a", clock.now, cpu=50.0, mem=50.0, active=0)              # 100
    register(view, "b")
    heartbeat(view, "b", clock.now, cpu=10.0, mem=10.0, active=3)              # 50
    register(view, "c")
    heartbeat(view, "c", clock.now, cpu=10.0, mem=10.0, active=1, avg_ms=5000.0)  # 80
    sel = selector(view, "least_loaded", clock)
    # b (50) takes requests until it reaches c (80): three dispatches (60, 70, 80).
    assert [sel.select().node_id for _ in range(3)] == ["b", "b", "b"]
    assert {sel.select().node_id, sel.select().node_id} == {"b", "c"}


def test_dispatch_accounting_alternates_between_identical_nodes() -> None:
    clock = Clock()
    view = NodeView()
    for node_id in ("p", "q"):
        register(view, node_id)
        heartbeat(view, node_id, clock.now, cpu=30.0, mem=30.0)
    sel = selector(view, "least_loaded", clock)
    picks = [sel.select().node_id for _ in range(6)]
    assert all(a != b for a, b in zip(picks, picks[1:])), picks


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gpu_memory_filter_uses_latest_heartbeat(strategy: str) -> None:
    clock = Clock()
    view = NodeView()
    register(view, "big", gpu_total=80)
    register(view, "small", gpu_total=24)
    heartbeat(view, "big", clock.now, gpu_used=10)
    heartbeat(view, "small", clock.now, gpu_used=0)
    sel = selector(view, strategy, clock)
    assert {sel.select(gpu_memory_bytes=40).node_id for _ in range(10)} == {"big"}
    heartbeat(view, "big", clock.now, gpu_used=70)
    with pytest.raises(NoEligibleNode) as err:
        sel.select(gpu_memory_bytes=40)
    assert err.value.reason == INSUFFICIENT_GPU_MEMORY
    assert {sel.select(gpu_memory_bytes=10).node_id for _ in range(10)} == {"big", "small"}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_left_and_removed_nodes_are_never_selected(strategy: str) -> None:
    clock = Clock()
    view = NodeView()
    for node_id in ("a", "b", "c"):
        register(view, node_id)
    sel = selector(view, strategy, clock)
    register(view, "a", status=LEFT, version=2)
    view.remove("b")
    assert {sel.select().node_id for _ in range(10)} == {"c"}
    register(view, "b", version=3)  # registered again: a new NodeLoad, without dispatches
    assert {sel.select().node_id for _ in range(20)} == {"b", "c"}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_free_gpu_memory_is_never_negative(strategy: str) -> None:
    """A node reporting more used than total memory (or no GPU at all) has 0 bytes free:
    it qualifies for a request of 0 bytes, not for 1."""
    clock = Clock()
    view = NodeView()
    register(view, "cpu-only", gpu_total=0)
    heartbeat(view, "cpu-only", clock.now, gpu_used=50)
    sel = selector(view, strategy, clock)
    assert sel.select(gpu_memory_bytes=0).node_id == "cpu-only"
    with pytest.raises(NoEligibleNode):
        sel.select(gpu_memory_bytes=1)


def test_round_robin_under_a_gpu_filter_rotates_over_the_nodes_that_fit() -> None:
    """Nodes passed over for too little memory lose their turn, as under a moving cursor."""
    clock = Clock()
    view = NodeView()
    for node_id, used in (("small", 70), ("big1", 0), ("big2", 0), ("big3", 10)):
        register(view, node_id, gpu_total=80)
        heartbeat(view, node_id, clock.now, gpu_used=used)
    sel = selector(view, "round_robin", clock)
    picks = [sel.select(gpu_memory_bytes=40).node_id for _ in range(6)]
    assert sorted(picks[:3]) == ["big1", "big2", "big3"] and picks[3:] == picks[:3]
    assert sel.select().node_id == "small"  # a request without the filter finds it first

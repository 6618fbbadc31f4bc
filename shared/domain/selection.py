"""Node selection: which node gets the next request. One implementation, three strategies.

`NodeSelector(view, strategy).select(model=None, gpu_memory_bytes=None)` returns the
chosen `NodeLoad` and records the dispatch (`NodeView.note_dispatch`), or raises
`NoEligibleNode` saying why nothing qualifies. It reads the in-memory `NodeView`
only: no I/O, no awaiting.

Which nodes qualify (every strategy)
------------------------------------
- `node.eligible`: status online and not draining (offline, left, deregistered and
  draining nodes never get work);
- serves `model` (`model in node.models`) when a model is asked for;
- `node.gpu_memory_free_bytes >= gpu_memory_bytes` when a size is asked for.

Freshness does not disqualify: a node whose last heartbeat is older than
`stale_after_s` (or that never sent one) still qualifies, but ranks after every fresh
node wherever ranking applies (`least_loaded`, `power_of_two`). Whether a node stays
online is the registry's business (heartbeat timeouts become `NodeWentOffline`).

Strategies
----------
- `round_robin`: per request key (`model`, or "any model"), a ring of the qualifying
  nodes; each selection takes the front node and moves it to the back. With a stable
  set of nodes, every node serving the key is chosen exactly once per cycle of
  `len(ring)` selections with that key, however selections with other keys interleave.
  A node joining (or coming back) enters at the back. Under a GPU memory filter the
  nodes passed over for too little free memory move to the back too, as a cursor would
  move past them (they lose this turn; otherwise they would pile up at the front and
  every filtered selection would rescan them).
- `least_loaded`: the qualifying node with the lowest `(stale, score(node))`, where
  `stale` is 0 for fresh metrics and 1 otherwise; ties go to the node whose entry is
  oldest. `score` includes `dispatched`, so between two heartbeats consecutive
  selections spread over equally loaded nodes instead of piling onto one.
- `power_of_two`: two distinct qualifying nodes drawn uniformly at random, the better
  `(stale, score)` wins (the first drawn on a tie). Under stale metrics this spreads
  far better than `least_loaded`, which would herd onto whichever node last looked
  idle; with `dispatched` in the score it is also good between heartbeats.

The score (lower is better)
---------------------------
::

    score = cpu_pct + memory_pct
            + 10 * (active_requests + queue_depth + dispatched)
            + avg_response_ms / 100

CPU and memory are 0..100 each, one request in flight (running, queued on the node, or
dispatched by us since the node's last heartbeat) weighs like 10 points of CPU, and
every 100 ms of average response time costs one point (a node answering in 2 s is as
loaded as one with two more requests). Missing metrics count as 0; a node without
fresh metrics is ranked by `stale` before the score is looked at. This is the seed's
`cpu + mem + 10 * active` plus latency, queued requests and our own dispatches.

Data structures (kept up to date by `NodeView.subscribe`, never by scanning)
----------------------------------------------------------------------------
A request *key* is a model name, or `None` for "any model". A qualifying-modulo-GPU
node (eligible) is a member of key `None` and of one key per model it serves.

- `_keys[node_id]`: the keys the node is indexed under (absent when not eligible),
  `_models[node_id]`: the model set they were computed from (a change of
  capabilities moves the node between keys), `_node[node_id]`: the `NodeLoad` object
  indexed (a node removed and registered again is a new object, re-indexed from
  scratch).
- `round_robin`: `_rings[key]`, an `OrderedDict` node_id -> NodeLoad. Front = next.
  Join: append, leave: `del`, select: first item then `move_to_end`; all O(1).
- `power_of_two`: `_lists[key]` (a list of NodeLoad) and `_pos[key]` (node_id -> index
  in that list): O(1) uniform sampling, O(1) removal by swapping with the last element.
  With a GPU filter, candidates are drawn by rejection (a few tries), falling back to
  a scan of the key's members when qualifying nodes are rare.
- `least_loaded`: `_heaps[key]`, a binary heap (`heapq`) of entries
  `(stale, score, seq, node)` with lazy invalidation. Every change of a node (heartbeat,
  dispatch, status) takes a fresh `seq` from a global counter, records it in
  `_seq[node_id]` and pushes one new entry per key of the node; older entries of that
  node become invalid (`_seq[node_id] != seq`, or node no longer eligible) and are
  dropped when they reach the top. `seq` is unique, so it also breaks ties and entries
  never compare further. Staleness is time-driven, not change-driven: when a valid
  entry with `stale=0` reaches the top and its node's heartbeat has become too old, it
  is replaced by the same entry with `stale=1` (the clock is assumed not to go
  backwards: only a heartbeat makes a node fresh again, and a heartbeat pushes a new
  entry). Entries failing the GPU filter are popped aside during a selection and pushed
  back afterwards. A heap is rebuilt from its valid entries when it holds more than
  `2 * members + 256` entries, so garbage stays bounded (amortised O(1) per push).

Costs per `select()`: `round_robin` O(1); `power_of_two` O(1); `least_loaded`
O((k + 1) log n) for a node serving k models (the dispatch pushes k + 1 entries) plus
the invalid entries popped, each popped once. The GPU memory filter adds the skipped
nodes to that (worst case a scan when almost nothing has enough free memory). Failing
selections scan the key's members to explain why; they are not on the fast path.

Not thread-safe, like `NodeView`: use from the one event loop that owns the view.
"""

from __future__ import annotations

import heapq
import itertools
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from shared.domain.nodes import NodeLoad, NodeView

STRATEGIES = ("round_robin", "least_loaded", "power_of_two")

REQUEST_WEIGHT = 10.0          # score points per request in flight (seed: 10 x active)
LATENCY_MS_PER_POINT = 100.0   # avg_response_ms per score point
_COMPACT_SLACK = 256           # heap rebuilt above 2 * members + this many entries
_P2C_TRIES = 8                 # rejection-sampling draws per candidate under a GPU filter

NO_ONLINE_NODE = "no_online_node"
MODEL_NOT_SERVED = "model_not_served"
INSUFFICIENT_GPU_MEMORY = "insufficient_gpu_memory"


class NoEligibleNode(Exception):
    """No node qualifies for the request. `reason` is one of `NO_ONLINE_NODE`,
    `MODEL_NOT_SERVED` and `INSUFFICIENT_GPU_MEMORY` (checked in that order); the message
    says the same in words."""

    def __init__(self, reason: str, message: str, *, model: str | None = None,
                 gpu_memory_bytes: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.model = model
        self.gpu_memory_bytes = gpu_memory_bytes


def score(node: NodeLoad) -> float:
    """Load score, lower is better (see the module docstring for the formula)."""
    return ((node.cpu_pct or 0.0) + (node.memory_pct or 0.0)
            + REQUEST_WEIGHT * (node.active_requests + node.queue_depth + node.dispatched)
            + (node.avg_response_ms or 0.0) / LATENCY_MS_PER_POINT)


_seqs = itertools.count(1)  # global: a node re-indexed by any selector never reuses a seq


class NodeSelector:
    """Picks nodes from one `NodeView` with one strategy (see the module docstring)."""

    def __init__(self, view: NodeView, strategy: str = "least_loaded", *,
                 stale_after_s: float = 6.0, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown selection strategy {strategy!r}; "
                             f"valid strategies: {', '.join(STRATEGIES)}")
        self.view = view
        self.strategy = strategy
        self.stale_after_s = stale_after_s
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._keys: dict[str, tuple[str | None, ...]] = {}
        self._models: dict[str, frozenset[str]] = {}
        self._node: dict[str, NodeLoad] = {}
        # round_robin
        self._rings: dict[str | None, OrderedDict[str, NodeLoad]] = {}
        # power_of_two (also the member count of every strategy)
        self._lists: dict[str | None, list[NodeLoad]] = {}
        self._pos: dict[str | None, dict[str, int]] = {}
        # least_loaded
        self._heaps: dict[str | None, list[tuple[int, float, int, NodeLoad]]] = {}
        self._seq: dict[str, int] = {}
        self._select = {"round_robin": self._select_round_robin,
                        "least_loaded": self._select_least_loaded,
                        "power_of_two": self._select_power_of_two}[strategy]
        self._ll = strategy == "least_loaded"
        self._rr = strategy == "round_robin"
        for node in list(view.nodes.values()):
            self._on_change(node)
        view.subscribe(self._on_change)

    # -- public -----------------------------------------------------------------------

    def select(self, model: str | None = None, gpu_memory_bytes: int | None = None) -> NodeLoad:
        """Choose a node for a request, record the dispatch, return the node.

        Raises `NoEligibleNode` when no online, non-draining node serves `model` with
        `gpu_memory_bytes` free."""
        node = self._select(model, gpu_memory_bytes)
        if node is None:
            raise self._no_eligible(model, gpu_memory_bytes)
        self.view.note_dispatch(node.node_id)
        return node

    # -- index maintenance --------------------------------------------------------------

    def _on_change(self, node: NodeLoad) -> None:
        nid = node.node_id
        old = self._keys.get(nid)
        if not node.eligible:
            if old is not None:
                self._unindex(nid, old)
            return
        if old is None or self._node[nid] is not node:
            if old is not None:
                self._unindex(nid, old)
            self._index(node)
        elif node.models is not (models := self._models[nid]) and node.models != models:
            new = (None, *sorted(node.models))
            self._leave(nid, [k for k in old if k is not None and k not in node.models])
            self._join(node, [k for k in new if k is not None and k not in models])
            self._keys[nid] = new
            self._models[nid] = node.models
        if self._ll:
            self._push(node, self._keys[nid])

    def _index(self, node: NodeLoad) -> None:
        keys = (None, *sorted(node.models))
        self._keys[node.node_id] = keys
        self._models[node.node_id] = node.models
        self._node[node.node_id] = node
        self._join(node, keys)

    def _unindex(self, nid: str, keys: tuple[str | None, ...]) -> None:
        self._leave(nid, keys)
        del self._keys[nid]
        del self._models[nid]
        del self._node[nid]
        self._seq.pop(nid, None)  # every heap entry of this node is now invalid

    def _join(self, node: NodeLoad, keys: Iterable[str | None]) -> None:
        nid = node.node_id
        for key in keys:
            lst = self._lists.get(key)
            if lst is None:
                lst = self._lists[key] = []
                self._pos[key] = {}
                if self._rr:
                    self._rings[key] = OrderedDict()
                if self._ll:
                    self._heaps[key] = []
            self._pos[key][nid] = len(lst)
            lst.append(node)
            if self._rr:
                self._rings[key][nid] = node

    def _leave(self, nid: str, keys: Iterable[str | None]) -> None:
        for key in keys:
            lst, pos = self._lists[key], self._pos[key]
            i = pos.pop(nid)
            last = lst.pop()
            if last.node_id != nid:
                lst[i] = last
                pos[last.node_id] = i
            if self._rr:
                del self._rings[key][nid]

    def _push(self, node: NodeLoad, keys: tuple[str | None, ...]) -> None:
        seq = next(_seqs)
        self._seq[node.node_id] = seq
        lh = node.last_heartbeat
        stale = 0 if lh is not None and self._clock() - lh <= self.stale_after_s else 1
        entry = (stale, score(node), seq, node)
        heaps = self._heaps
        for key in keys:
            heap = heaps[key]
            heapq.heappush(heap, entry)
            if len(heap) > 2 * len(self._lists[key]) + _COMPACT_SLACK:
                self._compact(key)

    def _compact(self, key: str | None) -> None:
        cur = self._seq
        heap = [e for e in self._heaps[key] if cur.get(e[3].node_id) == e[2]]
        heapq.heapify(heap)
        self._heaps[key] = heap

    # -- strategies ---------------------------------------------------------------------

    def _select_round_robin(self, model: str | None, gpu: int | None) -> NodeLoad | None:
        ring = self._rings.get(model)
        if not ring:
            return None
        if gpu is None:
            nid = next(iter(ring))
        else:
            skipped = []
            for nid, node in ring.items():
                if node.gpu_memory_free_bytes >= gpu:
                    break
                skipped.append(nid)
            else:
                return None
            for other in skipped:  # like a cursor moving past them: they lose this turn
                ring.move_to_end(other)
        ring.move_to_end(nid)
        return self._node[nid]

    def _select_least_loaded(self, model: str | None, gpu: int | None) -> NodeLoad | None:
        heap = self._heaps.get(model)
        if not heap:
            return None
        cur = self._seq
        now = self._clock()
        max_age = self.stale_after_s
        aside = []
        found = None
        while heap:
            entry = heap[0]
            stale, sc, seq, node = entry
            if cur.get(node.node_id) != seq:
                heapq.heappop(heap)
                continue
            if not stale and (node.last_heartbeat is None
                              or now - node.last_heartbeat > max_age):
                heapq.heapreplace(heap, (1, sc, seq, node))
                continue
            if gpu is not None and node.gpu_memory_free_bytes < gpu:
                aside.append(heapq.heappop(heap))
                continue
            found = node
            break
        for entry in aside:
            heapq.heappush(heap, entry)
        return found

    def _select_power_of_two(self, model: str | None, gpu: int | None) -> NodeLoad | None:
        lst = self._lists.get(model)
        if not lst:
            return None
        n = len(lst)
        rand = self._rng.random
        if gpu is None:
            if n == 1:
                return lst[0]
            i = int(rand() * n)
            j = int(rand() * (n - 1))
            if j >= i:
                j += 1
            return self._better(lst[i], lst[j])
        # Rejection sampling: draws until two distinct members with enough free memory.
        first = -1
        for _ in range(2 * _P2C_TRIES):
            i = int(rand() * n)
            node = lst[i]
            if i == first or node.gpu_memory_free_bytes < gpu:
                continue
            if first < 0:
                first = i
            else:
                return self._better(lst[first], node)
        fits = [x for x in lst if x.gpu_memory_free_bytes >= gpu]
        if len(fits) <= 1:
            return fits[0] if fits else None
        i = int(rand() * len(fits))
        j = int(rand() * (len(fits) - 1))
        if j >= i:
            j += 1
        return self._better(fits[i], fits[j])

    def _better(self, a: NodeLoad, b: NodeLoad) -> NodeLoad:
        now, max_age = self._clock(), self.stale_after_s
        sa = a.last_heartbeat is None or now - a.last_heartbeat > max_age
        sb = b.last_heartbeat is None or now - b.last_heartbeat > max_age
        if sa != sb:
            return b if sa else a
        return b if score(b) < score(a) else a

    # -- failure ------------------------------------------------------------------------

    def _no_eligible(self, model: str | None, gpu: int | None) -> NoEligibleNode:
        online = self._lists.get(None) or []
        if not online:
            known = list(self.view.nodes.values())
            counts: dict[str, int] = {}
            for n in known:
                state = "draining" if n.status == "online" and n.draining else n.status
                counts[state] = counts.get(state, 0) + 1
            detail = ", ".join(f"{c} {s}" for s, c in sorted(counts.items()))
            return NoEligibleNode(
                NO_ONLINE_NODE,
                f"no online node to select from ({len(known)} known"
                + (f": {detail})" if detail else ")"),
                model=model, gpu_memory_bytes=gpu)
        serving = online if model is None else (self._lists.get(model) or [])
        if not serving:
            return NoEligibleNode(
                MODEL_NOT_SERVED,
                f"no online node serves model {model!r} ({len(online)} online)",
                model=model, gpu_memory_bytes=gpu)
        most = max(n.gpu_memory_free_bytes for n in serving)
        which = "online node" if model is None else f"online node serving model {model!r}"
        return NoEligibleNode(
            INSUFFICIENT_GPU_MEMORY,
            f"no {which} has {gpu} bytes of free GPU memory "
            f"(most free: {most} bytes on {len(serving)} node(s))",
            model=model, gpu_memory_bytes=gpu)

"""Which models go where: the memory a model needs (from its GGUF header), whether it
fits a node, and the placement rules (GPU memory tiers) that pick a node's models.

**Fit.** `estimate_memory` = weights (the GGUF file's size: its tensors as stored) +
KV cache at the context the node runs the model with (`2 * layers * context *
kv_heads * head_dim * 2` bytes: keys and values, f16) + runtime overhead (compute
buffers, the server itself: `RUNTIME_OVERHEAD_BYTES` plus 10 % of the weights). A GPU
node fits a model when one of its GPUs has that much memory in total (models are not
split across GPUs); a CPU-only node when 80 % of its RAM does (the rest is the OS's and
other processes'). Placement never sends a model where it does not fit.

**What is already loaded counts.** A GPU's room is its total minus what it holds: the
memory in use that the node's last heartbeat reported for it (NVML's `used`: loaded
models and anything else), or, before any heartbeat, the estimated memory of the models
the node has loaded (on its largest GPU). A CPU-only node's room is 80 % of its RAM
minus the estimated memory of its loaded models. The model being placed never counts
against itself (pulling a model a node already serves again is not refused).

**Rules.** `NEXUS_MODEL_PLACEMENT`, e.g. `16:big-model,8:mid-model,4.5:small-model,cpu:tiny`:
a node gets the model of the highest tier whose minimum (GiB of its largest GPU) it
meets; a node without GPUs gets the `cpu` model. Applied when a node registers and
when its hardware changes; a rule's model that does not fit (or is not in the store)
is skipped with a log line, never forced.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

GIB = 1024**3
RUNTIME_OVERHEAD_BYTES = 256 * 1024**2
CPU_RAM_SHARE = 0.8
DEFAULT_CONTEXT = 4096


class ModelArtifact(msgspec.Struct, frozen=True, kw_only=True):
    """A model in the store: its identity and what its GGUF header says."""

    name: str
    sha256: str
    size_bytes: int
    architecture: str = ""
    parameters: int = 0  # total parameter count (sum of tensor elements)
    quantization: str = ""  # the GGUF file type, e.g. Q4_1, Q4_K_M, F16
    context_length: int = 0  # the model's trained context
    layers: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    source: str = ""  # where it was imported from (file, URL, package)


def estimate_memory(model: ModelArtifact, context: int = DEFAULT_CONTEXT) -> int:
    """Bytes the runtime needs for `model` at `context` tokens (see the module doc)."""
    ctx = min(context, model.context_length) if model.context_length else context
    kv = 2 * model.layers * ctx * model.kv_heads * model.head_dim * 2
    return model.size_bytes + kv + RUNTIME_OVERHEAD_BYTES + model.size_bytes // 10


@dataclass(frozen=True)
class NodeCapacity:
    node_id: str
    gpu_memory: tuple[int, ...]  # total bytes per GPU
    memory_total: int
    online: bool = True
    gpu_used: tuple[int, ...] = ()  # bytes in use per GPU, from the last heartbeat (() unknown)
    loaded: tuple[tuple[str, int], ...] = ()  # (model, estimated bytes) of the models it serves


def _loaded_bytes(node: NodeCapacity, model: str) -> tuple[int, tuple[str, ...]]:
    others = [(name, need) for name, need in node.loaded if name != model]
    return sum(need for _, need in others), tuple(name for name, _ in others)


def gpu_room(node: NodeCapacity, model: str = "") -> list[tuple[int, int, int]]:
    """Per GPU: (total, in use, free) bytes, as placement sees them for `model`."""
    own = dict(node.loaded).get(model, 0) if model else 0
    if node.gpu_used and len(node.gpu_used) == len(node.gpu_memory):  # the heartbeat's figures
        used = list(node.gpu_used)
        if own:  # the model itself is loaded (on the busiest GPU, say): its room is its own
            i = max(range(len(used)), key=used.__getitem__)
            used[i] = max(0, used[i] - own)
    else:  # no heartbeat yet: the loaded models' estimates, on the largest GPU
        loaded, _ = _loaded_bytes(node, model)
        largest = max(range(len(node.gpu_memory)), key=lambda j: node.gpu_memory[j])
        used = [loaded if j == largest else 0 for j in range(len(node.gpu_memory))]
    return [(total, u, max(0, total - u)) for total, u in zip(node.gpu_memory, used, strict=True)]


def capacity_of(node: NodeCapacity, model: str = "") -> int:
    """The most memory `model` could have on `node` (one GPU, or the RAM share)."""
    if node.gpu_memory:
        return max(free for _, _, free in gpu_room(node, model))
    loaded, _ = _loaded_bytes(node, model)
    return max(0, int(node.memory_total * CPU_RAM_SHARE) - loaded)


def fit(node: NodeCapacity, model: ModelArtifact, context: int = DEFAULT_CONTEXT) -> str | None:
    """None if `model` fits `node`; else why not, in words (the 409's and task's reason)."""
    need = estimate_memory(model, context)
    have = capacity_of(node, model.name)
    if need <= have:
        return None
    _, names = _loaded_bytes(node, model.name)
    held = f" (loaded: {', '.join(names)})" if names else ""
    if node.gpu_memory:
        total, used, free = max(gpu_room(node, model.name), key=lambda r: r[2])
        where = (f"its roomiest GPU has {free / GIB:.2f} GiB free "
                 f"({total / GIB:.2f} GiB, {used / GIB:.2f} GiB in use{held})") if used else \
            f"its largest GPU has {total / GIB:.2f} GiB"
    else:
        share = int(node.memory_total * CPU_RAM_SHARE)
        where = f"it has no GPU and {CPU_RAM_SHARE:.0%} of its RAM is {share / GIB:.2f} GiB" + (
            f", {have / GIB:.2f} GiB of it free{held}" if have < share else "")
    return f"{model.name} needs {need / GIB:.2f} GiB; {where}"


@dataclass(frozen=True)
class PlacementRule:
    min_gpu_gib: float | None  # None: the rule for CPU-only nodes
    model: str


def parse_rules(text: str) -> tuple[PlacementRule, ...]:
    """`16:big,8:mid,cpu:tiny` -> rules (ValueError naming the bad item)."""
    rules = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        tier, sep, model = item.partition(":")
        if not sep or not model.strip():
            raise ValueError(f"placement item {item!r} is not TIER:MODEL")
        tier = tier.strip().lower()
        if tier == "cpu":
            rules.append(PlacementRule(None, model.strip()))
            continue
        try:
            gib = float(tier.removesuffix("gib").removesuffix("gb"))
        except ValueError:
            raise ValueError(f"placement item {item!r}: tier must be GiB or `cpu`") from None
        if gib < 0:
            raise ValueError(f"placement item {item!r}: tier must be >= 0")
        rules.append(PlacementRule(gib, model.strip()))
    return tuple(rules)


def models_for(node: NodeCapacity, rules: tuple[PlacementRule, ...]) -> tuple[str, ...]:
    """The models the rules choose for `node` (at most one: its tier's)."""
    if not node.gpu_memory:
        return tuple(r.model for r in rules if r.min_gpu_gib is None)[:1]
    largest = max(node.gpu_memory) / GIB
    tiers = sorted((r for r in rules if r.min_gpu_gib is not None),
                   key=lambda r: r.min_gpu_gib or 0.0, reverse=True)
    for rule in tiers:
        if largest >= (rule.min_gpu_gib or 0.0):
            return (rule.model,)
    return ()

"""Fit (shared.domain.placement): pure, no services. What a node already holds loaded
counts against what a new model may have."""

from __future__ import annotations

from shared.domain.placement import (
    GIB,
    ModelArtifact,
    NodeCapacity,
    capacity_of,
    estimate_memory,
    fit,
)

# ~2.25 GiB at a 4096 context: 2 GiB of KV cache (32 layers x 32 KV heads x 128) + overhead
MID = ModelArtifact(name="mid", sha256="0" * 64, size_bytes=1024, layers=32, kv_heads=32,
                    head_dim=128, context_length=32768)


def test_estimate_of_the_mid_model():
    assert 2.2 * GIB < estimate_memory(MID, 4096) < 2.3 * GIB


def test_gpu_fit_uses_free_memory_from_the_heartbeat():
    empty = NodeCapacity("n", gpu_memory=(4 * GIB,), memory_total=64 * GIB, gpu_used=(0,))
    assert fit(empty, MID) is None
    busy = NodeCapacity("n", gpu_memory=(4 * GIB,), memory_total=64 * GIB, gpu_used=(3 * GIB,),
                        loaded=(("other", 3 * GIB),))
    why = fit(busy, MID)
    assert why is not None
    assert "1.00 GiB free" in why and "3.00 GiB in use" in why and "loaded: other" in why
    # the same node counted by totals only would have taken it
    assert fit(NodeCapacity("n", gpu_memory=(4 * GIB,), memory_total=64 * GIB), MID) is None


def test_the_roomiest_gpu_is_the_one_that_counts():
    node = NodeCapacity("n", gpu_memory=(8 * GIB, 4 * GIB), memory_total=64 * GIB,
                        gpu_used=(7 * GIB, 0))
    assert capacity_of(node) == 4 * GIB
    assert fit(node, MID) is None


def test_without_a_heartbeat_loaded_models_are_estimated_on_the_largest_gpu():
    node = NodeCapacity("n", gpu_memory=(4 * GIB,), memory_total=64 * GIB,
                        loaded=(("a", 1 * GIB), ("b", 1 * GIB)))
    assert capacity_of(node) == 2 * GIB
    why = fit(node, MID)
    assert why is not None and "2.00 GiB free" in why and "loaded: a, b" in why


def test_cpu_node_subtracts_its_loaded_models_from_its_ram_share():
    node = NodeCapacity("n", gpu_memory=(), memory_total=4 * GIB)  # 80 %: 3.2 GiB
    assert fit(node, MID) is None
    loaded = NodeCapacity("n", gpu_memory=(), memory_total=4 * GIB, loaded=(("big", 2 * GIB),))
    why = fit(loaded, MID)
    assert why is not None and "no GPU" in why and "loaded: big" in why


def test_a_model_never_counts_against_itself():
    own = estimate_memory(MID)
    gpu = NodeCapacity("n", gpu_memory=(4 * GIB,), memory_total=64 * GIB,
                       gpu_used=(own + GIB,), loaded=(("mid", own),))
    assert fit(gpu, MID) is None  # 1 GiB of others + itself: re-pulling it is fine
    cpu = NodeCapacity("n", gpu_memory=(), memory_total=4 * GIB, loaded=(("mid", own),))
    assert fit(cpu, MID) is None


def test_gguf_header_reader_agrees_with_gguf_and_refuses_other_files(tmp_path):
    """Fit's inputs come from the header (shared.infra.gguf, arrays skipped): the same
    figures as llama.cpp's own `gguf` reader; a file that is not GGUF is a ValueError."""
    import gguf
    import pytest

    from shared.infra.gguf import describe, write_tiny

    path = write_tiny(tmp_path / "t.gguf", layers=5, context=2048, payload_bytes=8192,
                      embedding=128, heads=8, kv_heads=4)
    got = describe(path, name="t", sha256="x")
    ref = gguf.GGUFReader(path)
    assert got.parameters == sum(int(t.n_elements) for t in ref.tensors) == 2048
    assert (got.architecture, got.layers, got.context_length, got.kv_heads, got.head_dim,
            got.quantization) == ("llama", 5, 2048, 4, 16, "ALL_F32")
    bad = tmp_path / "not.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 8)  # truncated
    with pytest.raises(ValueError, match="not a readable GGUF"):
        describe(bad, name="bad", sha256="x")

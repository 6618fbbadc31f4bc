"""What a GGUF file says about its model: read from its header with the `gguf` package
(llama.cpp's own reader), never by loading the weights.

`describe(path, name=..., sha256=...)` -> a `ModelArtifact` (architecture, parameter
count, quantisation, trained context, the layer and attention shape the KV-cache
estimate needs). A file that is not GGUF raises `ValueError` naming it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from shared.domain.placement import ModelArtifact


def sha256_file(path: Path, progress=None) -> str:
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done)
    return digest.hexdigest()


def _value(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    try:
        return field.contents()
    except Exception:  # noqa: BLE001 - an odd field type: treat as absent
        return default


def describe(path: Path, *, name: str, sha256: str, source: str = "") -> ModelArtifact:
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - gguf raises ValueError/struct errors
        raise ValueError(f"{path.name} is not a readable GGUF file: {exc}") from None
    arch = str(_value(reader, "general.architecture", "") or "")
    heads = int(_value(reader, f"{arch}.attention.head_count", 0) or 0)
    kv_heads = int(_value(reader, f"{arch}.attention.head_count_kv", heads) or heads)
    embd = int(_value(reader, f"{arch}.embedding_length", 0) or 0)
    head_dim = int(_value(reader, f"{arch}.attention.key_length", 0) or 0) or (
        embd // heads if heads else 0)
    file_type = _value(reader, "general.file_type")
    quant = ""
    if file_type is not None:
        try:
            quant = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
        except ValueError:
            quant = f"type {file_type}"
    return ModelArtifact(
        name=name, sha256=sha256, size_bytes=path.stat().st_size, architecture=arch,
        parameters=sum(int(t.n_elements) for t in reader.tensors), quantization=quant,
        context_length=int(_value(reader, f"{arch}.context_length", 0) or 0),
        layers=int(_value(reader, f"{arch}.block_count", 0) or 0), kv_heads=kv_heads,
        head_dim=head_dim, source=source)


def write_tiny(path: Path, *, arch: str = "llama", layers: int = 2, context: int = 512,
               payload_bytes: int = 1 << 20, seed: int = 0, embedding: int = 64, heads: int = 4,
               kv_heads: int = 2) -> Path:
    """A small valid GGUF (header + one f32 tensor of about `payload_bytes`), for tests
    and benches: real files that the header reader and the store treat like any other."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_context_length(context)
    writer.add_embedding_length(embedding)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_file_type(0)
    rng = np.random.default_rng(seed)
    writer.add_tensor("weights", rng.random(max(1, payload_bytes // 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)

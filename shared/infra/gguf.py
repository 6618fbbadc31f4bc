"""What a GGUF file says about its model: read from its header (a small reader of the
GGUF format that skips arrays; the `gguf` package, llama.cpp's own, writes test files
and names the file types), never by loading the weights.

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


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Field:
    def __init__(self, value) -> None:
        self.value = value

    def contents(self):
        return self.value


class _Header:
    """The GGUF header read straight from the file: scalar metadata and tensor shapes.
    Arrays (a tokenizer's 262k-token vocabulary) are skipped, never built: `gguf`'s own
    reader materialises them and takes minutes on a busy machine for Gemma 3."""

    def __init__(self, path: Path) -> None:
        import struct

        self.fields: dict[str, _Field] = {}
        self.n_elements = 0
        with open(path, "rb") as f:
            def read(fmt: str):
                size = struct.calcsize(fmt)
                data = f.read(size)
                if len(data) != size:
                    raise ValueError("truncated header")
                return struct.unpack(fmt, data)[0]

            def string() -> str:
                return f.read(read("<Q")).decode("utf-8", errors="replace")

            def skip(kind: int, count: int) -> None:
                if kind == _STRING:
                    for _ in range(count):
                        f.seek(read("<Q"), 1)
                elif kind == _ARRAY:
                    for _ in range(count):
                        skip(read("<I"), read("<Q"))
                elif kind in _SCALARS:
                    f.seek(struct.calcsize(_SCALARS[kind]) * count, 1)
                else:
                    raise ValueError(f"unknown GGUF value type {kind}")

            if f.read(4) != b"GGUF":
                raise ValueError("no GGUF magic")
            if read("<I") not in (2, 3):
                raise ValueError("unsupported GGUF version")
            tensors, kvs = read("<Q"), read("<Q")
            for _ in range(kvs):
                key, kind = string(), read("<I")
                if kind == _STRING:
                    self.fields[key] = _Field(string())
                elif kind == _ARRAY:
                    skip(read("<I"), read("<Q"))
                elif kind in _SCALARS:
                    self.fields[key] = _Field(read(_SCALARS[kind]))
                else:
                    raise ValueError(f"unknown GGUF value type {kind}")
            for _ in range(tensors):
                string()
                count = 1
                for _ in range(read("<I")):
                    count *= read("<Q")
                read("<I")
                read("<Q")
                self.n_elements += count


def describe(path: Path, *, name: str, sha256: str, source: str = "") -> ModelArtifact:
    import gguf

    path = Path(path)
    try:
        reader = _Header(path)
    except (OSError, ValueError, OverflowError, MemoryError) as exc:
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
        parameters=reader.n_elements, quantization=quant,
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

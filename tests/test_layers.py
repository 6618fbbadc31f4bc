"""The layers point one way: contracts <- domain <- infrastructure <- services <- ops.

Every module of the project is parsed (not imported) and each of its imports of
another project module is checked against the layer map below:

- `shared.contracts` (events, messages, stream frames, subjects, errors) imports no
  other layer;
- `shared.domain` (budgets, policy, selection, node lifecycle, routing: pure
  decisions) imports contracts only;
- `shared.infra` (event store, messaging, settings, telemetry, embedded servers,
  upstream adapters) imports contracts and domain;
- `services.<name>` imports the layers below and its own package, never another
  service;
- `ops` (the CLI and the supervisor) may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("shared.contracts", "shared.domain", "shared.infra", "services", "ops")
ALLOWED = {
    "shared.contracts": {"shared.contracts"},
    "shared.domain": {"shared.contracts", "shared.domain"},
    "shared.infra": {"shared.contracts", "shared.domain", "shared.infra"},
    "services": {"shared.contracts", "shared.domain", "shared.infra", "services"},
    "ops": set(LAYERS),
}
PROJECT = ("shared", "services", "ops")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str | None:
    for layer in LAYERS:
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def project_modules() -> list[Path]:
    return sorted(p for top in PROJECT for p in (REPO / top).rglob("*.py"))


def imports_of(source: str, filename: str) -> list[tuple[int, str]]:
    """(line, module) of every project import, the lazy ones inside functions included."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "shared":  # `from shared import __version__`
                found += [(node.lineno, f"shared.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
    return [(line, mod) for line, mod in found if mod.split(".")[0] in PROJECT]


def check(module: str, source: str, filename: str) -> list[str]:
    """What is wrong with the imports of one module."""
    layer = layer_of(module)
    if layer is None:
        return [] if module == "shared" else [f"{filename}: {module} is in no layer"]
    bad = []
    for line, imported in imports_of(source, filename):
        if imported == "shared.__version__":
            continue
        target = layer_of(imported)
        where = f"{filename}:{line} imports {imported}"
        if target is None:
            bad.append(f"{where}: a module outside the layer map")
        elif target not in ALLOWED[layer]:
            bad.append(f"{where}: {layer} may not import {target}")
        elif layer == target == "services" and imported.split(".")[:2] != module.split(".")[:2]:
            bad.append(f"{where}: a service imports another service")
    return bad


def violations() -> list[str]:
    return [v for path in project_modules()
            for v in check(module_name(path), path.read_text(), str(path.relative_to(REPO)))]


def test_every_project_module_sits_in_one_layer() -> None:
    modules = [module_name(p) for p in project_modules()]
    assert modules and all(layer_of(m) or m == "shared" for m in modules)


def test_imports_point_down_the_layers_and_never_across_services() -> None:
    assert violations() == []


@pytest.mark.parametrize(("module", "imported", "why"), [
    ("shared.domain.x", "shared.infra.settings", "shared.domain may not import shared.infra"),
    ("shared.infra.x", "services.orchestrator.app", "shared.infra may not import services"),
    ("services.node.x", "services.provider.adapters", "a service imports another service"),
    ("shared.contracts.x", "ops.cli", "shared.contracts may not import ops"),
    ("shared.x", "shared.contracts.events", "is in no layer"),
])
def test_the_checker_catches_an_upward_arrow(module, imported, why) -> None:
    """The checker itself: a planted upward import, even a lazy one, is reported."""
    source = f"def later():\n    from {imported} import thing\n"
    assert any(why in v for v in check(module, source, "planted.py"))

"""The rooms' one-way arrows (docs/architecture.md), checked on the source: an import that runs the wrong
way, or closes a cycle, fails here. Every import counts, including those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("swarm", "node", "desktop")

# What each room may import of this project, beyond itself.
ALLOWED = {
    "swarm": {"swarm"},
    "node.model": {"swarm", "node.model"},
    "node.net": {"swarm", "node.model", "node.net"},
    "node.serve": {"swarm", "node.model", "node.net", "node.serve"},
    "node.client": {"swarm", "node.model", "node.net", "node.client"},
    "node.app": {"swarm", "node"},
    "desktop": {"swarm", "node", "desktop"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_imports(path: Path) -> set[str]:
    """The project modules `path` imports, as dotted names (`from a import b` counts a.b when that is a module)."""
    found: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES and resolve(name)}


def resolve(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def all_modules() -> dict[str, set[str]]:
    graph = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            graph[module_name(path)] = project_imports(path)
    return graph


def room_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "node" and len(parts) > 1 else parts[0]


def allowed(importer: str, imported: str) -> bool:
    rules = ALLOWED.get(room_of(importer), {"swarm"} if importer == "node" else set())
    return any(imported == rule or imported.startswith(rule + ".") for rule in rules)


def test_every_import_points_the_right_way():
    graph = all_modules()
    assert len(graph) > 50 and "node.serve.server" in graph and "node.client.session" in graph
    wrong = sorted(f"{a} imports {b}" for a, targets in graph.items() for b in targets
                   if room_of(a) != room_of(b) and not allowed(a, b))
    assert not wrong, "imports against the rooms' arrows:\n" + "\n".join(wrong)


def test_serving_and_client_never_import_each_other():
    graph = all_modules()
    crossing = sorted(f"{a} imports {b}" for a, targets in graph.items() for b in targets
                      if {room_of(a), room_of(b)} == {"node.serve", "node.client"})
    assert not crossing, "\n".join(crossing)


def test_no_import_cycles():
    graph = all_modules()
    # A package's __init__ is not an edge to its modules' contents: only real modules count.
    edges = {a: {b for b in targets if b in graph and b != a} for a, targets in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(edges[module]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_check_catches_a_wrong_way_import(tmp_path):
    # The rules are not vacuous: the arrows they forbid are named as forbidden.
    assert not allowed("swarm.router", "node.model.stage")
    assert not allowed("node.serve.server", "node.client.session")
    assert not allowed("node.client.session", "node.serve.server")
    assert not allowed("node.model.stage", "node.net.protocol")
    assert not allowed("node.net.protocol", "node.app.cli")
    assert allowed("node.app.cli", "node.serve.node") and allowed("desktop.app", "node.app.controller")

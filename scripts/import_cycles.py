"""Fails if the files of a crate or of the Python package import each other
in a circle. A file's imports are its ``crate::module`` paths (Rust) or its
relative ``from .module import`` lines (Python); a folder module counts as one
file per source file, named by its path (``call/send``).

    python scripts/import_cycles.py            # check, print the graph's layers
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUST_CRATES = [ROOT / "rust" / "core" / "src", ROOT / "rust" / "bindings" / "src"]
PYTHON_PACKAGE = ROOT / "python" / "shardloop"

RUST_PATH = re.compile(r"\b(crate|super|self)::([a-z_][a-z0-9_]*(?:::[a-z_][a-z0-9_]*)*)")
# `use child::item;` in a folder module, naming a child module directly.
RUST_CHILD = re.compile(r"^\s*(?:pub(?:\([a-z]+\))? )?use ([a-z_][a-z0-9_]*)::", re.M)
RUST_GROUP = re.compile(r"\buse crate::\{([^;]*)\};", re.S)
PY_IMPORT = re.compile(r"^\s*from \.([a-z_][a-z0-9_]*)? import (\([^)]*\)|[^\n]+)", re.M)


def rust_module(src: Path, file: Path) -> str:
    parts = list(file.relative_to(src).with_suffix("").parts)
    if parts[-1] == "mod":
        parts.pop()
    return "/".join(parts) or "lib"


def strip_tests(text: str) -> str:
    """The file without its `#[cfg(test)]`-style test module (tests may reach
    anywhere)."""
    match = re.search(r"#\[cfg\((?:all\()?test[^\]]*\]\s*mod \w+ \{", text)
    return text[: match.start()] if match else text


def rust_graph(src: Path) -> dict[str, set[str]]:
    modules = {rust_module(src, f): f for f in src.rglob("*.rs")}
    graph: dict[str, set[str]] = {}
    for name, file in modules.items():
        if name == "lib":
            continue
        text = strip_tests(file.read_text())
        # Comments (doc links among them) are not imports.
        text = re.sub(r"//[^\n]*", "", text)
        here = name.split("/")
        bases = {"crate": [], "super": here[:-1], "self": here}
        paths = [(bases[m.group(1)], m.group(2)) for m in RUST_PATH.finditer(text)]
        paths += [(here, m.group(1)) for m in RUST_CHILD.finditer(text)]
        for group in RUST_GROUP.finditer(text):
            paths += [([], p.strip()) for p in group.group(1).split(",")]
        edges = set()
        for base, path in paths:
            segments = path.split("::")
            # The longest prefix that names a module of the crate.
            for n in range(len(segments), 0, -1):
                target = "/".join(base + segments[:n])
                if target in modules and target != name:
                    edges.add(target)
                    break
        graph[name] = edges
    return graph


def python_graph(package: Path) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for file in package.glob("*.py"):
        text = file.read_text()
        edges = set()
        for module, names in PY_IMPORT.findall(text):
            if module:
                edges.add(module)
            else:
                edges |= {n.strip(" ()\n") for n in names.split(",") if n.strip(" ()\n")}
        graph[file.stem] = {e for e in edges if (package / f"{e}.py").exists()} - {file.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layers(graph: dict[str, set[str]]) -> list[list[str]]:
    """The modules by depth: each imports only modules of earlier layers."""
    depth: dict[str, int] = {}

    def level(node: str) -> int:
        if node not in depth:
            depth[node] = 1 + max((level(n) for n in graph.get(node, ())), default=-1)
        return depth[node]

    for node in graph:
        level(node)
    out: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for node, d in depth.items():
        out[d].append(node)
    return [sorted(layer) for layer in out]


def main() -> int:
    failed = False
    graphs = {str(src.relative_to(ROOT)): rust_graph(src) for src in RUST_CRATES}
    graphs[str(PYTHON_PACKAGE.relative_to(ROOT))] = python_graph(PYTHON_PACKAGE)
    for name, graph in graphs.items():
        cycle = find_cycle(graph)
        if cycle:
            failed = True
            print(f"{name}: import circle: {' -> '.join(cycle)}")
            continue
        if "-v" in sys.argv:
            print(f"{name}: no import circle; layers, each importing only earlier ones:")
            for i, layer in enumerate(layers(graph)):
                print(f"  {i}: {', '.join(layer)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The shape of the source tree: no import cycle, no module over 600 lines, nothing that cites a file the repository
does not have."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "longlora"
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names (relative levels resolved against `module`)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its body (functions included: a lazy import that
    closes a cycle is still a cycle)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path, node)
                # `from . import x` imports the submodule x when there is one, else a name of the package
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # `import longlora.attention.cpu.x` -> the module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_src():
    graph = import_graph()
    assert "longlora.attention.cpu" in graph["longlora.attention"]  # the dispatch imports its backends ...
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_backend_imports_the_dispatch():
    graph = import_graph()
    backends = [m for m in graph if m.startswith("longlora.attention.")]
    assert {"longlora.attention.sdpa", "longlora.attention.cpu", "longlora.attention.varlen",
            "longlora.attention.flash", "longlora.attention.layout"} <= set(backends)
    for module in backends:  # ... and no backend imports it back
        assert "longlora.attention" not in graph[module], module


def test_no_source_file_over_600_lines():
    files = sorted((SRC / PACKAGE).rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these along their ideas: {long}"


# `path/to/file.ext` or [text](relative/link) in the user-facing text: each must exist in the repository
_CITED = re.compile(r"(?:\]\((?!https?:|#|mailto:)([^)#\s]+)\))|(?:`((?:src|docs|configs|benchmarks|tests|\.ci)/[^`\s]+)`)")
_NAMED = re.compile(r"\b([A-Z][A-Z0-9_]+\.md)\b")


def test_nothing_cites_a_file_that_is_not_in_the_repository():
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "configs").rglob("*.yaml")),
             *sorted((SRC / PACKAGE).rglob("*.py"))]
    missing = []
    for path in texts:
        text = path.read_text()
        for match in _CITED.finditer(text):
            cited = match.group(1) or match.group(2)
            cited = cited.rstrip(".,:;")
            where = path.parent if match.group(1) else ROOT
            if any(c in cited for c in "*{<$") or cited.startswith(("runs/", "outputs/")):
                continue  # patterns and run outputs, not files of the repository
            if not (where / cited).exists():
                missing.append(f"{path.relative_to(ROOT)}: {cited}")
        for name in _NAMED.findall(text):
            if not any(ROOT.rglob(name)):
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, missing

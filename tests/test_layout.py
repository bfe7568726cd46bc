"""The house rules of palate/ (docs/overview.md): small rooms, imports that run downhill, no
import circle, no ``type: ignore``. Read from the source with ast; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

PALATE = Path(__file__).resolve().parents[1] / "palate"

# docs/overview.md "Floors": a module imports from its own floor or below
FLOORS = [
    ["palate", "palate.config", "palate.errors", "palate.progress", "palate.data", "palate.text"]
    + ["palate.eval.stats"],
    ["palate.models", "palate.formatting", "palate.rundir", "palate.lm", "palate.compiling"]
    + ["palate.training", "palate.sampling", "palate.generate", "palate.ppo_math"],
    ["palate.sft", "palate.label", "palate.reward", "palate.ppo", "palate.feedback"],
    ["palate.eval", "palate.raters", "palate.report"],
    ["palate.pipeline", "palate.cli"],
]


def modules() -> dict[str, Path]:
    out = {}
    for path in PALATE.rglob("*.py"):
        if "migrations" in path.parts:  # Alembic's generated revisions
            continue
        name = ".".join(path.relative_to(PALATE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def floor(module: str) -> int:
    best = (-1, -1)
    for i, names in enumerate(FLOORS):
        for m in names:
            if (module == m or module.startswith(m + ".")) and len(m) > best[1]:
                best = (i, len(m))
    assert best[0] >= 0, f"{module}: on no floor (add it to FLOORS and docs/overview.md)"
    return best[0]


def palate_imports(name: str, path: Path) -> set[str]:
    """palate modules ``name`` imports (anywhere in the file, relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("palate")}


def test_no_module_over_600_lines_and_no_function_over_80() -> None:
    long = []
    for name, path in modules().items():
        text = path.read_text()
        if text.count("\n") > 600:
            long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > 80:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, long


def test_imports_run_downhill() -> None:
    uphill = [
        f"{name} imports {target}"
        for name, path in modules().items()
        for target in palate_imports(name, path)
        if target in modules() and floor(target) > floor(name)
    ]
    assert not uphill, uphill


def test_no_import_circle() -> None:
    mods = modules()
    edges = {n: {t for t in palate_imports(n, p) if t in mods and t != n} for n, p in mods.items()}
    # a package's __init__ importing its own submodules is how packages work; a submodule
    # importing its package's __init__ back closes a circle
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for t in sorted(edges[n]):
            if state.get(t) == 1:
                raise AssertionError(" -> ".join(stack[stack.index(t) :] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[n] = 2

    for n in sorted(mods):
        if n not in state:
            visit(n)


def test_no_type_ignore() -> None:
    hits = [
        f"{p.relative_to(PALATE.parent)}:{i}"
        for p in modules().values()
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "type: ignore" in line
    ]
    assert not hits, hits

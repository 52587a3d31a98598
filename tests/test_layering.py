"""The package layering, read from the source: `cli → lite → offload → quant`, conversion (`lite/convert/`) above
the rest of lite, and no import cycle among modules at import time."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "lite", "offload", "quant")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = p
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module that `import name` loads (a package's for `pkg.attr`), None for third-party ones."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path, modules: dict[str, Path], module_level: bool) -> set[str]:
    """Project modules `path` imports: at module level only (what runs on import), or anywhere in it."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if module_level else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {_resolve(a.name, modules) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:  # `from pkg import submodule` imports the submodule
                full = f"{node.module}.{a.name}"
                found.add(_resolve(full if full in modules else node.module, modules))
    return {m for m in found if m}


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {m: _imports(p, modules, module_level=True) - {m} for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in sorted(graph[m]):
            assert state.get(dep) != 1, "import cycle: " + " → ".join([*path[path.index(dep) :], dep])
            if dep not in state:
                visit(dep, [*path, dep])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_layers() -> None:
    """Each layer imports only those below it, and only conversion code imports conversion code (anywhere)."""
    modules = _modules()
    below = {"cli": {"cli", "lite", "offload", "quant"}, "lite": {"lite", "offload", "quant"},
             "offload": {"offload", "quant"}, "quant": {"quant"}}  # fmt: skip
    for m, p in modules.items():
        deps = _imports(p, modules, module_level=False)
        top = m.split(".")[0]
        assert all(d.split(".")[0] in below[top] for d in deps), (m, sorted(deps))
        if top == "lite" and not m.startswith("lite.convert"):
            assert not any(d.startswith("lite.convert") for d in deps), (m, sorted(deps))

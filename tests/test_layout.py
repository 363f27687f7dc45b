"""The layout stays as docs/architecture.md draws it: stage packages only, no import cycles, no stages/ from the
library, and each package says its job in its first docstring line."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipeline"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PIPELINE.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _top_level_imports(path: Path, known: set[str]) -> set[str]:
    """Modules imported when ``path`` is imported (imports inside functions and TYPE_CHECKING are lazy)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("pipeline", "stages"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in ("pipeline", "stages")}
    return found


def test_pipeline_holds_packages_only():
    assert sorted(p.name for p in PIPELINE.glob("*.py")) == ["__init__.py"]
    for pkg in (p for p in PIPELINE.rglob("*") if p.is_dir() and p.name != "__pycache__"):
        doc = ast.get_docstring(ast.parse((pkg / "__init__.py").read_text()))
        assert doc and doc.splitlines()[0].strip(), f"{pkg} needs a one-line docstring naming its job"


def test_no_import_cycles_and_no_stages_in_the_library():
    mods = _modules()
    graph = {m: {t for t in _top_level_imports(p, set(mods)) if t != m} for m, p in mods.items()}
    assert not [m for m, deps in graph.items() if any(d.startswith("stages") for d in deps)]
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph.get(m, ()):
            if d not in graph:
                continue
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path + [m, d])
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])

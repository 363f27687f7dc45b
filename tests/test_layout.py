"""The layout stays as docs/architecture.md draws it: stage packages only, each importing only the packages below it
in LAYERS (imports inside functions count too), no import cycles, no stages/ from the library, thin commands, and
each package says its job in its first docstring line."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipeline"
# The package order of docs/architecture.md, lowest first: a package may import those before it, never after.
LAYERS = ("common", "data", "train", "teachers", "features", "students", "retrieval", "distill", "adapt", "classify",
          "experiments")
STAGE_LINES = 140  # stages/ modules parse arguments, call the library and print: about a screen each


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


def _all_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every pipeline import in ``path``, at any depth (functions too), except under
    ``if TYPE_CHECKING:`` (annotations only, never run)."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline."):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("pipeline.")]
    return found


def test_packages_import_only_the_layers_below_them():
    packages = sorted(p.name for p in PIPELINE.iterdir() if (p / "__init__.py").is_file())
    assert sorted(LAYERS) == packages, "every package has a place in LAYERS (and docs/architecture.md)"
    upward = []
    for path in PIPELINE.glob("*/**/*.py"):
        here = LAYERS.index(path.relative_to(PIPELINE).parts[0])
        for line, module in _all_imports(path):
            there = LAYERS.index(module.split(".")[1])
            if there > here:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_layer_check_sees_imports_inside_functions(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline.classify import x\n"
                   "def f():\n    from pipeline.distill.trainer import y\n")
    assert _all_imports(src) == [(5, "pipeline.distill.trainer")]


def test_commands_stay_thin():
    long = {p.name: n for p in (ROOT / "stages").glob("*.py")
            if (n := sum(1 for line in p.read_text().splitlines() if line.strip())) > STAGE_LINES}
    assert not long, f"stages/ modules over {STAGE_LINES} non-blank lines (move the logic into pipeline/): {long}"


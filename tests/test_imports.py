"""The package's layering, read from the source (every ``cmbfe`` import, at module top or inside a function):
each module imports only modules of its own or a lower layer, the maths core imports no orchestration
module, and there is no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import cmbfe

PKG = Path(cmbfe.__file__).parent

# Lowest first. A new module gets a layer here: the test names any module that has none.
LAYERS: dict[str, int] = {
    # dependency-free helpers (no cmbfe imports but each other)
    "__init__": 0, "errors": 0, "runtime": 0, "paper": 0, "utils": 0, "boxes": 0,
    "config": 1,
    # maths core
    "volume": 2, "metrics": 2, "stats": 2, "fe": 2, "labels": 2,
    # stages: data, models, readers and writers
    "io": 3, "synth": 3, "augment": 3, "preprocess": 3, "models": 3, "data": 3, "evaluate": 3, "tables": 3,
    "viz": 3, "curves": 3,
    # training and inference
    "predict": 4, "train": 4, "detect": 4, "detect_io": 4, "detect_report": 4,
    # the study the notebooks run
    "study": 5, "report": 5, "experiments": 5, "mechanism": 5, "detect_model": 5,
    # commands
    "reproduce": 6, "cli": 6,
}
CORE = {"volume", "metrics", "stats", "fe", "labels"}
ORCHESTRATION = {"study", "report", "experiments", "reproduce", "cli", "train", "predict", "preprocess",
                 "evaluate", "tables", "viz"}


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` blocks (imports for annotations only, never executed)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def imports_of(path: Path) -> set[str]:
    """The cmbfe modules ``path`` imports (names without the package, ``__init__`` for the package)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    out: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("cmbfe.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "cmbfe":
                out |= {a.name if (PKG / f"{a.name}.py").is_file() else "__init__" for a in node.names}
            elif node.module.startswith("cmbfe."):
                out.add(node.module.split(".")[1])
    return out - {path.stem}


def graph() -> dict[str, set[str]]:
    return {p.stem: imports_of(p) for p in sorted(PKG.glob("*.py"))}


def test_every_module_has_a_layer():
    assert not set(graph()) - set(LAYERS), "add these modules to LAYERS"


def test_no_import_goes_up_a_layer():
    bad = [f"{m} (layer {LAYERS[m]}) imports {d} (layer {LAYERS[d]})"
           for m, deps in graph().items() for d in sorted(deps) if m in LAYERS and LAYERS.get(d, 0) > LAYERS[m]]
    assert not bad, bad


def test_maths_core_imports_no_orchestration():
    g = graph()
    for m in CORE:
        assert not g[m] & ORCHESTRATION, (m, g[m] & ORCHESTRATION)
        assert all(LAYERS[d] <= LAYERS["config"] or d in CORE for d in g[m]), (m, g[m])


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_the_checker_sees_function_level_imports(tmp_path):
    p = tmp_path / "mod.py"
    p.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cmbfe.study import x\n"
                 "def f():\n    from cmbfe import config, __version__\n    import cmbfe.report\n")
    assert imports_of(p) == {"config", "__init__", "report"}

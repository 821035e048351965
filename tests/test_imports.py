"""The package's plan, read from the source: layers, the two wings, no import circle, sizes.

Every ``cmbfe`` import counts: at module top, inside a function, under ``if TYPE_CHECKING:`` (for a reader a
type-only import is a dependency all the same), relative ones, and the command table's dynamic imports (a
``"cmbfe.<module>"`` string in a module that imports ``importlib``).

The plan: a flat core (:data:`LAYERS`, lowest first; a module imports only its own or lower layers) and two
wings, ``cmbfe/detect/`` (the scan tool) and ``cmbfe/study/`` (what the notebooks run). The core imports
neither wing, ``detect`` never imports ``study``; only the command dispatcher ``cli`` sits above both.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cmbfe

PKG = Path(cmbfe.__file__).parent
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_LINE = 500, 80, 110

# The flat core, lowest first. A new module gets a layer here: the test names any module that has none.
LAYERS: dict[str, int] = {
    # base helpers (no cmbfe imports but each other)
    "__init__": 0, "errors": 0, "runtime": 0, "utils": 0, "boxes": 0, "coerce": 0,
    # the configuration and the preprocessed-data folder
    "config": 1, "datadir": 1,
    # maths core
    "volume": 2, "metrics": 2, "valdo": 2, "stats": 2, "fe": 2, "labels": 2, "priors": 2,
    # stages: readers and writers, synthesis, preprocessing, data, the model's parts, evaluation, plots
    "io": 3, "dicom_write": 3, "synth_anatomy": 3, "synth_physics": 3, "synth_lesions": 3, "synth": 3,
    "augment": 3, "preprocess": 3, "data": 3, "backbones": 3, "models": 3, "evaluate": 3, "viz": 3,
    "cocoresults": 3, "holdout": 3,
    # the model folder, inference and training
    "modelfolder": 4, "predict": 4, "checkpoint": 4, "fe_gap": 4, "validation": 4, "train": 4,
}
WINGS = {"detect": 5, "study": 6}  # every module of a wing sits on its layer
ENTRY = {"cli": 7}  # the ``cmbfe`` command: dispatches to core stages and to both wings
CORE = {"volume", "metrics", "valdo", "stats", "fe", "labels", "priors"}  # the maths: no model, no data, no tool
ORCHESTRATION = {"train", "predict", "preprocess", "evaluate", "viz", "cli"}


def module_name(path: Path, root: Path = PKG) -> str:
    """Dotted name below the package: ``train``, ``detect.pipeline``; a package's ``__init__`` is the package
    (``study``), the top one ``__init__``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(dotted: str, known: set[str]) -> str:
    """The module ``dotted`` (below the package) names: itself, else its longest known prefix."""
    parts = dotted.split(".") if dotted else []
    while parts:
        if ".".join(parts) in known:
            return ".".join(parts)
        parts.pop()
    return "__init__"


def imports_of(path: Path, known: set[str], name: str | None = None) -> set[str]:
    """The cmbfe modules that module ``name`` (default: from ``path``) imports, by every kind of import."""
    tree = ast.parse(path.read_text())
    me = name if name is not None else module_name(path)
    package = me.split(".") if path.name == "__init__.py" and me != "__init__" else me.split(".")[:-1]
    dynamic = any(isinstance(n, ast.Import) and any(a.name == "importlib" for a in n.names)
                  for n in ast.walk(tree))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {_resolve(a.name[6:], known) for a in node.names if a.name.split(".")[0] == "cmbfe"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "cmbfe":
                mod = node.module[6:]
            else:
                continue
            for a in node.names:  # ``from cmbfe.study import runs`` imports the module study.runs
                sub = f"{mod}.{a.name}" if mod else a.name
                out.add(sub if sub in known else _resolve(mod, known))
        elif (dynamic and isinstance(node, ast.Constant) and isinstance(node.value, str)
              and node.value.startswith("cmbfe.") and node.value[6:] in known):
            out.add(node.value[6:])
    return out - {me}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports_of(p, set(mods)) for m, p in mods.items()}


def layer(m: str) -> int:
    wing = m.split(".")[0]
    if wing in WINGS:
        return WINGS[wing]
    return ENTRY.get(m, LAYERS.get(m, -1))


def test_every_module_has_a_layer():
    missing = [m for m in modules() if layer(m) < 0]
    assert not missing, f"add these modules to LAYERS: {missing}"


def test_no_import_goes_up_a_layer():
    bad = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
           for m, deps in graph().items() for d in sorted(deps) if layer(d) > layer(m)]
    assert not bad, bad


def test_core_imports_neither_wing_and_detect_never_imports_study():
    g = graph()
    wing = {m: m.split(".")[0] for m in g}
    core = [m for m in g if wing[m] not in WINGS and m not in ENTRY]
    bad = [f"{m} imports {d}" for m in core for d in sorted(g[m]) if wing[d] in WINGS]
    bad += [f"{m} imports {d}" for m in g if wing[m] == "detect" for d in sorted(g[m]) if wing[d] == "study"]
    assert not bad, bad


def test_maths_core_imports_no_orchestration():
    g = graph()
    for m in CORE:
        assert not g[m] & ORCHESTRATION, (m, g[m] & ORCHESTRATION)
        assert all(LAYERS.get(d, 99) <= LAYERS["config"] or d in CORE for d in g[m]), (m, g[m])


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


def test_the_checker_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "cmbfe"
    (pkg / "study").mkdir(parents=True)
    p = pkg / "study" / "mod.py"
    p.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cmbfe.detect import x\n"
                 "def f():\n    from cmbfe import config, __version__\n    import cmbfe.viz\n"
                 "from . import runs\nfrom .tables import save\nfrom .. import train\n")
    known = {"__init__", "config", "viz", "train", "detect", "study", "study.runs", "study.tables"}
    assert imports_of(p, known, "study.mod") == {"detect", "config", "__init__", "viz", "study.runs",
                                                  "study.tables", "train"}
    q = pkg / "cli.py"
    q.write_text('import importlib\nCOMMANDS = {"run": "cmbfe.study.runs", "doc": "not cmbfe.study"}\n')
    assert imports_of(q, known, "cli") == {"study.runs"}


def _code_width(line: str) -> int:
    """Width as ruff's E501 counts it: a trailing pragma comment (``# noqa``, ``# type: ignore``) is not
    counted, nor is a line that is a single word (a long URL)."""
    code, sep, comment = line.partition("  # ")
    if sep and comment.split(":")[0].strip() in ("noqa", "type", "pragma", "pyright", "fmt"):
        line = code
    return 0 if len(line.strip().split()) <= 1 else len(line)


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: module_name(p))
def test_module_size_function_size_and_line_length(path):
    text = path.read_text()
    lines = text.splitlines()
    assert len(lines) <= MAX_MODULE_LINES, f"{path.name}: {len(lines)} lines (at most {MAX_MODULE_LINES})"
    long_fns = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(ast.parse(text))
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long_fns, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {long_fns}"
    wide = [i for i, line in enumerate(lines, 1) if _code_width(line) > MAX_LINE]
    assert not wide, f"{path.name}: lines over {MAX_LINE} columns: {wide}"

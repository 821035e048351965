"""``cmbfe reproduce``: run the numbered notebooks of the study for a profile with papermill.

Each notebook ``notebooks/NN_name.ipynb`` has a cell tagged ``parameters`` whose defaults are the
smoke profile (so nbval runs it quickly). For profile P the runner injects ``profile=P`` plus the
flat keys of ``params/P.yaml``'s ``notebooks: {NN_name: {...}}`` section, after checking every key
against the names assigned in the parameters cell (papermill itself only logs unknown ones).

Executed copies go to ``cfg.results_path() / "notebooks"`` (``results/notebooks/``, or
``results/<profile>/notebooks/`` for non-default profiles). A notebook whose source, parameters, profile
config and package code are unchanged since its last successful run on this machine (its data folder
exists) is skipped unless ``--force``; a fresh clone therefore regenerates everything.
A failure names the notebook and the cell and leaves earlier results in place.
``study.jobs`` > 1 runs executions side by side, each kernel with ``CMBFE_THREADS = cores / jobs``
(tiny CPU convolutions scale poorly with threads, so two one-thread trainings finish sooner than two
two-thread ones in a row): the configurations of a multi-configuration notebook (03_train), and the
notebooks of one stage of :data:`STAGES` (06-08 need only the data, not each other). Runs they share
are trained once (:func:`cmbfe.study.runs.ensure_run` locks).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cmbfe import config
from cmbfe.config import REPO_ROOT, Config, ConfigError
from cmbfe.runtime import device_description, package_versions, set_thread_env
from cmbfe.utils import atomic_write_json

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
STAGES: dict[str, str] = {"06_cross_validation": "secondary", "07_backbone_timing": "secondary",
                          "08_ablations": "secondary"}
"""Notebook -> stage, for notebooks that may run side by side (others are their own stage)."""


def notebooks() -> list[Path]:
    """The study's notebooks in run order (``NN_name.ipynb``)."""
    return sorted(p for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def parameter_names(nb_path: Path) -> set[str]:
    """Names assigned in the notebook's cell tagged ``parameters`` (parsed, not executed)."""
    nb = json.loads(Path(nb_path).read_text())
    for cell in nb.get("cells", []):
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            names: set[str] = set()
            for node in ast.parse(src).body:
                targets = node.targets if isinstance(node, ast.Assign) else (
                    [node.target] if isinstance(node, ast.AnnAssign) else [])
                for t in targets:
                    if isinstance(t, ast.Name):
                        names.add(t.id)
            return names
    raise ConfigError(f"{nb_path}: no cell tagged 'parameters'")


def notebook_parameters(cfg: Config, nb_path: Path) -> list[dict[str, Any]]:
    """Parameter sets to inject into ``nb_path`` for ``cfg`` (one execution each).

    ``notebooks.<name>`` in a profile is a mapping (one run) or a list of mappings (one run per
    configuration, e.g. 03_train). Keys the notebook's parameters cell lacks raise ConfigError.
    """
    value = cfg.notebooks.get(nb_path.stem, {})
    sets = value if isinstance(value, list) else [value]
    allowed = parameter_names(nb_path)
    out = []
    for extra in sets:
        params: dict[str, Any] = {"profile": cfg.profile, **extra}
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise ConfigError(
                f"params/{cfg.profile}.yaml: notebooks.{nb_path.stem} sets {unknown}, which "
                f"{nb_path.name}'s parameters cell does not define (it has {sorted(allowed)})")
        out.append(params)
    return out


def check_profile(cfg: Config) -> None:
    """Check every notebook named in ``cfg.notebooks`` exists and all its keys are parameters."""
    stems = {p.stem: p for p in notebooks()}
    for name in cfg.notebooks:
        if name not in stems:
            raise ConfigError(f"params/{cfg.profile}.yaml: notebooks.{name}: no notebook {name}.ipynb")
    for p in stems.values():
        notebook_parameters(cfg, p)


def _source_hash() -> str:
    """Hash of the package's code (every ``cmbfe/**/*.py``, with its path)."""
    h = hashlib.sha256()
    pkg = REPO_ROOT / "cmbfe"
    for p in sorted(pkg.rglob("*.py")):
        h.update(p.relative_to(pkg).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _stamp(cfg: Config, nb_path: Path, params: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(nb_path.read_bytes())
    h.update(json.dumps(params, sort_keys=True).encode())
    h.update(cfg.hash().encode())
    h.update(_source_hash().encode())
    return h.hexdigest()[:16]


def git_commit() -> str:
    """The repository's HEAD commit (``+dirty`` if tracked files other than the run's own outputs under
    ``results/``, ``figures/`` and ``models/`` differ from it), or ``unknown``."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)results", ":(exclude)figures", ":(exclude)models"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=False).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _execute(run: tuple[str, str, dict[str, Any], int]) -> dict[str, Any]:
    """Execute one notebook with papermill (in this process or a pool worker); never raises on a cell error.

    ``run`` = (notebook, output path, parameters, torch threads for the kernel or 0 to inherit).
    Returns ``{"seconds", "error"}`` with ``error`` naming the failing cell, or None.
    """
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    nb, out, params, threads = run
    if threads:  # inherited by the kernel this process starts: torch, OpenMP and BLAS pools all sized
        set_thread_env(threads)
    t0 = time.perf_counter()
    try:
        pm.execute_notebook(nb, out, parameters=params, cwd=str(REPO_ROOT), kernel_name="python3",
                            progress_bar=False, log_output=False)
    except PapermillExecutionError as e:
        return {"seconds": time.perf_counter() - t0,
                "error": f"cell {e.cell_index} (execution {e.exec_count}): {e.ename}: {e.evalue}"}
    return {"seconds": time.perf_counter() - t0, "error": None}


def stage_groups(jobs: list[tuple]) -> list[list[tuple]]:
    """Split ``jobs`` (tuples whose first item is the notebook path, in run order) into consecutive
    groups that may run side by side: executions of one notebook, or notebooks of one :data:`STAGES`
    stage. Order is kept; a group runs only after the previous one finished."""
    groups: list[list[tuple]] = []
    stage = None
    for job in jobs:
        s = STAGES.get(Path(job[0]).stem, Path(job[0]).stem)
        if groups and s == stage:
            groups[-1].append(job)
        else:
            groups.append([job])
        stage = s
    return groups


def _select(nbs: list[Path], only: list[str] | None) -> list[Path]:
    """The notebooks ``--only`` names (by name or number; all when None)."""
    if not only:
        return nbs
    names = {o.removesuffix(".ipynb") for o in only}
    missing = names - {p.stem for p in nbs} - {p.stem.split("_", 1)[0] for p in nbs}
    if missing:
        raise ConfigError(f"--only {sorted(missing)}: no such notebook")
    return [p for p in nbs if p.stem in names or p.stem.split("_", 1)[0] in names]


def _pending(cfg: Config, nbs: list[Path], out_dir: Path, stamps: dict[str, str],
             force: bool) -> list[tuple[Path, str, dict[str, Any], str]]:
    """``(notebook, execution name, parameters, stamp)`` of every execution to run: all with ``force``,
    else those whose stamp changed, whose executed copy is missing, or whose data is not on this machine."""
    pending = []
    local = (cfg.data_path() / "data_key.json").exists()  # a fresh clone has committed results, no data
    for nb in nbs:
        sets = notebook_parameters(cfg, nb)
        for i, params in enumerate(sets):
            name = nb.stem if len(sets) == 1 else f"{nb.stem}-{i + 1:02d}"
            stamp = _stamp(cfg, nb, params)
            if not force and local and stamps.get(name) == stamp and (out_dir / f"{name}.ipynb").exists():
                print(f"[cmbfe reproduce] {name}: unchanged, skipped (use --force to rerun)", flush=True)
                continue
            pending.append((nb, name, params, stamp))
    return pending


def _run_group(group: list[tuple], n_jobs: int, out_dir: Path) -> list[dict[str, Any]]:
    """Execute one stage group (side by side when ``n_jobs`` > 1, one thread share each; in a row otherwise,
    stopping at the first failure) into ``out_dir/.<name>.running.ipynb``; the results in order."""
    width = min(n_jobs, len(group))
    threads = max(1, (os.cpu_count() or 1) // width) if width > 1 else 0
    for nb, name, params, _ in group:
        print(f"[cmbfe reproduce] {name}: {'queued' if width > 1 else 'running'} with {params}", flush=True)
    if width > 1:
        what = ", ".join(dict.fromkeys(nb.stem for nb, *_ in group))
        print(f"[cmbfe reproduce] {len(group)} executions of {what}, {width} at a time, "
              f"{threads} thread(s) each", flush=True)
    runs = [(str(nb), str(out_dir / f".{name}.running.ipynb"), params, threads)
            for nb, name, params, _ in group]
    if width > 1:
        with ProcessPoolExecutor(max_workers=width, mp_context=mp.get_context("spawn")) as pool:
            return list(pool.map(_execute, runs))
    results: list[dict[str, Any]] = []
    for run in runs:
        results.append(_execute(run))
        if results[-1]["error"]:
            break
    return results


def _provenance(cfg: Config, overrides: tuple[str, ...], started: str, timings: dict[str, float],
                status: int) -> dict[str, Any]:
    """What ``results/.../provenance.json`` records about this reproduction."""
    return {
        "profile": cfg.profile, "params_hash": cfg.hash(), "params_file": f"params/{cfg.profile}.yaml",
        "overrides": list(overrides), "git_commit": git_commit(), "device": device_description(),
        "packages": package_versions(), "data_source": f"synthetic (cmbfe synth, seed {cfg.synth.seed}, "
        f"{cfg.synth.patients} patients, matrix {cfg.synth.matrix})", "started": started,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "notebook_seconds": timings, "status": "ok" if status == 0 else "failed",
        "reduced": cfg.study.reduced,
    }


def reproduce(profile: str, *, only: list[str] | None = None, force: bool = False,
              overrides: tuple[str, ...] = ()) -> int:
    """Run the study notebooks for ``profile``; return 0 on success, 1 on a notebook failure."""
    cfg = config.load(profile, list(overrides))
    check_profile(cfg)
    nbs = _select(notebooks(), only)
    out_dir = cfg.results_path() / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamps_path = out_dir / "stamps.json"
    stamps = json.loads(stamps_path.read_text()) if stamps_path.exists() else {}
    timings_path = out_dir / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    status = 0
    for group in stage_groups(_pending(cfg, nbs, out_dir, stamps, force)):
        results = _run_group(group, max(1, int(cfg.study.jobs)), out_dir)
        failed = False
        for (nb, name, params, stamp), r in zip(group, results):
            tmp = out_dir / f".{name}.running.ipynb"
            if r["error"]:
                print(f"[cmbfe reproduce] FAILED: {nb.name} ({name}), {r['error']}\n"
                      f"  executed copy with the traceback: {tmp}", file=sys.stderr)
                failed = True
                continue
            tmp.replace(out_dir / f"{name}.ipynb")
            timings[name] = round(r["seconds"], 1)
            stamps[name] = stamp
            atomic_write_json(stamps_path, stamps)
            atomic_write_json(timings_path, timings)
            print(f"[cmbfe reproduce] {name}: done in {r['seconds']:.0f} s", flush=True)
        if failed:
            status = 1
            break
    provenance = _provenance(cfg, overrides, started, timings, status)
    atomic_write_json(cfg.results_path() / "provenance.json", provenance)
    return status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cmbfe reproduce", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="default", choices=config.PROFILES)
    ap.add_argument("--only", action="append", help="notebook name or number (repeatable)")
    ap.add_argument("--force", action="store_true", help="rerun notebooks even if unchanged")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    a = ap.parse_args(argv)
    return reproduce(a.profile, only=a.only, force=a.force, overrides=tuple(a.set))

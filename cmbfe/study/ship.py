"""Choosing and shipping the model ``cmbfe detect`` uses: the study's glue around
:func:`cmbfe.detect.export.export_model`.

- :func:`ship_model`: the study's choice: the best seed of the largest size by validation AP, without FE
  unless an FE run is better; exported to ``models/`` for the committed profile (``runs/<profile>/model``
  otherwise, :func:`model_dir`). ``make reproduce`` runs it at the end of notebook 05.
  Its second stage (:func:`cmbfe.detect.stage2_fit.train_stage2`) is trained and installed there too
  (:func:`add_stage2`).
- :func:`ensure_model`: that exported model, shipped first when it is missing (notebook 09).
- :func:`export_run`: any run exported with its val/test splits evaluated here (cached predictions,
  :func:`cmbfe.study.runs.gt_and_detections`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cmbfe import config as C
from cmbfe import modelfolder
from cmbfe.detect.export import Split, export_model
from cmbfe.runtime import apply_thread_env
from cmbfe.study.runs import ensure_run, evaluate_run, grid_config, gt_and_detections, main_grid
from cmbfe.utils import json_safe


def model_dir(cfg: C.Config) -> Path:
    """Where :func:`ship_model` writes: ``models/`` for the committed profile, ``runs/<profile>/model``
    else."""
    return modelfolder.DEFAULT_DIR if cfg.profile == C.COMMITTED_PROFILE else cfg.runs_path() / "model"


def evaluated_split(run_dir: str | Path, pre: str | Path, split: str) -> Split:
    """The ``split`` of PRE folder ``pre`` and ``run_dir``'s (cached) detections on it."""
    _coco, gt, dets = gt_and_detections(run_dir, pre, split)
    return gt, dets


def export_run(run_dir: str | Path, out_dir: str | Path, *, pre: str | Path, **kwargs: Any) -> Path:
    """Export ``run_dir`` to ``out_dir`` (:func:`cmbfe.detect.export.export_model`: threshold on PRE's val
    split, metrics on its test split; ``kwargs`` go there: ``name``, ``selection``, ``target``, ``rule``,
    ``radius_mm``, ``bootstrap``, ``seed``)."""
    apply_thread_env()
    run, pre = Path(run_dir).resolve(), Path(pre).resolve()
    val, test = evaluated_split(run, pre, "val"), evaluated_split(run, pre, "test")
    return export_model(run, out_dir, val=val, test=test, pre=pre, **kwargs)


def ship_model(cfg: C.Config, pre: str | Path, out: str | Path | None = None, *,
               bootstrap: int | None = None) -> Path:
    """Choose the study's detector (largest size of ``study.sizes``, best seed by validation AP under the
    profile's ``eval.match``; an FE run only if it beats every plain one) and export it (:func:`export_run`)
    to ``out`` (default :func:`model_dir`)."""
    size = max(cfg.study.sizes)
    cands = []
    for g in main_grid(cfg):
        if g["size"] != size:
            continue
        run = ensure_run(grid_config(cfg, **g))
        ap = evaluate_run(cfg, run, pre, split="val", bootstrap=0)["metrics"]["ap_voc"]
        rel = run.relative_to(C.REPO_ROOT) if run.is_relative_to(C.REPO_ROOT) else run
        cands.append({"run": str(rel), "fe": g["fe"], "seed": g["seed"], "val_ap": json_safe(ap),
                      "path": run})
    key = [(c["val_ap"] if c["val_ap"] is not None else -1.0) for c in cands]
    plain = [i for i, c in enumerate(cands) if not c["fe"]]
    fe = [i for i, c in enumerate(cands) if c["fe"]]
    best = max(plain, key=lambda i: key[i]) if plain else max(fe, key=lambda i: key[i])
    if plain and fe and max(key[i] for i in fe) > key[best]:
        best = max(fe, key=lambda i: key[i])
    chosen = cands[best]
    text = (f"SSD-{size}{'-FE' if chosen['fe'] else ''} seed {chosen['seed']}: the best validation AP "
            f"({cfg.eval.match}) {chosen['val_ap']:.3f} of " + ", ".join(
                f"{'FE' if c['fe'] else 'SSD'} s{c['seed']} {c['val_ap']:.3f}" for c in cands)
            + ("; FE only if it wins" if fe else ""))
    sel = {"text": text, "candidates": [{k: v for k, v in c.items() if k != "path"} for c in cands],
           "by": f"val AP ({cfg.eval.match})"}
    folder = export_run(chosen["path"], out or model_dir(cfg), pre=pre, name=cfg.profile, selection=sel,
                        radius_mm=cfg.eval.radius_mm,
                        bootstrap=cfg.eval.bootstrap if bootstrap is None else bootstrap, seed=cfg.eval.seed)
    return add_stage2(cfg, folder, pre)


def add_stage2(cfg: C.Config, folder: str | Path, pre: str | Path) -> Path:
    """Train the second stage of the exported detector in ``folder`` on the profile's synthetic cohort
    (``cfg.raw_path()``, the split of ``pre``; seed ``train.seed``) and install it there with its model card
    section (:func:`cmbfe.detect.stage2_fit.install`). A cohort too small to train it on (no positive or
    no validation candidate) leaves the detector alone, with a printed note."""
    from cmbfe.detect.detector import load_detector
    from cmbfe.detect.stage2_fit import install, train_stage2

    det = load_detector(folder)
    try:
        state, meta = train_stage2(det, cfg.raw_path(), pre, seed=cfg.train.seed,
                                   cache=cfg.runs_path() / "stage2_cache")
    except ValueError as e:  # e.g. a tiny cohort without a candidate near a true CMB: the detector alone
        print(f"ship: no second stage for {folder} ({e}); cmbfe detect uses the detector alone")
        return Path(folder)
    install(folder, state, meta)
    return Path(folder)


def ensure_model(cfg: C.Config, pre: str | Path) -> Path:
    """The exported model of ``cfg``'s profile (:func:`model_dir`), exported by :func:`ship_model` if
    missing."""
    out = model_dir(cfg)
    try:
        meta = modelfolder.read_meta(out)
    except (OSError, ValueError):
        meta = {}
    if (out / modelfolder.WEIGHTS).is_file() and meta.get("profile") == cfg.profile:
        return out
    return ship_model(cfg, pre, out)

"""The study's runs: cached data, cached training runs and predictions, a run evaluated on a split, result and
figure paths (the notebook API, re-exported by :mod:`cmbfe.study`).

Everything is keyed by configuration hashes, so a notebook re-executed with the same profile reuses
the cohort, the preprocessed slices and the trained runs instead of recomputing them, and two
notebooks that need the same run (05 and 04, say) share it.

Where things go (the path methods of :class:`cmbfe.config.Config`, from the repository root):
- data: ``cfg.raw_path()`` (DICOM cohort), ``cfg.pre_path()`` (slices + COCO, :class:`cmbfe.datadir.DataDir`);
  the hold-out cohort under ``cfg.holdout_path()`` (:func:`ensure_holdout`, PRE split ``holdout``);
- runs: ``cfg.runs_path() / "<tag>-<confighash>"``;
- tables: ``cfg.results_path()`` (``results/`` for the ``default`` profile, committed; ``results/<profile>/``
  otherwise);
- figures: ``cfg.figures_path()`` (``figures/`` for ``default``, ``figures/<profile>/`` otherwise).

Overrides are ``{"section.key": value}`` mappings (``--set`` syntax), e.g. ``{"fe.enabled": True}``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from cmbfe import evaluate as E
from cmbfe import metrics as M
from cmbfe import stats
from cmbfe.config import REPO_ROOT, Config, load, with_overrides
from cmbfe.datadir import DataDir
from cmbfe.holdout import HOLDOUT_SPLIT, holdout_pre, make_holdout
from cmbfe.modelfolder import load_model
from cmbfe.predict import predict
from cmbfe.preprocess import preprocess_cohort
from cmbfe.study.tables import write_table
from cmbfe.synth import synthesize_cohort
from cmbfe.train import fit
from cmbfe.utils import atomic_write_json, atomic_write_text
from cmbfe.viz import save_figure as _save_figure

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: the lock is a no-op
    fcntl = None  # type: ignore[assignment]


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def data_key(cfg: Config) -> str:
    """Hash of what determines the preprocessed data: the synth and preprocess sections."""
    d = cfg.to_dict()
    synth = {k: v for k, v in d["synth"].items() if k != "workers"}
    pre = {k: v for k, v in d["preprocess"].items() if k != "workers"}
    return _hash({"synth": synth, "preprocess": pre})


def ensure_data(cfg: Config, *, force: bool = False, progress: bool = True) -> Path:
    """Synthesise and preprocess the cohort for ``cfg`` unless a matching copy exists; return PRE."""
    raw, pre = cfg.raw_path(), cfg.pre_path()
    stamp = cfg.data_path() / "data_key.json"
    key = data_key(cfg)
    if not force and stamp.exists() and json.loads(stamp.read_text()).get("key") == key and \
            DataDir(pre).has_split("test"):
        return pre
    synthesize_cohort(raw, cfg.synth, progress=progress, overwrite=True)
    preprocess_cohort(raw, pre, cfg, overwrite=True)
    atomic_write_json(stamp, {"key": key, "profile": cfg.profile})
    return pre


def holdout_key(cfg: Config) -> str:
    """Hash of what determines the hold-out cohort: the synth section but its seed and size, the holdout
    section (which gives them) and the preprocess section."""
    d = cfg.to_dict()
    synth = {k: v for k, v in d["synth"].items() if k not in ("workers", "seed", "patients")}
    pre = {k: v for k, v in d["preprocess"].items() if k != "workers"}
    return _hash({"synth": synth, "holdout": d["holdout"], "preprocess": pre})


def ensure_holdout(cfg: Config, *, force: bool = False, progress: bool = True) -> Path | None:
    """Synthesise and preprocess the hold-out cohort of ``cfg`` (:func:`cmbfe.holdout.make_holdout`) unless
    a matching copy exists; return its PRE folder (split ``holdout``); None when ``holdout.patients`` is 0."""
    if cfg.holdout.patients < 1:
        return None
    pre, stamp = holdout_pre(cfg), cfg.holdout_path() / "holdout_key.json"
    key = holdout_key(cfg)
    if not force and stamp.exists() and json.loads(stamp.read_text()).get("key") == key and \
            DataDir(pre).has_split(HOLDOUT_SPLIT):
        return pre
    make_holdout(cfg, progress=progress, overwrite=True)
    atomic_write_json(stamp, {"key": key, "profile": cfg.profile})
    return pre


# Keys added to a section after runs were cached under run_key: at these values they train exactly what the
# code did before they existed, so they are left out of the key and a cached run keeps its folder.
KEY_NEUTRAL: dict[str, dict[str, Any]] = {
    "train": {"schedule": "step", "warmup": 0, "grad_clip": 0.0, "ema": 0.0, "cosine_end": 1.0,
              "lr_min": 0.0, "channels_last_cpu": False, "val_subset": 0},
    "model": {"max_box_mm": 0.0, "heads": 0},
    "fe": {"sham": False, "mask_loss_weight": 0.0}}
# train keys that never change the weights
_TRAIN_FREE = ("workers", "log_every", "checkpoint_every", "device", "tensorboard")


def run_key(cfg: Config) -> str:
    """Hash of what determines a trained model (data + model + fe + augment + train sections)."""
    d = cfg.to_dict()
    for sec, neutral in KEY_NEUTRAL.items():
        d[sec] = {k: v for k, v in d[sec].items() if not (k in neutral and v == neutral[k])}
    train = {k: v for k, v in d["train"].items() if k not in _TRAIN_FREE}
    return _hash({"data": data_key(cfg), "model": d["model"], "fe": d["fe"], "augment": d["augment"],
                  "train": train, "eval": d["eval"]["match"]})


def run_tag(cfg: Config) -> str:
    """Readable run name, e.g. ``vgg16-256-cmb-gray3-fe-s0``."""
    m, fe = cfg.model, cfg.fe
    fe_tag = "nofe"
    if fe.enabled:
        fe_tag = f"{fe.variant}-{fe.placement}-{fe.schedule}"
        fe_tag += "-sham" if fe.sham else ""
    fe_tag += "-mask" if fe.mask_loss_weight > 0 else ""
    heads = f"-h{m.heads}" if m.heads else ""
    return f"{m.backbone}-{m.size}-{m.priors}{heads}-{m.input.replace('.', '')}-{fe_tag}-s{cfg.train.seed}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing; POSIX ``flock``, no-op elsewhere), so
    that notebooks run side by side by ``cmbfe reproduce`` never train or predict the same run twice
    at once: the second waits and then finds the first one's result."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_run(cfg: Config, *, data: str | Path | None = None, progress: bool = True) -> Path:
    """Train ``cfg`` (on PRE ``data``, default the profile's) unless a finished run with the same key
    exists; resume a killed one. Returns RUN. Safe to call from concurrent processes (a lock file
    ``runs/<profile>/.<run>.lock`` serialises the check and the training)."""
    key = run_key(cfg)
    if data is not None:
        rel = Path(data).resolve()
        rel = rel.relative_to(REPO_ROOT) if rel.is_relative_to(REPO_ROOT) else rel
        key = _hash({"run": key, "data": str(rel)})
    run_dir = cfg.runs_path() / f"{run_tag(cfg)}-{key}"
    if (run_dir / "model.pt").exists():
        return run_dir
    with _locked(run_dir.parent / f".{run_dir.name}.lock"):
        if not (run_dir / "model.pt").exists():
            fit(cfg, run_dir, resume=(run_dir / "checkpoint.pt").exists(), progress=progress,
                data=Path(data) if data else None)
    return run_dir


def _split_stamp(pre: Path, split: str) -> str:
    """Hash of a split file: which slices (and boxes) cached detections were predicted on ("" without one)."""
    path = DataDir(pre).split_path(split)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else ""


def ensure_predictions(run_dir: Path, pre: Path, split: str = "test") -> list[dict]:
    """COCO-results detections of ``run_dir``'s model on the ``split`` of PRE folder ``pre`` (cached in the
    run folder as ``dets_<split>.json``; concurrent callers wait for one another). The cache records the
    split file it was predicted on (``dets_<split>.stamp``) and is predicted again when that file changed
    (the hold-out cohort is rebuilt without retraining); a cache without a stamp is reused."""
    path, stamp = Path(run_dir) / f"dets_{split}.json", Path(run_dir) / f"dets_{split}.stamp"

    def fresh() -> bool:
        return path.exists() and (not stamp.exists() or stamp.read_text() == _split_stamp(pre, split))

    if not fresh():
        with _locked(Path(run_dir) / f".dets_{split}.lock"):
            if not fresh():
                model = load_model(run_dir)
                cfg = load(Path(run_dir) / "config.yaml")
                dets = predict(model, pre, split, input=cfg.model.input, batch_size=8)
                atomic_write_json(path, dets, indent=None)
                atomic_write_text(stamp, _split_stamp(pre, split))
    return json.loads(path.read_text())


def gt_and_detections(run_dir: str | Path, pre: str | Path, split: str = "test") -> tuple[
        dict[str, Any], M.GroundTruth, M.Detections]:
    """The ``split`` of PRE folder ``pre`` with ``run_dir``'s detections on it (:func:`ensure_predictions`):
    ``(coco, gt, dets)``, the COCO dict read by :meth:`cmbfe.datadir.DataDir.coco` and both checked by
    :mod:`cmbfe.evaluate` (an error names the file)."""
    d = DataDir(pre)
    coco = d.coco(split)
    gt = E.gt_from_coco(coco, str(d.split_path(split)))
    raw = ensure_predictions(Path(run_dir), d.root, split)
    dets = E.dets_from_coco(raw, gt, f"{run_dir}/dets_{split}.json")
    return coco, gt, dets


def evaluate_run(cfg: Config, run_dir: str | Path, pre: str | Path, *, split: str = "test",
                 bootstrap: int | None = None) -> dict[str, Any]:
    """Evaluate ``run_dir``'s model on the ``split`` of PRE folder ``pre`` under ``cfg.eval`` (matching rule,
    IoU, radius; mimic attribution where ``slice_objects.csv`` exists; ``bootstrap`` patient resamples,
    default ``eval.bootstrap``): the one evaluation of a run, used by the tables, the experiments and
    shipping.

    Returns the :func:`cmbfe.evaluate.evaluate` dict (``metrics`` with bootstrap CIs, ``curve``,
    ``matching``) plus ``boot`` (:class:`cmbfe.stats.BootData`), ``gt``, ``dets``, ``coco`` (the split's
    COCO dict) and ``run`` (the run folder).
    """
    d = DataDir(pre)
    coco, gt, dets = gt_and_detections(run_dir, d.root, split)
    objects = E.load_slice_objects(d.slice_objects, gt) if d.slice_objects.exists() else None
    n_boot = cfg.eval.bootstrap if bootstrap is None else bootstrap
    res = E.evaluate(gt, dets, match=cfg.eval.match, iou=cfg.eval.iou, radius_mm=cfg.eval.radius_mm,
                     objects=objects, bootstrap=n_boot, seed=cfg.eval.seed, ci=cfg.eval.ci)
    res["boot"] = stats.prepare(gt, dets, res["matching"])
    res.update(gt=gt, dets=dets, coco=coco, run=Path(run_dir))
    return res


def save_figure(fig: Any, cfg: Config, name: str) -> list[Path]:
    """Save a matplotlib figure as PNG and PDF under the profile's figures folder (see viz.save_figure)."""
    return _save_figure(fig, cfg.figures_path() / name)


def save_table(df: pd.DataFrame, cfg: Config, stem: str, caption: str = "") -> Path:
    """Write a table as ``<stem>.csv`` and ``<stem>.md`` in the profile's results folder."""
    return write_table(df, stem, cfg.results_path(), caption=caption)


def main_grid(cfg: Config) -> list[dict[str, Any]]:
    """The paper's main comparison: every size in ``study.sizes`` x FE off/on x every seed.

    Each entry is the flat parameter set of notebook 03_train (``size``, ``fe``, ``seed``).
    """
    return [{"size": size, "fe": fe, "seed": seed}
            for size in cfg.study.sizes for fe in (False, True) for seed in cfg.study.seeds]


def grid_config(cfg: Config, *, size: int | None = None, fe: bool | None = None,
                seed: int | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """``cfg`` with the 03_train parameters and ``overrides`` (``{"section.key": value}``) applied (None
    keeps the profile's value)."""
    over: dict[str, Any] = dict(overrides or {})
    if size is not None:
        over["model.size"] = size
    if fe is not None:
        over["fe.enabled"] = fe
    if seed is not None:
        over["train.seed"] = seed
    return with_overrides(cfg, over) if over else cfg

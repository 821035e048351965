"""The shipped model of ``cmbfe detect``: choosing it, its operating threshold, its card, and checking it
against a synthetic patient's ground truth.

- :func:`lesion_threshold`: the highest score threshold at which >= ``target`` of the 3D CMBs of a split
  are found (**lesion level**: a CMB is found when any of its slice boxes is matched by a detection at or
  above the threshold; matching rule ``centre`` <= 2.5 mm by default, as VALDO; slice-level greedy matching
  of :func:`cmbfe.metrics.match`).
- :func:`export_model`: a run folder -> ``models/`` (``model.pt``, ``config.yaml``, ``detect.json`` with the
  threshold chosen on the validation split and the test-split metrics with patient-bootstrap CIs, and the
  model card ``README.md``).
- :func:`ship_model`: the study's choice: the best seed of the largest size by validation AP, without FE
  unless an FE run is better; exported to ``models/`` for the ``default`` profile (``runs/<profile>/model``
  otherwise). ``make reproduce`` runs it at the end of notebook 05.
- :func:`compare_with_truth`: a ``cmbs.csv`` against a synthetic patient's ``lesions.csv``/``mimics.csv``
  (hits, misses, false positives by the mimic they fall on).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cmbfe import config as C
from cmbfe import metrics as M
from cmbfe.errors import InputError
from cmbfe.utils import atomic_path, atomic_write_json, atomic_write_text

FORMAT = "cmbfe-detector/1"


# ------------------------------------------------------------------------------------ lesion-level numbers
def _lesion_patient(gt: M.GroundTruth) -> np.ndarray:
    out = np.zeros(gt.n_lesions, np.int64)
    out[gt.box_lesion] = gt.image_patient[gt.box_image]
    return out


def per_patient(gt: M.GroundTruth, dets: M.Detections, m: M.Matching, thr: float) -> dict[str, np.ndarray]:
    """Per patient: 3D CMBs, CMBs found, false-positive 3D detections (linked as in
    :func:`cmbfe.metrics.lesion_metrics`) using detections with score >= ``thr``."""
    keep = dets.scores >= thr
    labels, n3d = M.link_detections(gt, dets, keep)
    tp = m.tp & keep
    hit = np.zeros(gt.n_lesions, bool)
    hit[gt.box_lesion[m.gt_of_det[tp]]] = True
    group_tp = np.zeros(n3d, bool)
    group_tp[labels[tp]] = True
    group_patient = np.zeros(n3d, np.int64)
    kept = np.flatnonzero(keep)
    group_patient[labels[kept]] = gt.image_patient[dets.image[kept]]
    lp = _lesion_patient(gt)
    p = gt.n_patients
    return {"lesions": np.bincount(lp, minlength=p), "found": np.bincount(lp[hit], minlength=p),
            "fp": np.bincount(group_patient[~group_tp], minlength=p)}


def _with_ci(pp: dict[str, np.ndarray], n_boot: int, seed: int, ci: float) -> dict[str, Any]:
    """Lesion sensitivity and FP 3D detections per scan, with percentile CIs over resampled patients."""
    def stats(idx: np.ndarray) -> tuple[float, float]:
        n = pp["lesions"][idx].sum()
        return (pp["found"][idx].sum() / n if n else float("nan")), pp["fp"][idx].sum() / max(len(idx), 1)

    p = len(pp["lesions"])
    est = stats(np.arange(p))
    rng = np.random.default_rng(seed)
    draws = np.array([stats(rng.integers(0, p, p)) for _ in range(n_boot)]) if n_boot and p else np.zeros((0, 2))
    out = {}
    for j, key in enumerate(("lesion_sensitivity", "fp_per_scan")):
        v = draws[:, j][np.isfinite(draws[:, j])] if len(draws) else np.zeros(0)
        lo, hi = (np.percentile(v, [50 * (1 - ci), 50 * (1 + ci)]) if len(v) else (np.nan, np.nan))
        out[key] = {"estimate": float(est[j]), "lo": float(lo), "hi": float(hi)}
    out |= {"n_patients": p, "n_cmbs": int(pp["lesions"].sum()), "found": int(pp["found"].sum()),
            "fp": int(pp["fp"].sum()), "bootstrap": n_boot, "ci": ci}
    return out


def lesion_threshold(gt: M.GroundTruth, dets: M.Detections, *, target: float = 0.9, rule: str = "centre",
                     radius_mm: float = 2.5, iou: float = 0.5) -> dict[str, Any]:
    """The highest threshold at which >= ``target`` of the 3D CMBs are found (see module docstring).

    When no threshold reaches the target, the lowest one that finds the most CMBs (``reached`` False).
    Returns ``threshold, reached, sensitivity, fp_per_scan`` (3D false positives on the split's slices),
    the rule and a sentence for the card.
    """
    m = M.match(gt, dets, rule=rule, iou=iou, radius_mm=radius_mm)
    best = np.full(gt.n_lesions, -np.inf)
    tp = np.flatnonzero(m.tp)
    np.maximum.at(best, gt.box_lesion[m.gt_of_det[tp]], dets.scores[tp])
    found = np.sort(best[np.isfinite(best)])[::-1]
    need = max(1, math.ceil(target * gt.n_lesions - 1e-9))
    reached = len(found) >= need and gt.n_lesions > 0
    if reached:
        thr = float(found[need - 1])
    elif len(found):
        thr = float(found[-1])
    else:  # nothing found at any threshold: the top score (the fewest false positives)
        thr = float(dets.scores.max()) if len(dets.scores) else 0.5
    pp = per_patient(gt, dets, m, thr)
    sens = float(pp["found"].sum() / max(pp["lesions"].sum(), 1))
    fps = float(pp["fp"].sum() / max(gt.n_patients, 1))
    how = (f"centre distance <= {radius_mm:g} mm" if rule == "centre" else f"IoU >= {iou:g}")
    text = (f"highest score threshold at which >= {target:.0%} of the validation split's 3D CMBs are found "
            f"(lesion level; a CMB is found when a detection matches one of its slice boxes, {how}): "
            f"sensitivity {sens:.3f}, {fps:.2f} false-positive 3D detections per scan on the split's slices")
    if not reached:
        text = (f"{target:.0%} lesion sensitivity is NOT reached on the validation split (at most {sens:.3f}); "
                + ("the lowest threshold finding that many is used" if len(found) else
                   "no CMB is found at any threshold, the top score is used")
                + f" ({fps:.2f} FP 3D detections per scan)")
    return {"threshold": round(thr, 6), "reached": bool(reached), "target_sensitivity": target,
            "sensitivity": sens, "fp_per_scan": fps, "level": "lesion (3D)", "rule": rule,
            "radius_mm": radius_mm if rule == "centre" else None, "iou": iou if rule == "iou" else None,
            "split": "val", "n_cmbs": int(gt.n_lesions), "n_patients": int(gt.n_patients), "text": text}


# ------------------------------------------------------------------------------------ export
def _split_eval(run_dir: Path, pre: Path, split: str) -> tuple[M.GroundTruth, M.Detections]:
    from cmbfe import evaluate as E
    from cmbfe import study

    path = Path(pre) / "annotations" / f"{split}.json"
    if not path.is_file():
        raise InputError(f"{path}: not found (export_model needs the run's PRE folder with val and test)")
    gt = E.gt_from_coco(json.loads(path.read_text()), str(path))
    return gt, E.dets_from_coco(study.ensure_predictions(Path(run_dir), Path(pre), split), gt, f"{run_dir}/dets")


def _fmt(d: dict[str, Any] | None, fmt: str = "{:.3f}") -> str:
    if not d or d.get("estimate") is None or not np.isfinite(d["estimate"]):
        return "n/a"
    if d.get("lo") is None or not np.isfinite(d["lo"]):
        return fmt.format(d["estimate"])
    return f"{fmt.format(d['estimate'])} [{fmt.format(d['lo'])}, {fmt.format(d['hi'])}]"


CARD = """# cmbfe shipped CMB detector: `{name}`

> **Research use only: trained on synthetic data, not validated on real patients.** Trained and tested on
> cmbfe's simulated SWI cohort only; not a medical device. Use `cmbfe detect` to study the method, never for care.

Written by `make reproduce` (`cmbfe.detect_model.export_model`, {created}); `cmbfe detect` reads this folder
(`model.pt` weights, `config.yaml` the training configuration, `detect.json` threshold and metrics).

## Model
- {architecture}; {params:,} parameters, `model.pt` {mb:.1f} MB (sha256 `{sha}`).
- Source run: `{source_run}` ({selection}).
- Feature enhancement in training: {fe}. At test time the network is the plain SSD.

## Training data
- Synthetic cohort (`cmbfe synth`, profile `{profile}`): {patients} patients (seed {synth_seed}),
  {matrix} x {matrix} px over {fov:g} mm ({px:.3g} mm pixels), {slice_mm:g} mm slices, {field:g} T, TE {te:g} ms,
  CMBs: mean {cmb_mean:g} per CMB-bearing patient ({p_no_cmb:.0%} CMB-free), true radius {r0:g}-{r1:g} mm, dchi
  {c0:g}-{c1:g} ppm, {p_lobar:.0%} lobar; mimics: ~{veins} veins, calcifications, deep-nuclei iron, air; SNR {s0:g}-{s1:g}.
- Split by patient: {splits}. Training: {iterations} iterations x batch {batch}, Adam lr {lr:g}, seed {seed},
  augmentation {augment}.

## Operating threshold: {threshold:.4g}
- Chosen on the validation split: {threshold_text}.
- `cmbfe detect --threshold T` overrides it.

## Metrics on the synthetic test split ({test_patients} patients, {test_cmbs} 3D CMBs)
95 % percentile bootstrap over test patients ({boot} resamples). False positives are counted on the split's
slices (every CMB slice plus as many mimic-only slices), not whole scans; `cmbfe detect` searches every
head slice, so expect more per scan (notebook `09_detect` counts them on a held-out patient).

| metric | value |
|---|---|
| lesion sensitivity at the threshold | {sens} |
| false-positive 3D detections per scan at the threshold | {fps} |
| slice AP, IoU >= 0.5 (VOC all-point; the paper's metric) | {ap_iou} |
| slice AP, centre distance <= {radius:g} mm | {ap_centre} |

## Input expectations
- One 3D SWI or T2*-weighted GRE **magnitude** volume per patient (DICOM series or NIfTI), CMBs dark.
  Other orientations are reoriented to axial slices (axis permutation only, no interpolation).
- In-plane pixels are resampled to the training pixel ({px:.3g} mm) when they differ by > 2 %; slices are used
  as acquired (training: {slice_mm:g} mm). Whole head, not skull-stripped (as in training).
- Preprocessing as in training: head mask, N4 ({n4_iter}, shrink {n4_shrink}), intensities clipped at the
  {clip} percentiles inside the head mask, 8 bit.

## Limitations
- Synthetic training data: real scanners, sequences, artefacts and pathology differ; expect lower sensitivity
  and more false positives on real scans. Mimics (veins, calcifications, iron, air) cause most false positives.
- Sizes are box extents of the detector (blooming included), not haemosiderin volumes.
"""


def _card(meta: dict[str, Any], cfg: C.Config) -> str:
    s, t = cfg.synth, cfg.train
    tm, rule = meta["test_metrics"], meta["threshold_rule"]
    td = meta["training_data"]
    aug = cfg.augment
    return CARD.format(
        name=meta["name"], created=meta["created"][:10], architecture=meta["architecture"], params=meta["parameters"],
        mb=meta["weights_bytes"] / 1e6, sha=meta["weights_sha256"][:16], source_run=meta["source_run"],
        selection=meta["selection"]["text"], fe="yes (SSD-FE)" if cfg.fe.enabled else "no", profile=meta["profile"],
        patients=s.patients, synth_seed=s.seed, matrix=td["matrix"], fov=s.fov_mm, px=td["pixel_spacing_mm"][1],
        slice_mm=td["slice_mm"], field=s.field_t, te=s.te_ms, cmb_mean=s.cmb_mean, p_no_cmb=s.p_no_cmb,
        r0=s.cmb_radius_mm[0], r1=s.cmb_radius_mm[1], c0=s.cmb_dchi_ppm[0], c1=s.cmb_dchi_ppm[1],
        p_lobar=s.p_lobar, veins=s.veins, s0=s.snr[0], s1=s.snr[1],
        splits=" / ".join(f"{k} {v}" for k, v in td["splits"].items()) + " patients" if td["splits"] else "see PRE", iterations=t.iterations,
        batch=t.batch_size, lr=t.lr, seed=t.seed, augment="on (flips, intensity, blur, affine)" if aug.enabled
        else "off", threshold=meta["threshold"], threshold_text=rule["text"], test_patients=tm["n_patients"],
        test_cmbs=tm["n_cmbs"], boot=tm["bootstrap"], sens=_fmt(tm["lesion_sensitivity"]),
        fps=_fmt(tm["fp_per_scan"], "{:.2f}"), ap_iou=_fmt(tm["ap_iou"]), ap_centre=_fmt(tm["ap_centre"]),
        radius=rule.get("radius_mm") or 2.5, n4_iter=list(cfg.preprocess.n4_iterations),
        n4_shrink=cfg.preprocess.n4_shrink, clip=list(cfg.preprocess.clip_percentiles))


def export_model(run_dir: str | Path, out_dir: str | Path, *, pre: str | Path, name: str = "default",
                 selection: dict[str, Any] | None = None, target: float = 0.9, rule: str = "centre",
                 radius_mm: float = 2.5, bootstrap: int = 1000, seed: int = 0) -> Path:
    """Export ``run_dir`` (``config.yaml`` + ``model.pt``) to ``out_dir`` with its threshold (chosen on
    ``PRE``'s val split by :func:`lesion_threshold`), test metrics and card; ``out_dir`` is replaced atomically.
    """
    from cmbfe import evaluate as E
    from cmbfe.detect import load_detector
    from cmbfe.runtime import apply_thread_env

    apply_thread_env()
    run, pre = Path(run_dir).resolve(), Path(pre).resolve()
    det = load_detector(run, threshold=0.5)  # checks that the weights load and match
    cfg = det.cfg
    gt_val, d_val = _split_eval(run, pre, "val")
    rule_info = lesion_threshold(gt_val, d_val, target=target, rule=rule, radius_mm=radius_mm, iou=cfg.eval.iou)
    thr = rule_info["threshold"]
    gt, dets = _split_eval(run, pre, "test")
    m = M.match(gt, dets, rule=rule, iou=cfg.eval.iou, radius_mm=radius_mm)
    tm = _with_ci(per_patient(gt, dets, m, thr), bootstrap, seed, cfg.eval.ci)
    for key, how in (("ap_iou", "iou"), ("ap_centre", "centre")):
        r = E.evaluate(gt, dets, match=how, iou=cfg.eval.iou, radius_mm=radius_mm, bootstrap=bootstrap,
                       seed=seed, ci=cfg.eval.ci)["metrics"]
        b = r["bootstrap"]["ap_voc"]
        tm[key] = {"estimate": r["ap_voc"], "lo": b["lo"], "hi": b["hi"]}
    im = json.loads((pre / "annotations" / "train.json").read_text())["images"][0]
    try:
        splits = json.loads((pre / "preprocess.json").read_text())["summary"]["splits"]
    except (OSError, ValueError, KeyError):
        splits = {}
    weights = (run / "model.pt").read_bytes()
    rel = run.relative_to(C.REPO_ROOT) if run.is_relative_to(C.REPO_ROOT) else run
    mcfg = cfg.model
    meta: dict[str, Any] = {
        "format": FORMAT, "name": name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "profile": cfg.profile, "source_run": str(rel), "config_hash": cfg.hash(),
        "architecture": f"SSD-{mcfg.size} on {mcfg.backbone}{'-BN' if mcfg.batch_norm else ''} at "
                        f"{mcfg.width:g} channel width, {mcfg.priors} priors, input {mcfg.input}",
        "parameters": int(sum(p.numel() for p in det.model.parameters())),
        "weights_sha256": hashlib.sha256(weights).hexdigest(), "weights_bytes": len(weights),
        "selection": selection or {"text": "exported directly"},
        "threshold": thr, "threshold_rule": rule_info, "test_metrics": tm,
        "training_data": {"source": "synthetic (cmbfe synth)", "pixel_spacing_mm": im["pixel_spacing_mm"],
                          "matrix": int(max(im["width"], im["height"])), "slice_mm": im.get("slice_mm"),
                          "splits": splits, "synth": cfg.to_dict()["synth"]},
    }
    meta["card_summary"] = [
        (f"trained on synthetic SWI ({cfg.synth.patients} patients, {meta['training_data']['matrix']} px at "
        f"{im['pixel_spacing_mm'][1]:.3g} mm); not validated on real patients"),
        (f"synthetic test split: lesion sensitivity {_fmt(tm['lesion_sensitivity'])}, "
        f"{_fmt(tm['fp_per_scan'], '{:.2f}')} FP 3D detections/scan at the threshold; slice AP (IoU 0.5) "
        f"{_fmt(tm['ap_iou'])}")]
    out = Path(out_dir)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        shutil.copyfile(run / "model.pt", tmp / "model.pt")
        shutil.copyfile(run / "config.yaml", tmp / "config.yaml")
        atomic_write_json(tmp / "detect.json", _clean(meta))
        atomic_write_text(tmp / "README.md", _card(meta, cfg))
    return out


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


# ------------------------------------------------------------------------------------ the study's choice
def model_dir(cfg: C.Config) -> Path:
    """Where :func:`ship_model` writes: ``models/`` for the committed profile, ``runs/<profile>/model`` else."""
    return C.REPO_ROOT / "models" if cfg.profile == C.COMMITTED_PROFILE else cfg.runs_path() / "model"


def ship_model(cfg: C.Config, pre: str | Path, out: str | Path | None = None, *, bootstrap: int | None = None) -> Path:
    """Choose the study's detector (largest size of ``study.sizes``, best seed by validation AP under the
    profile's ``eval.match``; an FE run only if it beats every plain one) and export it (see module docstring)."""
    from cmbfe import evaluate as E
    from cmbfe import study

    size = max(cfg.study.sizes)
    cands = []
    for g in study.main_grid(cfg):
        if g["size"] != size:
            continue
        c = study.grid_config(cfg, **g)
        run = study.ensure_run(c)
        gt, dets = _split_eval(run, pre, "val")
        ap = E.evaluate(gt, dets, match=cfg.eval.match, iou=cfg.eval.iou, radius_mm=cfg.eval.radius_mm)["metrics"]
        cands.append({"run": str(run.relative_to(C.REPO_ROOT)) if run.is_relative_to(C.REPO_ROOT) else str(run),
                      "fe": g["fe"], "seed": g["seed"], "val_ap": _clean(ap["ap_voc"]), "path": run})
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
    return export_model(chosen["path"], out or model_dir(cfg), pre=pre, name=cfg.profile, selection=sel,
                        radius_mm=cfg.eval.radius_mm,
                        bootstrap=cfg.eval.bootstrap if bootstrap is None else bootstrap, seed=cfg.eval.seed)


def ensure_model(cfg: C.Config, pre: str | Path) -> Path:
    """The exported model of ``cfg``'s profile (:func:`model_dir`), exported by :func:`ship_model` if missing."""
    out = model_dir(cfg)
    try:
        meta = json.loads((out / "detect.json").read_text())
        if (out / "model.pt").is_file() and meta.get("profile") == cfg.profile:
            return out
    except (OSError, ValueError):
        pass
    return ship_model(cfg, pre, out)


# ------------------------------------------------------------------------------------ ground truth
def compare_with_truth(cmbs: pd.DataFrame, lesions: pd.DataFrame, mimics: pd.DataFrame | None = None, *,
                       min_radius_mm: float = 3.0) -> dict[str, Any]:
    """A detected lesion list (``cmbs.csv``) against a synthetic patient's truth (``lesions.csv``,
    ``mimics.csv``; LPS ``x_mm, y_mm, z_mm``).

    A true CMB is hit by the nearest unmatched detected centre within ``max(min_radius_mm, diameter / 2)``
    (3D distance, greedy by distance). An unmatched detection is a false positive, attributed to the nearest
    mimic whose centre is within ``max(min_radius_mm, its diameter / 2 + 1 mm)`` (else ``other``).
    Returns ``truth`` (lesions with ``hit``, ``lesion_id_detected``, ``distance_mm``), ``detections`` (with
    ``tp``, ``truth_id``, ``mimic``) and ``counts``.
    """
    det_xyz = cmbs[["x_lps_mm", "y_lps_mm", "z_lps_mm"]].to_numpy(float).reshape(-1, 3)
    gt_xyz = lesions[["x_mm", "y_mm", "z_mm"]].to_numpy(float).reshape(-1, 3)
    radius = np.maximum(min_radius_mm, lesions["diameter_mm"].to_numpy(float) / 2) if len(lesions) else np.zeros(0)
    dist = np.linalg.norm(gt_xyz[:, None] - det_xyz[None], axis=2) if len(gt_xyz) and len(det_xyz) else \
        np.zeros((len(gt_xyz), len(det_xyz)))
    pairs = sorted((dist[g, d], g, d) for g, d in zip(*np.nonzero(dist <= radius[:, None])))
    g_of, d_of, gdist = {}, {}, {}
    for dd, g, d in pairs:
        if g in g_of or d in d_of:
            continue
        g_of[g], d_of[d], gdist[g] = d, g, dd
    truth = lesions.copy()
    truth["hit"] = np.array([g in g_of for g in range(len(lesions))], dtype=bool)
    truth["lesion_id_detected"] = [int(cmbs["lesion_id"].iloc[g_of[g]]) if g in g_of else 0 for g in range(len(lesions))]
    truth["distance_mm"] = [round(float(gdist[g]), 2) if g in g_of else np.nan for g in range(len(lesions))]
    out = cmbs.copy()
    out["tp"] = np.array([d in d_of for d in range(len(cmbs))], dtype=bool)
    out["truth_id"] = [int(lesions["lesion_id"].iloc[d_of[d]]) if d in d_of else 0 for d in range(len(cmbs))]
    kinds = []
    mim_xyz = mimics[["x_mm", "y_mm", "z_mm"]].to_numpy(float) if mimics is not None and len(mimics) else np.zeros((0, 3))
    for d in range(len(cmbs)):
        if d in d_of:
            kinds.append("")
            continue
        if len(mim_xyz):
            md = np.linalg.norm(mim_xyz - det_xyz[d], axis=1)
            ok = md <= np.maximum(min_radius_mm, mimics["diameter_mm"].to_numpy(float) / 2 + 1.0)
            kinds.append(str(mimics["kind"].iloc[int(np.argmin(np.where(ok, md, np.inf)))]) if ok.any() else "other")
        else:
            kinds.append("other")
    out["mimic"] = kinds
    fp = out[~out["tp"]]
    counts = {"cmbs": len(lesions), "hits": int(truth["hit"].sum()), "misses": int((~truth["hit"]).sum()),
              "sensitivity": float(truth["hit"].mean()) if len(lesions) else float("nan"),
              "detections": len(cmbs), "fp": len(fp), "fp_by_mimic": fp["mimic"].value_counts().to_dict()}
    return {"truth": truth, "detections": out, "counts": counts}

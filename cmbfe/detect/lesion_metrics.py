"""Lesion-level (3D) numbers of the detector: per-patient counts, the operating threshold, and a detected
lesion list against a synthetic patient's ground truth.

- :func:`lesion_threshold`: the highest score threshold at which >= ``target`` of the 3D CMBs of a split
  are found (**lesion level**: a CMB is found when any of its slice boxes is matched by a detection at or
  above the threshold; matching rule ``centre`` <= 2.5 mm by default, as VALDO; slice-level greedy matching
  of :func:`cmbfe.metrics.match`).
- :func:`per_patient` and :func:`with_ci`: CMBs found and false-positive 3D detections per patient, and the
  lesion sensitivity / FP per scan with patient-bootstrap CIs.
- :func:`valdo_metrics`, :func:`match_centres`, :func:`lesion_centres_mm` (from the core :mod:`cmbfe.valdo`,
  which ``cmbfe evaluate`` uses too): the VALDO 2021 protocol's per-subject lesion metrics.
- :func:`compare_with_truth`: a ``cmbs.csv`` against a synthetic patient's ``lesions.csv``/``mimics.csv``
  (hits, misses, false positives by the mimic they fall on).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from cmbfe import metrics as M
from cmbfe.valdo import lesion_centres_mm, match_centres, valdo_metrics  # noqa: F401 - re-exported


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


def with_ci(pp: dict[str, np.ndarray], n_boot: int, seed: int, ci: float) -> dict[str, Any]:
    """Lesion sensitivity and FP 3D detections per scan, with percentile CIs over resampled patients."""
    def stats(idx: np.ndarray) -> tuple[float, float]:
        n = pp["lesions"][idx].sum()
        return (pp["found"][idx].sum() / n if n else float("nan")), pp["fp"][idx].sum() / max(len(idx), 1)

    p = len(pp["lesions"])
    est = stats(np.arange(p))
    rng = np.random.default_rng(seed)
    draws = (np.array([stats(rng.integers(0, p, p)) for _ in range(n_boot)]) if n_boot and p
             else np.zeros((0, 2)))
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
        text = (f"{target:.0%} lesion sensitivity is NOT reached on the validation split "
                f"(at most {sens:.3f}); "
                + ("the lowest threshold finding that many is used" if len(found) else
                   "no CMB is found at any threshold, the top score is used")
                + f" ({fps:.2f} FP 3D detections per scan)")
    return {"threshold": round(thr, 6), "reached": bool(reached), "target_sensitivity": target,
            "sensitivity": sens, "fp_per_scan": fps, "level": "lesion (3D)", "rule": rule,
            "radius_mm": radius_mm if rule == "centre" else None, "iou": iou if rule == "iou" else None,
            "split": "val", "n_cmbs": int(gt.n_lesions), "n_patients": int(gt.n_patients), "text": text}


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
    radius = (np.maximum(min_radius_mm, lesions["diameter_mm"].to_numpy(float) / 2) if len(lesions)
              else np.zeros(0))
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
    truth["lesion_id_detected"] = [int(cmbs["lesion_id"].iloc[g_of[g]]) if g in g_of else 0
                                   for g in range(len(lesions))]
    truth["distance_mm"] = [round(float(gdist[g]), 2) if g in g_of else np.nan for g in range(len(lesions))]
    out = cmbs.copy()
    out["tp"] = np.array([d in d_of for d in range(len(cmbs))], dtype=bool)
    out["truth_id"] = [int(lesions["lesion_id"].iloc[d_of[d]]) if d in d_of else 0 for d in range(len(cmbs))]
    kinds = []
    mim_xyz = (mimics[["x_mm", "y_mm", "z_mm"]].to_numpy(float) if mimics is not None and len(mimics)
               else np.zeros((0, 3)))
    for d in range(len(cmbs)):
        if d in d_of:
            kinds.append("")
            continue
        if len(mim_xyz):
            md = np.linalg.norm(mim_xyz - det_xyz[d], axis=1)
            ok = md <= np.maximum(min_radius_mm, mimics["diameter_mm"].to_numpy(float) / 2 + 1.0)
            kinds.append(str(mimics["kind"].iloc[int(np.argmin(np.where(ok, md, np.inf)))]) if ok.any()
                         else "other")
        else:
            kinds.append("other")
    out["mimic"] = kinds
    fp = out[~out["tp"]]
    counts = {"cmbs": len(lesions), "hits": int(truth["hit"].sum()), "misses": int((~truth["hit"]).sum()),
              "sensitivity": float(truth["hit"].mean()) if len(lesions) else float("nan"),
              "detections": len(cmbs), "fp": len(fp), "fp_by_mimic": fp["mimic"].value_counts().to_dict()}
    return {"truth": truth, "detections": out, "counts": counts}

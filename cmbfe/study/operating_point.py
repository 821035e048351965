"""Table 4: sensitivity, precision and false positives per CMB at the 90 %-sensitivity operating point, under
two hit rules side by side and at two levels (notebook 05).

Rules (the paper does not state its own): ``iou`` (a detection hits a GT box with IoU >= ``eval.iou``, Table
2's VOC rule) and ``centre`` (box centres <= ``eval.radius_mm`` apart, VALDO style); both greedy by score
(:func:`cmbfe.metrics.match`). Levels:

- ``slice``: per-slice boxes, as Tables 1-2 count them. The operating point is the highest score threshold
  whose sensitivity (hit GT boxes / GT boxes) is >= 0.9 (:func:`cmbfe.metrics.operating_point`); precision =
  TP / detections at that threshold; FP/CMB = false-positive detections / GT boxes.
- ``lesion`` (3D): a CMB is found when any of its slice boxes is hit by a detection at or above the threshold;
  the threshold is the highest at which >= 90 % of the 3D CMBs are found
  (:func:`cmbfe.detect.lesion_metrics.lesion_threshold`, the rule that sets the shipped model's threshold);
  detections are linked across adjacent slices into 3D detections (:func:`cmbfe.metrics.link_detections`); a
  3D detection with no hit member is a false positive. Precision = TP 3D detections / 3D detections; FP/CMB =
  false-positive 3D detections / 3D CMBs.

The lesion rows of :func:`points` also carry VALDO's median per-subject F1 (centres < 5 mm and < 3 mm) at
the lesion operating point. A rule and level whose detections never reach 90 % (at any threshold) says so in
its cells, with the maximum sensitivity reached, instead of a precision of 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from cmbfe import metrics as M
from cmbfe import stats
from cmbfe.config import Config
from cmbfe.detect.lesion_metrics import lesion_threshold
from cmbfe.study import paper
from cmbfe.valdo import lesion_centres_mm, valdo_metrics

RULES = ("iou", "centre")
LEVELS = {"slice": "slice boxes", "lesion": "3D lesions"}
RUN = "(this run)"
PAPER = f"({paper.LABEL})"
SMALL_MM = 3.0  # GT boxes under this side (mm) are where the two rules part (caption)


def rule_text(cfg: Config, rule: str) -> str:
    """A hit rule as a label: ``IoU >= 0.5`` or ``centre <= 2.5 mm``."""
    return f"IoU >= {cfg.eval.iou:g}" if rule == "iou" else f"centre <= {cfg.eval.radius_mm:g} mm"


def matching(cfg: Config, r: dict[str, Any], rule: str) -> M.Matching:
    """The matching of an evaluated run (:func:`cmbfe.study.runs.evaluate_run`) under ``rule``: its own when
    the profile's ``eval.match`` is that rule, else computed once and kept in ``r`` (the key the report's
    centre-rule tables use too)."""
    if rule == cfg.eval.match and "matching" in r:
        return r["matching"]
    key = (f"matching_centre_{cfg.eval.radius_mm:g}mm" if rule == "centre"
           else f"matching_iou_{cfg.eval.iou:g}")
    if key not in r:
        r[key] = M.match(r["gt"], r["dets"], rule=rule, iou=cfg.eval.iou, radius_mm=cfg.eval.radius_mm)
    return r[key]


def slice_point(gt: M.GroundTruth, dets: M.Detections, m: M.Matching,
                target: float = 0.9) -> dict[str, Any]:
    """Slice-level operating point: ``reached``, ``max_sensitivity`` (all detections) and, when reached,
    ``sensitivity``, ``precision``, ``fp_per_cmb`` (FP detections / GT boxes) at the highest threshold
    reaching
    ``target``."""
    c = M.curve(dets.scores[m.order], m.tp[m.order], gt.n_gt, gt.n_patients, gt.n_images)
    max_sens = float(c.sensitivity[-1]) if len(c.tp) and gt.n_gt else 0.0
    k = M.operating_point(c, target)
    if k is None:
        return {"reached": False, "max_sensitivity": max_sens}
    return {"reached": True, "max_sensitivity": max_sens, "sensitivity": float(c.sensitivity[k]),
            "precision": float(c.precision[k]), "fp_per_cmb": float(c.fp[k] / gt.n_gt)}


def lesion_point(gt: M.GroundTruth, dets: M.Detections, m: M.Matching, *, rule: str, iou: float,
                 radius_mm: float, target: float = 0.9, slice_mm: float | None = None) -> dict[str, Any]:
    """3D-lesion operating point (module docstring), the same keys as :func:`slice_point`; ``m`` must be the
    matching of ``rule``. With ``slice_mm`` (mm between slices) also VALDO's median per-subject F1 at that
    threshold (``valdo_median_f1_5mm``, ``valdo_median_f1_3mm``; :func:`cmbfe.valdo.valdo_metrics`)."""
    if gt.n_lesions == 0 or len(dets.scores) == 0:
        return {"reached": False, "max_sensitivity": 0.0}
    lt = lesion_threshold(gt, dets, target=target, rule=rule, radius_mm=radius_mm, iou=iou)
    if not lt["reached"]:
        return {"reached": False, "max_sensitivity": float(lt["sensitivity"])}
    les = M.lesion_metrics(gt, dets, m, lt["threshold"])
    n3d = les["n_3d_detections"]
    max_sens = float(M.lesion_metrics(gt, dets, m, None)["lesion_sensitivity"])
    out = {"reached": True, "max_sensitivity": max_sens,
           "sensitivity": float(les["lesion_sensitivity"]),
           "precision": float((n3d - les["lesion_fp"]) / n3d) if n3d else 0.0,
           "fp_per_cmb": float(les["lesion_fp"] / gt.n_lesions)}
    if slice_mm is not None:
        subj = lesion_centres_mm(gt, dets, dets.scores >= lt["threshold"], slice_mm)
        out |= {f"valdo_median_f1_{d:g}mm": valdo_metrics(subj, d)["median_f1"] for d in (5.0, 3.0)}
    return out


def _small_share(r: dict[str, Any], m: M.Matching) -> tuple[float, float]:
    """Sensitivity over all detections for GT boxes under / at least :data:`SMALL_MM` mm (nan when none)."""
    rec = M.recall_by_size(r["gt"], m, bins_mm=(0.0, SMALL_MM, float("inf")))
    return float(rec["recall"][0]), float(rec["recall"][1])


def points(cfg: Config, ev: dict, target: float = 0.9) -> pd.DataFrame:
    """One row per size, FE, seed, rule and level of the main grid's evaluated runs ``ev`` (``(size, fe,
    seed) -> evaluate_run result``): the :func:`slice_point` / :func:`lesion_point` keys plus the sensitivity
    over all detections of small and larger GT boxes (``small``, ``large``)."""
    rows = []
    for size in cfg.study.sizes:
        for fe in (False, True):
            for s in cfg.study.seeds:
                r = ev[(size, fe, s)]
                for rule in RULES:
                    m = matching(cfg, r, rule)
                    small, large = _small_share(r, m)
                    for level in LEVELS:
                        p = (slice_point(r["gt"], r["dets"], m, target) if level == "slice" else
                             lesion_point(r["gt"], r["dets"], m, rule=rule, iou=cfg.eval.iou,
                                          radius_mm=cfg.eval.radius_mm, target=target,
                                          slice_mm=cfg.synth.slice_mm))
                        rows.append({"size": size, "fe": fe, "seed": s, "rule": rule, "level": level,
                                     "small": small, "large": large, **p})
    return pd.DataFrame(rows)


def _mean_ci(values: list[float]) -> str:
    cs = stats.combine_seeds(values)
    if len(values) < 2 or not np.isfinite(cs["lo"]):
        return f"{cs['mean']:.3f}"
    return f"{cs['mean']:.3f} [{cs['lo']:.3f}, {cs['hi']:.3f}]"


def _cells(sub: pd.DataFrame, target: float) -> tuple[str, str, str]:
    """Sensitivity, precision and FP/CMB cells of one model, rule and level over its seeds."""
    n, ok = len(sub), sub[sub["reached"]]
    maxs = ", ".join(f"{v:.3f}" for v in sub["max_sensitivity"])
    if ok.empty:
        return f"{target:.0%} not reached: max {maxs}", "n/a (not reached)", "n/a (not reached)"
    note = "" if len(ok) == n else f" ({len(ok)} of {n} seeds reach {target:.0%}; max {maxs})"
    return (_mean_ci(list(ok["sensitivity"])) + note, _mean_ci(list(ok["precision"])),
            _mean_ci(list(ok["fp_per_cmb"])))


def table4(cfg: Config, pts: pd.DataFrame, target: float = 0.9) -> pd.DataFrame:
    """Table 4 from :func:`points`: per model and level, sensitivity / precision / FP per CMB under each rule
    side by side (mean over the seeds that reach ``target`` [95 % t-interval]; cells say when and how far
    ``target`` is missed), then the paper's rows as published (comparators quoted, not rerun)."""
    rows: list[dict[str, Any]] = []
    for size in cfg.study.sizes:
        for fe in (False, True):
            for level, level_name in LEVELS.items():
                row: dict[str, Any] = {"method": f"SSD-{size}{'-FE' if fe else ''} {RUN}",
                                       "level": level_name, "seeds": len(cfg.study.seeds)}
                for rule in RULES:
                    sub = pts[(pts["size"] == size) & (pts["fe"] == fe) & (pts["rule"] == rule)
                              & (pts["level"] == level)]
                    sens, prec, fpc = _cells(sub, target)
                    lab = rule_text(cfg, rule)
                    row |= {f"{lab}: sensitivity {RUN}": sens, f"{lab}: precision {RUN}": prec,
                            f"{lab}: FP/CMB {RUN}": fpc}
                rows.append(row)
    for r in paper.TABLE4:
        rows.append({"method": f"{r['method']} {PAPER}", "level": "as published (hit rule not stated)",
                     "seeds": "",
                     f"sensitivity {PAPER}": r["sensitivity"], f"precision {PAPER}": r["precision"],
                     f"FP/CMB {PAPER}": r["fp_per_cmb"]})
    return pd.DataFrame(rows)


def caption(cfg: Config, pts: pd.DataFrame, target: float = 0.9) -> str:
    """Table 4's caption: what the columns are, which rule reaches ``target`` for every seed of the largest
    size's two arms (per level), and why the rules differ, from this run's sensitivity over all detections on
    GT boxes under / over :data:`SMALL_MM` mm."""
    size = max(cfg.study.sizes)
    big = pts[pts["size"] == size]
    labels = {rule: rule_text(cfg, rule) for rule in RULES}
    text = [(f"Table 4: sensitivity, precision and false positives per CMB at the highest score threshold "
             f"reaching {target:.0%} sensitivity, under two hit rules side by side ({labels['iou']}: "
             f"Table 2's VOC rule; {labels['centre']}: VALDO style; the paper does not state its rule), at "
             "slice level (per-slice boxes) and for 3D lesions (detections linked across adjacent slices; a "
             "CMB is found when any of its slice boxes is hit; FP/CMB = unmatched 3D detections per 3D "
             f"CMB). Mean over the seeds reaching {target:.0%} [95 % t-interval]; a cell that never reaches "
             "it gives the maximum sensitivity instead.")]
    for level, name in LEVELS.items():
        sub = big[big["level"] == level]
        ok = [labels[r] for r in RULES
              if len(sub[sub["rule"] == r]) and sub[sub["rule"] == r]["reached"].all()]
        best = {r: sub[sub["rule"] == r]["max_sensitivity"].min() for r in RULES}
        text.append(f"{name[0].upper()}{name[1:]}, SSD-{size} with and without FE, every seed: "
                    + (f"{target:.0%} is reached under {' and '.join(ok)}" if ok else
                       f"no rule reaches {target:.0%} in every seed")
                    + " (lowest maximum sensitivity over models and seeds: "
                    + ", ".join(f"{labels[r]} {best[r]:.3f}" for r in RULES) + ").")
    sl = big[big["level"] == "slice"]
    sm = {r: float(np.nanmean(sl[sl["rule"] == r]["small"])) for r in RULES}
    lg = {r: float(np.nanmean(sl[sl["rule"] == r]["large"])) for r in RULES}
    text.append(f"Why: over all detections, GT boxes under {SMALL_MM:g} mm are found with sensitivity "
                f"{sm['iou']:.3f} at {labels['iou']} and {sm['centre']:.3f} at {labels['centre']} (boxes of "
                f"{SMALL_MM:g} mm and more: {lg['iou']:.3f} and {lg['centre']:.3f}): a box of two or three "
                "pixels falls below IoU 0.5 with one pixel of offset or a predicted box of the next prior "
                "size, while its centre stays within the radius.")
    return " ".join(text) + (f" {cfg.study.reduced}" if cfg.study.reduced else "")

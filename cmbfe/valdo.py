"""VALDO 2021 (task 2, cerebral microbleeds) lesion metrics: per-subject F1 with centre-of-mass matching,
its median over subjects, absolute count difference, false positives per subject, pooled sensitivity and
precision (:func:`valdo_metrics`), and 3D lesion centres from COCO slice boxes (:func:`lesion_centres_mm`).

Used by ``cmbfe evaluate`` (:func:`cmbfe.evaluate.valdo_summary`), by ``cmbfe detect``'s lesion metrics
(:mod:`cmbfe.detect.lesion_metrics` re-exports them) and the study's per-lesion tables. The official code
(``WhereIsValdo/valdo-eval-2021``) matches centres closer than a distance whose command-line default is not
5 mm: the distance is always an argument here and stated with the numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from cmbfe import metrics as M


def match_centres(pred_mm: np.ndarray, true_mm: np.ndarray, distance_mm: float) -> tuple[int, np.ndarray]:
    """One-to-one matching of predicted and true lesion centres (mm) strictly closer than ``distance_mm``
    (Hungarian assignment on the distances, so the number of matches is the largest possible).
    Returns ``(true positives, per true lesion: matched)``."""
    from scipy.optimize import linear_sum_assignment

    pred, true = np.asarray(pred_mm, float).reshape(-1, 3), np.asarray(true_mm, float).reshape(-1, 3)
    hit = np.zeros(len(true), bool)
    if not len(pred) or not len(true):
        return 0, hit
    dist = np.linalg.norm(pred[:, None] - true[None], axis=2)
    cost = np.where(dist < distance_mm, dist, 1e9)
    r, c = linear_sum_assignment(cost)
    ok = cost[r, c] < distance_mm
    hit[c[ok]] = True
    return int(ok.sum()), hit


def valdo_metrics(
    subjects: dict[str, tuple[np.ndarray, np.ndarray]], distance_mm: float = 5.0
) -> dict[str, Any]:
    """VALDO 2021 task 2 lesion metrics over subjects ``{name: (predicted centres mm, true centres mm)}``
    (centres of mass of the lesions, any common mm frame; a subject without a prediction passes an empty
    array and scores F1 0 when it has true CMBs).

    Per subject: TP by :func:`match_centres` at ``< distance_mm``, FP = predictions - TP, FN = truths - TP,
    F1 = 2 TP / (2 TP + FP + FN), absolute count difference. F1 is undefined (NaN, left out of the median
    and mean) for a subject with neither true nor predicted CMBs; a CMB-free subject with a prediction scores
    F1 0. Returns ``median_f1`` (the VALDO ranking number), ``mean_f1``, ``abs_count_difference`` (mean),
    ``fp_per_subject``, ``fp_per_cmb_free_subject``, pooled ``sensitivity`` and ``precision``, counts and the
    per-subject table ``subjects``.
    """
    rows = []
    for name, (pred, true) in subjects.items():
        pred, true = np.asarray(pred, float).reshape(-1, 3), np.asarray(true, float).reshape(-1, 3)
        tp, _ = match_centres(pred, true, distance_mm)
        fp, fn = len(pred) - tp, len(true) - tp
        f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else float("nan")
        rows.append(
            {
                "subject": name,
                "true": len(true),
                "predicted": len(pred),
                "tp": tp,
                "fp": fp,
                "fn": fn,
                "f1": f1,
                "abs_count_difference": abs(len(pred) - len(true)),
            }
        )
    t = pd.DataFrame(
        rows, columns=["subject", "true", "predicted", "tp", "fp", "fn", "f1", "abs_count_difference"]
    )
    f1 = t["f1"].dropna()
    free = t[t["true"] == 0]
    tp, n_true, n_pred = int(t["tp"].sum()), int(t["true"].sum()), int(t["predicted"].sum())
    return {
        "distance_mm": distance_mm,
        "n_subjects": len(t),
        "n_cmb_free": len(free),
        "median_f1": float(f1.median()) if len(f1) else float("nan"),
        "mean_f1": float(f1.mean()) if len(f1) else float("nan"),
        "abs_count_difference": float(t["abs_count_difference"].mean()) if len(t) else float("nan"),
        "fp_per_subject": float(t["fp"].mean()) if len(t) else float("nan"),
        "fp_per_cmb_free_subject": float(free["fp"].mean()) if len(free) else float("nan"),
        "sensitivity": tp / n_true if n_true else float("nan"),
        "precision": tp / n_pred if n_pred else float("nan"),
        "tp": tp,
        "n_true": n_true,
        "n_predicted": n_pred,
        "subjects": t,
    }


def lesion_centres_mm(
    gt: M.GroundTruth, dets: M.Detections, keep: np.ndarray, slice_mm: float
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per patient of a COCO ground truth: ``(predicted, true)`` 3D lesion centres in mm (x = col * dx,
    y = row * dy, z = slice * ``slice_mm``), for :func:`valdo_metrics`. A true lesion's centre is the mean of
    its slice boxes' centres; a prediction is a 3D detection of :func:`cmbfe.metrics.link_detections` over
    the kept detections, centred at the box-area-weighted mean of its members' centres."""

    def centre(b: np.ndarray, img: np.ndarray, w: np.ndarray) -> np.ndarray:
        dy, dx = gt.image_spacing[img, 0], gt.image_spacing[img, 1]
        xyz = np.stack(
            [(b[:, 0] + b[:, 2]) / 2 * dx, (b[:, 1] + b[:, 3]) / 2 * dy, gt.image_slice[img] * slice_mm], 1
        )
        return np.average(xyz, axis=0, weights=w)

    out: dict[str, tuple[list, list]] = {p: ([], []) for p in gt.patient_ids}
    for les in range(gt.n_lesions):
        g = np.flatnonzero(gt.box_lesion == les)
        img = gt.box_image[g]
        out[gt.patient_ids[gt.image_patient[img[0]]]][1].append(centre(gt.boxes[g], img, np.ones(len(g))))
    labels, n = M.link_detections(gt, dets, keep)
    for c in range(n):
        g = np.flatnonzero(labels == c)
        b = dets.boxes[g]
        w = np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 1e-6)
        out[gt.patient_ids[gt.image_patient[dets.image[g[0]]]]][0].append(centre(b, dets.image[g], w))
    return {p: (np.array(a).reshape(-1, 3), np.array(b).reshape(-1, 3)) for p, (a, b) in out.items()}

"""Patient-level bootstrap confidence intervals, paired bootstrap tests and seed aggregation.

The unit of resampling is the patient (scan): a resample draws ``P`` patients with replacement from the
``P`` test patients (numpy ``Generator``, seeded). Matching is done **once** (:func:`cmbfe.metrics.match`);
:func:`prepare` stores per-detection TP flags, scores and patients in descending-score order, and a
resample weights each detection by the number of times its patient was drawn, which is exactly
concatenating the drawn patients (tests check this against re-matching the concatenated set): the
curve is a weighted cumulative sum at the precomputed tie-group ends, and the all-point AP is computed
per copy in closed form (a run of ``w`` copies of a TP has rising precision, of a FP falling, so the
envelope at each copy follows from the run's last/first copy). Statistics per resample: VOC all-point AP
(``ap_voc``), precision at the target sensitivity (0.0 when not reached) and FROC mean over 1/8..8 FP/scan.
Intervals are percentile intervals; resamples where a statistic is undefined (no CMB drawn) are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cmbfe import metrics as M

STATS = ("ap_voc", "precision_at_sensitivity", "froc_mean")


@dataclass(frozen=True)
class BootData:
    """Per-detection arrays in descending-score order plus per-patient counts (see :func:`prepare`)."""

    scores: np.ndarray  # (D,) float64, descending
    tp: np.ndarray  # (D,) bool
    patient: np.ndarray  # (D,) int64 patient row
    n_gt_patient: np.ndarray  # (P,) CMB boxes per patient
    n_img_patient: np.ndarray  # (P,) images (slices) per patient
    ends: np.ndarray  # (K,) last index of each group of tied scores

    @property
    def n_patients(self) -> int:
        return len(self.n_gt_patient)


def prepare(gt: M.GroundTruth, dets: M.Detections, m: M.Matching) -> BootData:
    """Precompute the arrays a bootstrap needs from one matching."""
    o = m.order
    p = gt.n_patients
    return BootData(
        scores=np.asarray(dets.scores, dtype=np.float64)[o],
        tp=np.asarray(m.tp, dtype=bool)[o],
        patient=gt.image_patient[dets.image[o]],
        n_gt_patient=np.bincount(gt.image_patient[gt.box_image], minlength=p),
        n_img_patient=np.bincount(gt.image_patient, minlength=p),
        ends=_tie_ends(np.asarray(dets.scores, dtype=np.float64)[o]),
    )


def _tie_ends(s: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.append(s[1:] != s[:-1], True)) if len(s) else np.zeros(0, dtype=np.int64)


def weighted_stats(d: BootData, counts: np.ndarray | None = None,
                   target: float = 0.9) -> tuple[dict[str, float], M.Curve]:
    """Statistics of the set in which patient ``p`` appears ``counts[p]`` times (None: once each).

    Returns ``({"ap_voc", "precision_at_sensitivity", "froc_mean"}, curve)``.
    """
    counts = np.ones(d.n_patients, dtype=np.int64) if counts is None else counts
    w = counts[d.patient].astype(np.float64)
    wt = w * d.tp
    ctp, cn = np.cumsum(wt), np.cumsum(w)
    n_gt = int(counts @ d.n_gt_patient)
    c = M.Curve(threshold=d.scores[d.ends], tp=ctp[d.ends], fp=cn[d.ends] - ctp[d.ends], n_gt=n_gt,
                n_scans=d.n_patients, n_slices=int(counts @ d.n_img_patient))
    if n_gt > 0:
        # precision at the last copy of a TP run / the first copy of a FP run; 0 for undrawn detections
        v = np.where(d.tp, ctp / np.maximum(cn, 1), ctp / (cn - w + 1)) * (w > 0)
        env = np.maximum.accumulate(v[::-1])[::-1] if len(v) else v
        ap = float(np.sum(wt * env) / n_gt)
    else:
        ap = float("nan")
    k = M.operating_point(c, target)
    return {
        "ap_voc": ap,
        "precision_at_sensitivity": 0.0 if k is None else float(c.precision[k]),
        "froc_mean": float(M.froc(c).mean()) if n_gt > 0 else float("nan"),
    }, c


def _draws(n_patients: int, n: int, seed: int) -> np.ndarray:
    """(n, P) patient draw counts, from ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_patients, size=(n, n_patients))
    if not n:
        return np.zeros((0, n_patients), int)
    return np.stack([np.bincount(r, minlength=n_patients) for r in idx])


def _interval(values: np.ndarray, ci: float) -> tuple[float, float, float, int]:
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan"), 0
    lo, hi = np.percentile(v, [50 * (1 - ci), 50 * (1 + ci)])
    return float(lo), float(hi), float(v.std(ddof=1)) if len(v) > 1 else float("nan"), len(v)


def _rename(name: str, target: float) -> str:
    return f"precision_at_sensitivity_{target:g}" if name == "precision_at_sensitivity" else name


def bootstrap_ci(d: BootData, n: int = 1000, seed: int = 0, ci: float = 0.95,
                 target: float = 0.9) -> dict[str, Any]:
    """Percentile CIs over patients for AP (all-point), precision at ``target`` sensitivity, FROC mean.

    Returns ``{stat: {"estimate", "lo", "hi", "se", "n_valid"}, "n", "seed", "ci", "unit": "patient"}``.
    """
    est = weighted_stats(d, None, target)[0]
    vals = np.full((n, len(STATS)), np.nan)
    for b, counts in enumerate(_draws(d.n_patients, n, seed)):
        st = weighted_stats(d, counts, target)[0]
        vals[b] = [st[k] for k in STATS]
    out: dict[str, Any] = {}
    for j, k in enumerate(STATS):
        lo, hi, se, nv = _interval(vals[:, j], ci)
        out[_rename(k, target)] = {"estimate": est[k], "lo": lo, "hi": hi, "se": se, "n_valid": nv}
    out.update(n=n, seed=seed, ci=ci, unit="patient")
    return out


def paired_bootstrap(a: BootData, b: BootData, n: int = 1000, seed: int = 0, ci: float = 0.95,
                     target: float = 0.9) -> dict[str, Any]:
    """Paired patient bootstrap of ``stat(a) - stat(b)`` for two runs on the same test set.

    Both runs see the same patient draws. Per statistic returns ``diff`` (on the full set), percentile
    ``lo``/``hi`` and a two-sided p-value
    ``p = min(1, 2 * min((#{d* <= 0} + 1), (#{d* >= 0} + 1)) / (B + 1))`` over the ``B`` valid resamples
    (the test of H0: no difference).
    """
    if a.n_patients != b.n_patients or not np.array_equal(a.n_gt_patient, b.n_gt_patient):
        raise ValueError("paired_bootstrap: the two runs are not on the same patients/ground truth")
    ea, eb = weighted_stats(a, None, target)[0], weighted_stats(b, None, target)[0]
    diffs = np.full((n, len(STATS)), np.nan)
    for r, counts in enumerate(_draws(a.n_patients, n, seed)):
        sa = weighted_stats(a, counts, target)[0]
        sb = weighted_stats(b, counts, target)[0]
        diffs[r] = [sa[k] - sb[k] for k in STATS]
    out: dict[str, Any] = {}
    for j, k in enumerate(STATS):
        v = diffs[:, j][np.isfinite(diffs[:, j])]
        lo, hi, se, nv = _interval(v, ci)
        p = min(1.0, 2 * min(np.sum(v <= 0) + 1, np.sum(v >= 0) + 1) / (nv + 1)) if nv else float("nan")
        out[_rename(k, target)] = {"a": ea[k], "b": eb[k], "diff": ea[k] - eb[k], "lo": lo, "hi": hi,
                                   "se": se, "p": float(p), "n_valid": nv}
    out.update(n=n, seed=seed, ci=ci, unit="patient")
    return out


def bootstrap_bands(d: BootData, n: int = 200, seed: int = 0, ci: float = 0.95,
                    recall_grid: np.ndarray | None = None,
                    fp_grid: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Pointwise percentile bands for plots: interpolated precision on a recall grid (0 beyond the last
    recall) and FROC sensitivity on an FP/scan grid (step rule of :func:`cmbfe.metrics.froc`).

    Returns ``recall, precision_lo, precision_hi, fp_per_scan, sensitivity_lo, sensitivity_hi``.
    """
    rg = np.linspace(0, 1, 101) if recall_grid is None else np.asarray(recall_grid, float)
    fg = np.geomspace(1 / 8, 8, 61) if fp_grid is None else np.asarray(fp_grid, float)
    pr = np.full((n, len(rg)), np.nan)
    fr = np.full((n, len(fg)), np.nan)
    for r, counts in enumerate(_draws(d.n_patients, n, seed)):
        c = weighted_stats(d, counts)[1]
        if c.n_gt == 0:
            continue
        pr[r] = precision_at_recall(c, rg)
        fr[r] = M.froc(c, tuple(fg))
    q = [50 * (1 - ci), 50 * (1 + ci)]
    plo, phi = np.nanpercentile(pr, q, axis=0) if np.isfinite(pr).any() else (rg * np.nan,) * 2
    slo, shi = np.nanpercentile(fr, q, axis=0) if np.isfinite(fr).any() else (fg * np.nan,) * 2
    return {"recall": rg, "precision_lo": plo, "precision_hi": phi,
            "fp_per_scan": fg, "sensitivity_lo": slo, "sensitivity_hi": shi}


def precision_at_recall(c: M.Curve, recall: np.ndarray) -> np.ndarray:
    """Interpolated precision (max precision at sensitivity >= r) at each ``r``; 0 beyond the curve."""
    r = np.asarray(recall, dtype=float)
    if len(c.tp) == 0 or c.n_gt == 0:
        return np.zeros(len(r))
    k = np.searchsorted(c.sensitivity, r - 1e-12, "left")
    env = c.precision_interp
    return np.where(k < len(env), env[np.minimum(k, len(env) - 1)], 0.0)


def combine_seeds(values: list[float] | np.ndarray, ci: float = 0.95) -> dict[str, float]:
    """Mean over training seeds with a t-based CI: ``mean +- t_{(1+ci)/2, n-1} * sd / sqrt(n)``.

    ``sd`` uses ``ddof=1``; with one value ``sd``, ``lo`` and ``hi`` are nan. NaNs are dropped.
    """
    from scipy.stats import t as student_t

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    nv = len(v)
    if nv == 0:
        return {"mean": float("nan"), "sd": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    mean = float(v.mean())
    if nv == 1:
        return {"mean": mean, "sd": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 1}
    sd = float(v.std(ddof=1))
    h = float(student_t.ppf((1 + ci) / 2, nv - 1)) * sd / np.sqrt(nv)
    return {"mean": mean, "sd": sd, "lo": mean - h, "hi": mean + h, "n": nv}

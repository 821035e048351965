"""Detection metrics for cerebral microbleeds: pure numpy maths, no file I/O.

Conventions (see also ``docs/design.md``):

- Boxes are ``xyxy`` in continuous pixel coordinates (pixel ``(j, i)`` covers ``[i, i+1) x [j, j+1)``);
  COCO JSON ``xywh`` is converted with :func:`cmbfe.boxes.xywh_to_xyxy`. Areas and IoU use ``x1 - x0`` with
  **no "+1"** (as pycocotools, unlike the VOC devkit).
- Matching (:func:`match`) is greedy by score: detections are visited in descending score with a
  *stable* sort (ties keep input order). Each detection takes, among the still unmatched GT boxes of
  its image that pass the rule, the **best** one (highest IoU, or smallest centre distance); ties go to
  the later GT box in input order - exactly pycocotools' ``COCOeval.evaluateImg``. A detection whose
  candidates are all taken is a false positive (duplicate). (pycocotools breaks score ties across
  images by image id, this module by input order; results differ only for exactly tied scores.) Rules:
  ``iou`` (IoU >= threshold, VOC) or ``centre`` (centre distance <= radius in mm using
  ``pixel_spacing_mm = (dy, dx)``).
- Curves: AP uses one point per detection in score order (VOC/COCO practice). Operating points
  (sensitivity, precision, FP rates, FROC, best F1, precision at a sensitivity) use one point per
  distinct score threshold ``score >= t``, so tied detections are never split.
- ``nan`` means undefined (e.g. AP or sensitivity with no GT, precision with no detections);
  :mod:`cmbfe.evaluate` writes it as JSON ``null``.
- A scan is a patient: FP/scan divides by the number of patients in the GT set; FP/slice by the
  number of images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from cmbfe.boxes import xywh_to_xyxy  # noqa: F401 - the COCO conversion named in this module's conventions

FROC_FPS: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""FP/scan levels of the FROC summary (``froc_mean`` is the mean sensitivity at these)."""
MIMIC_KINDS: tuple[str, ...] = ("vein", "calcification", "iron", "air", "cmb", "other")
"""Categories of :func:`attribute_fps`; ``cmb`` = FP on a CMB (mislocalised/duplicate)."""
_EPS = 1e-9


@dataclass(frozen=True)
class GroundTruth:
    """Ground truth of a COCO set as arrays. Image rows index ``image_*``; box rows index ``boxes``."""

    image_ids: np.ndarray  # (I,) int64 COCO image ids
    image_patient: np.ndarray  # (I,) int64 row into patient_ids
    image_slice: np.ndarray  # (I,) int64 slice_index
    image_spacing: np.ndarray  # (I, 2) float64 pixel spacing (dy, dx) in mm (nan if unknown)
    patient_ids: tuple[str, ...]
    boxes: np.ndarray  # (G, 4) float64 xyxy pixels
    box_image: np.ndarray  # (G,) int64 image row
    box_lesion: np.ndarray  # (G,) int64 3D lesion row (annotations sharing lesion_id in a patient)
    n_lesions: int

    @property
    def n_gt(self) -> int:
        return len(self.boxes)

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    @property
    def n_patients(self) -> int:
        return len(self.patient_ids)


@dataclass(frozen=True)
class Detections:
    """Detections as arrays: ``boxes`` (D, 4) xyxy pixels, ``image`` (D,) image row, ``scores`` (D,)."""

    boxes: np.ndarray
    image: np.ndarray
    scores: np.ndarray


@dataclass(frozen=True)
class Matching:
    """Result of :func:`match`, per detection in input order, plus the stable descending-score order."""

    tp: np.ndarray  # (D,) bool
    gt_of_det: np.ndarray  # (D,) int64 matched GT row or -1
    order: np.ndarray  # (D,) int64 detection rows by descending score, stable


def iou_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise IoU of paired xyxy boxes ``a[k]``, ``b[k]`` (no +1; 0 when the union is empty)."""
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    out = np.zeros(len(inter))
    np.divide(inter, union, out=out, where=union > 0)
    return out


def group_pairs(a_key: np.ndarray, b_key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs ``(i, j)`` with ``a_key[i] == b_key[j]`` (vectorised; ``j`` in input order per
    ``i``)."""
    a_key = np.asarray(a_key)
    b_sort = np.argsort(b_key, kind="stable")
    b_sorted = np.asarray(b_key)[b_sort]
    start = np.searchsorted(b_sorted, a_key, "left")
    cnt = np.searchsorted(b_sorted, a_key, "right") - start
    ia = np.repeat(np.arange(len(a_key)), cnt)
    offs = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    return ia, b_sort[np.repeat(start, cnt) + offs]


def match(gt: GroundTruth, dets: Detections, rule: str = "iou", iou: float = 0.5,
          radius_mm: float = 2.5) -> Matching:
    """Greedy one-to-one matching of detections to GT boxes on the same image (module docstring rules).

    ``rule="iou"``: candidate if IoU >= ``iou``; best = highest IoU. ``rule="centre"``: candidate if the
    box centres are <= ``radius_mm`` apart in mm (``dx``/``dy`` from ``gt.image_spacing``); best = nearest.
    """
    if rule not in ("iou", "centre"):
        raise ValueError(f"rule must be 'iou' or 'centre', not {rule!r}")
    n = len(dets.scores)
    order = np.argsort(-np.asarray(dets.scores, dtype=np.float64), kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    di, gi = group_pairs(dets.image, gt.box_image)
    db, gb = dets.boxes[di], gt.boxes[gi]
    if rule == "iou":
        quality = iou_pairs(db, gb)
        ok = quality >= min(iou, 1 - 1e-10)
    else:
        sp = gt.image_spacing[gt.box_image[gi]]
        dx = ((db[:, 0] + db[:, 2]) - (gb[:, 0] + gb[:, 2])) / 2 * sp[:, 1]
        dy = ((db[:, 1] + db[:, 3]) - (gb[:, 1] + gb[:, 3])) / 2 * sp[:, 0]
        dist = np.hypot(dx, dy)
        quality = -dist
        ok = dist <= radius_mm + _EPS
    di, gi, quality = di[ok], gi[ok], quality[ok]
    srt = np.lexsort((-gi, -quality, rank[di]))
    det_done = bytearray(n)
    gt_done = bytearray(gt.n_gt)
    gt_of_det = np.full(n, -1, dtype=np.int64)
    for d, g in zip(di[srt].tolist(), gi[srt].tolist()):
        if det_done[d] or gt_done[g]:
            continue
        det_done[d] = gt_done[g] = 1
        gt_of_det[d] = g
    return Matching(tp=gt_of_det >= 0, gt_of_det=gt_of_det, order=order)


# ---------------------------------------------------------------- curves and AP (score-sorted input)


def ap_voc(tp_sorted: np.ndarray, n_gt: int) -> float:
    """VOC all-point interpolated AP (area under the monotone precision envelope; VOC2010+).

    ``tp_sorted``: TP flags of all detections in descending-score order (one PR point per detection).
    """
    if n_gt <= 0:
        return float("nan")
    tp = np.asarray(tp_sorted, dtype=np.float64)
    if len(tp) == 0:
        return 0.0
    ctp = np.cumsum(tp)
    rec = np.concatenate([[0.0], ctp / n_gt, [1.0]])
    prec = np.concatenate([[0.0], ctp / np.arange(1, len(tp) + 1), [0.0]])
    prec = np.maximum.accumulate(prec[::-1])[::-1]
    i = np.flatnonzero(rec[1:] != rec[:-1])
    return float(np.sum((rec[i + 1] - rec[i]) * prec[i + 1]))


def ap_voc07(tp_sorted: np.ndarray, n_gt: int) -> float:
    """VOC2007 11-point AP: mean over r in {0, 0.1, ..., 1} of max precision at recall >= r (0 if none).

    Thresholds are ``np.arange(0, 1.1, 0.1)`` compared exactly, as the widely used ``voc_eval.py``
    (so a recall of exactly 3/10 does not reach the float 0.30000000000000004).
    """
    if n_gt <= 0:
        return float("nan")
    tp = np.asarray(tp_sorted, dtype=np.float64)
    if len(tp) == 0:
        return 0.0
    ctp = np.cumsum(tp)
    rec, prec = ctp / n_gt, ctp / np.arange(1, len(tp) + 1)
    env = np.maximum.accumulate(prec[::-1])[::-1]  # env[k] = max precision at points >= k
    k = np.searchsorted(rec, np.arange(0.0, 1.1, 0.1), "left")
    return float(np.mean(np.where(k < len(rec), env[np.minimum(k, len(rec) - 1)], 0.0)))


def ap_coco101(tp_sorted: np.ndarray, n_gt: int) -> float:
    """COCO 101-point AP exactly as pycocotools ``accumulate`` (recall thresholds ``linspace(0, 1, 101)``,
    precision ``tp / (tp + fp + eps)`` made monotone, 0 beyond the last recall)."""
    if n_gt <= 0:
        return float("nan")
    tp = np.asarray(tp_sorted, dtype=np.float64)
    if len(tp) == 0:
        return 0.0
    ctp = np.cumsum(tp)
    cfp = np.cumsum(1.0 - tp)
    rc = ctp / n_gt
    pr = np.maximum.accumulate((ctp / (ctp + cfp + np.spacing(1)))[::-1])[::-1]
    inds = np.searchsorted(rc, np.linspace(0.0, 1.00, 101), side="left")
    return float(np.mean(np.where(inds < len(pr), pr[np.minimum(inds, len(pr) - 1)], 0.0)))


@dataclass(frozen=True)
class Curve:
    """Operating points, one per distinct score threshold ``score >= t`` (descending ``t``)."""

    threshold: np.ndarray  # (K,) score thresholds
    tp: np.ndarray  # (K,) cumulative TP
    fp: np.ndarray  # (K,) cumulative FP
    n_gt: int
    n_scans: int
    n_slices: int

    @property
    def sensitivity(self) -> np.ndarray:
        return self.tp / self.n_gt if self.n_gt > 0 else np.full(len(self.tp), np.nan)

    @property
    def precision(self) -> np.ndarray:
        return self.tp / np.maximum(self.tp + self.fp, 1)

    @property
    def precision_interp(self) -> np.ndarray:
        """Monotone envelope: max precision at any lower threshold (VOC interpolation)."""
        p = self.precision
        return np.maximum.accumulate(p[::-1])[::-1] if len(p) else p

    @property
    def fp_per_scan(self) -> np.ndarray:
        return self.fp / max(self.n_scans, 1)

    @property
    def fp_per_slice(self) -> np.ndarray:
        return self.fp / max(self.n_slices, 1)


def curve(scores_sorted: np.ndarray, tp_sorted: np.ndarray, n_gt: int, n_scans: int,
          n_slices: int) -> Curve:
    """Operating points from descending-sorted scores and TP flags (last index of each tie group)."""
    s = np.asarray(scores_sorted, dtype=np.float64)
    tp = np.asarray(tp_sorted, dtype=bool)
    ends = np.flatnonzero(np.append(s[1:] != s[:-1], True)) if len(s) else np.zeros(0, dtype=np.int64)
    ctp = np.cumsum(tp)[ends]
    return Curve(threshold=s[ends], tp=ctp, fp=ends + 1 - ctp, n_gt=int(n_gt), n_scans=int(n_scans),
                 n_slices=int(n_slices))


def operating_point(c: Curve, target: float = 0.9) -> int | None:
    """Index of the highest threshold whose sensitivity >= ``target`` (fewest detections), else None."""
    if c.n_gt <= 0:
        return None
    k = np.flatnonzero(c.tp >= target * c.n_gt - _EPS)
    return int(k[0]) if len(k) else None


def froc(c: Curve, fps: tuple[float, ...] = FROC_FPS, per: str = "scan") -> np.ndarray:
    """Sensitivity at each FP rate in ``fps`` (per ``scan`` = patient, or per ``slice``).

    Step rule: the sensitivity of the lowest threshold whose FP rate is <= the level (the curve starts
    at (0, 0)); beyond the last point it stays at the sensitivity of all detections. Non-decreasing.
    """
    rate = c.fp_per_scan if per == "scan" else c.fp_per_slice
    sens = np.concatenate([[0.0], c.sensitivity])
    k = np.searchsorted(np.concatenate([[0.0], rate]), np.asarray(fps) + _EPS, "right") - 1
    return sens[np.maximum(k, 0)]


def f1_best(c: Curve) -> tuple[float, float | None]:
    """Best F1 over operating points and its threshold (0.0, None when nothing matches)."""
    if c.n_gt <= 0 or len(c.tp) == 0:
        return 0.0, None
    p, r = c.precision, c.sensitivity
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)
    k = int(np.argmax(f1))
    return float(f1[k]), (float(c.threshold[k]) if f1[k] > 0 else None)


# ---------------------------------------------------------------- 3D lesions and FP attribution


def _centre_in(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether the centre of box ``a[k]`` lies in box ``b[k]`` (inclusive bounds)."""
    cx, cy = (a[:, 0] + a[:, 2]) / 2, (a[:, 1] + a[:, 3]) / 2
    return (cx >= b[:, 0]) & (cx <= b[:, 2]) & (cy >= b[:, 1]) & (cy <= b[:, 3])


def _overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Positive intersection area."""
    return ((np.minimum(a[:, 2], b[:, 2]) > np.maximum(a[:, 0], b[:, 0]))
            & (np.minimum(a[:, 3], b[:, 3]) > np.maximum(a[:, 1], b[:, 1])))


def link_detections(gt: GroundTruth, dets: Detections, keep: np.ndarray, *, same_slice: bool = True
                    ) -> tuple[np.ndarray, int]:
    """Link kept slice detections into 3D detections.

    Two detections are linked when they are in the same patient, their slice indices differ by at most
    1 (the same slice too: nested or overlapping boxes of one focus that NMS kept are one lesion), and their
    boxes overlap (positive intersection) or either box's centre lies inside the other.
    Linking is transitive (connected components). ``same_slice=False``: adjacent slices only (the rule before
    issue 20, for comparisons). Returns (labels (D,) with -1 for dropped detections, number of 3D detections).
    """
    idx = np.flatnonzero(keep)
    labels = np.full(len(dets.scores), -1, dtype=np.int64)
    if len(idx) == 0:
        return labels, 0
    img = dets.image[idx]
    sl = gt.image_slice - gt.image_slice.min()  # >= 0, so keys of different patients never touch
    key = gt.image_patient[img] * (int(sl.max()) + 3) + sl[img] + 1
    a1, b1 = group_pairs(key + 1, key)
    a0, b0 = group_pairs(key, key) if same_slice else (np.zeros(0, np.int64),) * 2
    a, b = np.concatenate([a1, a0[a0 < b0]]), np.concatenate([b1, b0[a0 < b0]])
    ba, bb = dets.boxes[idx[a]], dets.boxes[idx[b]]
    linked = _overlap(ba, bb) | _centre_in(ba, bb) | _centre_in(bb, ba)
    a, b = a[linked], b[linked]
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(len(idx), len(idx)))
    n, comp = connected_components(graph, directed=False)
    labels[idx] = comp
    return labels, int(n)


def lesion_metrics(gt: GroundTruth, dets: Detections, m: Matching, threshold: float | None) -> dict:
    """Per-lesion (3D) sensitivity and FP 3D detections per scan using detections with score >= threshold.

    ``threshold=None`` uses all detections. A 3D GT lesion is detected when any of its slice boxes is
    matched (by :func:`match`) by a kept detection; a 3D detection (:func:`link_detections`, score = max
    of its members) is a TP when any member is a slice-level TP, else it is a FP.
    """
    keep = np.ones(len(dets.scores), bool) if threshold is None else dets.scores >= threshold
    labels, n3d = link_detections(gt, dets, keep)
    tp = m.tp & keep
    hit = np.zeros(gt.n_lesions, dtype=bool)
    hit[gt.box_lesion[m.gt_of_det[tp]]] = True
    group_tp = np.zeros(n3d, dtype=bool)
    group_tp[labels[tp]] = True
    n_fp = int(n3d - group_tp.sum())
    return {
        "lesion_sensitivity": float(hit.mean()) if gt.n_lesions else float("nan"),
        "lesion_fp_per_scan": n_fp / max(gt.n_patients, 1),
        "n_lesions": int(gt.n_lesions),
        "lesion_tp": int(hit.sum()),
        "n_3d_detections": int(n3d),
        "lesion_fp": n_fp,
        "lesion_threshold": threshold,
    }


def lesion_sensitivity_all(gt: GroundTruth, dets: Detections, m: Matching, threshold: float | None,
                           n_true: int) -> dict:
    """Lesion (3D) sensitivity against every true CMB: the CMBs :func:`lesion_metrics` finds (a slice box
    matched by a detection with score >= ``threshold``) over ``n_true``, all true CMBs of the patients
    (``len(DataDir(pre).true_cmbs(split))``), boxed by the label model or not. A CMB the label model left
    without a box has nothing a detection can match, so it counts as missed: a lower bound of the detector's
    sensitivity to every CMB. Returns ``lesion_sensitivity_all``, ``lesion_tp``, ``n_true_cmbs`` and
    ``n_unboxed`` (``n_true`` minus the boxed lesions of ``gt``); ``ValueError`` when ``n_true`` is below
    those."""
    if n_true < gt.n_lesions:
        raise ValueError(f"n_true={n_true} true CMBs: fewer than the split's {gt.n_lesions} boxed lesions")
    tp = lesion_metrics(gt, dets, m, threshold)["lesion_tp"]
    return {"lesion_sensitivity_all": tp / n_true if n_true else float("nan"), "lesion_tp": tp,
            "n_true_cmbs": int(n_true), "n_unboxed": int(n_true - gt.n_lesions)}


@dataclass(frozen=True)
class SliceObjects:
    """Objects on the GT images (``PRE/slice_objects.csv``): image row, kind, xyxy box."""

    image: np.ndarray  # (N,) int64
    kind: np.ndarray  # (N,) str
    boxes: np.ndarray  # (N, 4) float64


def attribute_fps(dets: Detections, fp_mask: np.ndarray, objects: SliceObjects) -> dict[str, int]:
    """Count FP detections by the kind of object they hit on the same slice.

    A FP hits an object when the boxes overlap (positive intersection) or the FP's centre lies in the
    object box; among hits the highest IoU wins (ties: first object). Kinds ``vein, calcification, iron,
    air, cmb``; unknown kinds and FPs hitting nothing count as ``other``. Counts sum to ``fp_mask.sum()``.
    """
    counts = dict.fromkeys(MIMIC_KINDS, 0)
    fp = np.flatnonzero(fp_mask)
    best = np.full(len(fp), -1, dtype=np.int64)
    if len(fp) and len(objects.image):
        a, o = group_pairs(dets.image[fp], objects.image)
        da, ob = dets.boxes[fp[a]], objects.boxes[o]
        hit = _overlap(da, ob) | _centre_in(da, ob)
        a, o, q = a[hit], o[hit], iou_pairs(da[hit], ob[hit])
        srt = np.lexsort((o, -q, a))
        a, o = a[srt], o[srt]
        first = np.append(True, a[1:] != a[:-1]) if len(a) else np.zeros(0, bool)
        best[a[first]] = o[first]
    kinds = np.where(best >= 0, objects.kind[np.maximum(best, 0)] if len(objects.kind) else "", "other")
    for k, c in zip(*np.unique(kinds.astype(str), return_counts=True)):
        key = k if k in counts else "other"
        counts[key] += int(c)
    return counts


SIZE_BINS_MM: tuple[float, ...] = (0.0, 2.0, 3.0, 4.0, 6.0, float("inf"))
"""Edges (mm) of :func:`recall_by_size`'s bins of GT box size (longer side), ``[lo, hi)``."""


def recall_by_size(gt: GroundTruth, m: Matching, bins_mm: tuple[float, ...] = SIZE_BINS_MM,
                   keep: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Sensitivity per bin of GT box size: the box's longer side in mm (``x1 - x0`` times ``dx``,
    ``y1 - y0`` times ``dy`` from ``gt.image_spacing``), bins ``[bins_mm[i], bins_mm[i+1])``.

    A GT box counts as found when ``m`` matched a detection to it (among ``keep``, a boolean mask over
    detections, e.g. ``scores >= t``; all detections by default, i.e. the maximum sensitivity).
    Returns ``edges`` (the bins), ``n`` (GT boxes per bin) and ``recall`` (nan in an empty bin).
    """
    edges = np.asarray(bins_mm, dtype=np.float64)
    if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"bins_mm must be increasing edges, got {bins_mm!r}")
    sp = gt.image_spacing[gt.box_image] if gt.n_gt else np.zeros((0, 2))
    side = np.maximum((gt.boxes[:, 2] - gt.boxes[:, 0]) * sp[:, 1],
                      (gt.boxes[:, 3] - gt.boxes[:, 1]) * sp[:, 0])
    # COCO stores 1e-4 px: a 2-mm side reads back as 1.99997 mm and belongs in [2, 3)
    side = np.round(side, 3)
    found = np.zeros(gt.n_gt, dtype=bool)
    sel = m.gt_of_det >= 0 if keep is None else (m.gt_of_det >= 0) & np.asarray(keep, dtype=bool)
    found[m.gt_of_det[sel]] = True
    b = np.digitize(side, edges) - 1  # bin index; outside [edges[0], edges[-1]) -> -1 or len-1
    nb = len(edges) - 1
    n = np.array([(b == i).sum() for i in range(nb)], dtype=np.int64)
    hit = np.array([(found & (b == i)).sum() for i in range(nb)], dtype=np.float64)
    recall = np.full(nb, np.nan)
    np.divide(hit, n, out=recall, where=n > 0)
    return {"edges": edges, "n": n, "recall": recall}


# ---------------------------------------------------------------- the one-call summary


def summarise(gt: GroundTruth, dets: Detections, m: Matching, target: float = 0.9,
              objects: SliceObjects | None = None) -> tuple[dict, Curve]:
    """All scalar metrics (keys as the ``cmbfe evaluate`` JSON) and the operating-point curve.

    ``sensitivity``/``precision``/``tp``/``fp`` are at the lowest threshold (all detections).
    ``precision_at_sensitivity_<target>`` is the raw precision at the highest threshold reaching the target
    sensitivity and ``fp_per_cmb`` = FP / #CMBs there; if the target is never reached they are 0.0 and
    None. Per-lesion metrics use that threshold (or all detections when it is not reached).
    """
    o = m.order
    s, t = dets.scores[o], m.tp[o]
    c = curve(s, t, gt.n_gt, gt.n_patients, gt.n_images)
    tag = f"{target:g}"
    n_tp = int(m.tp.sum())
    n_det = len(dets.scores)
    out: dict = {
        "n_gt": gt.n_gt, "n_dets": n_det, "n_images": gt.n_images, "n_patients": gt.n_patients,
        "tp": n_tp, "fp": n_det - n_tp,
        "sensitivity": n_tp / gt.n_gt if gt.n_gt else float("nan"),
        "precision": n_tp / n_det if n_det else float("nan"),
        "ap_voc": ap_voc(t, gt.n_gt), "ap_voc07": ap_voc07(t, gt.n_gt), "ap_coco101": ap_coco101(t, gt.n_gt),
    }
    out["f1_best"], out["f1_best_threshold"] = f1_best(c)
    k = operating_point(c, target)
    thr = None if k is None else float(c.threshold[k])
    out[f"threshold_at_sensitivity_{tag}"] = thr
    out[f"precision_at_sensitivity_{tag}"] = 0.0 if k is None else float(c.precision[k])
    out["fp_per_cmb"] = None if k is None else float(c.fp[k] / gt.n_gt)
    out[f"fp_per_scan_at_sensitivity_{tag}"] = None if k is None else float(c.fp_per_scan[k])
    fr = froc(c)
    out["froc"] = {f"{f:g}": float(v) for f, v in zip(FROC_FPS, fr)}
    out["froc_mean"] = float(fr.mean()) if gt.n_gt else float("nan")
    out["froc_per_slice"] = {f"{f:g}": float(v) for f, v in zip(FROC_FPS, froc(c, per="slice"))}
    les = lesion_metrics(gt, dets, m, thr)
    out.update(les)
    out["lesion_at"] = f"sensitivity_{tag}" if thr is not None else "all"
    les_all = lesion_metrics(gt, dets, m, None)
    out["lesion_sensitivity_all"] = les_all["lesion_sensitivity"]
    out["lesion_fp_per_scan_all"] = les_all["lesion_fp_per_scan"]
    if objects is not None:
        fp_all = ~m.tp
        out["fp_attribution"] = {
            f"at_sensitivity_{tag}": (None if thr is None
                                      else attribute_fps(dets, fp_all & (dets.scores >= thr), objects)),
            "all": attribute_fps(dets, fp_all, objects),
        }
    return out, c

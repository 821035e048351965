"""``cmbfe evaluate``: read COCO ground truth + COCO results, validate, compute metrics, write JSON + CSV.

Usage::

    cmbfe evaluate --gt GT.json --dets DETS.json --out METRICS.json [--match iou|centre] [--iou 0.5]
                   [--radius-mm R] [--objects PRE/slice_objects.csv] [--bootstrap N] [--seed S]

Writes ``METRICS.json`` and, next to it, ``pr.csv`` (score, tp, fp, recall, precision,
precision_interp) and ``froc.csv`` (score, tp, fp, fp_per_scan, fp_per_slice, sensitivity), one row
per distinct score threshold. Undefined values (nan) are written as JSON ``null``. Defaults come from
:class:`cmbfe.config.EvalConfig` (``--params``/``--set`` as every stage). All maths is in
:mod:`cmbfe.metrics`; CIs in :mod:`cmbfe.stats`. Bad input raises :class:`cmbfe.io.InputError`
naming the file and the problem.

Notebook API: ``gt = load_gt(path)``, ``dets = load_detections(path, gt)``,
``result = evaluate(gt, dets, match="iou", iou=0.5)`` -> dict with ``metrics``, ``curve``, ``matching``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path
from typing import Any, get_args

import numpy as np

from cmbfe import metrics as M
from cmbfe import stats
from cmbfe.boxes import xywh_to_xyxy
from cmbfe.config import MatchRule, load
from cmbfe.errors import InputError
from cmbfe.utils import atomic_write_json, atomic_write_text, json_safe


def _read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def _numeric_types(types: set[type]) -> bool:
    """All of ``types`` are real numbers (python or numpy), none boolean."""
    return all(issubclass(t, (int, float, np.integer, np.floating)) and not issubclass(t, (bool, np.bool_))
               for t in types)


def _finite_boxes(raw: list, source: str, what: str) -> np.ndarray:
    """Validate a list of xywh boxes: 4 finite numbers each, w >= 0, h >= 0; return xyxy float64."""
    try:
        arr = np.asarray(raw, dtype=np.float64).reshape(len(raw), 4) if raw else np.zeros((0, 4))
    except (TypeError, ValueError):
        for i, b in enumerate(raw):
            if (not isinstance(b, (list, tuple)) or len(b) != 4
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b)):
                raise InputError(f"{source}: {what}[{i}].bbox must be 4 numbers [x, y, w, h], "
                                 f"got {b!r}") from None
        raise InputError(f"{source}: {what} bboxes are malformed") from None
    if not _numeric_types({type(v) for b in raw for v in b}):  # no strings/bools sneaking through numpy
        i = next(k for k, b in enumerate(raw) if not _numeric_types({type(v) for v in b}))
        raise InputError(f"{source}: {what}[{i}].bbox must be 4 numbers [x, y, w, h], got {raw[i]!r}")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise InputError(f"{source}: {what}[{int(np.argmax(bad))}].bbox has NaN/inf values")
    neg = (arr[:, 2] < 0) | (arr[:, 3] < 0)
    if neg.any():
        i = int(np.argmax(neg))
        raise InputError(f"{source}: {what}[{i}].bbox has a negative width or height {raw[i]!r}")
    return xywh_to_xyxy(arr)


def _field(obj: Any, key: str, i: int, what: str, source: str) -> Any:
    if not isinstance(obj, dict):
        raise InputError(f"{source}: {what}[{i}] is not an object")
    try:
        return obj[key]
    except KeyError:
        raise InputError(f"{source}: {what}[{i}] is missing key '{key}'") from None


def gt_from_coco(obj: Any, source: str = "<gt>") -> M.GroundTruth:
    """Validate a COCO GT dict (``docs/design.md`` image fields) and convert it to :class:`GroundTruth`.

    Required: ``images[].id, patient_id, slice_index``; ``annotations[].image_id, bbox``. Optional:
    ``pixel_spacing_mm`` (needed for ``--match centre``), ``lesion_id`` (absent: each box is its own
    lesion). Crowd annotations are rejected.
    """
    if not isinstance(obj, dict):
        raise InputError(f"{source}: COCO ground truth must be a JSON object")
    for key in ("images", "annotations"):
        if not isinstance(obj.get(key), list):
            raise InputError(f"{source}: missing key '{key}' (a list)")
    ids, pats, slices, spacing = [], [], [], []
    for i, im in enumerate(obj["images"]):
        ids.append(_field(im, "id", i, "images", source))
        pats.append(str(_field(im, "patient_id", i, "images", source)))
        slices.append(_field(im, "slice_index", i, "images", source))
        sp = im.get("pixel_spacing_mm", [math.nan, math.nan])
        if not (isinstance(sp, list) and len(sp) == 2 and all(isinstance(v, (int, float)) for v in sp)):
            raise InputError(f"{source}: images[{i}].pixel_spacing_mm must be [dy, dx], got {sp!r}")
        spacing.append(sp)
    for name, vals in (("id", ids), ("slice_index", slices)):
        for i, v in enumerate(vals):
            if isinstance(v, bool) or not isinstance(v, int):
                raise InputError(f"{source}: images[{i}].{name} must be an integer, got {v!r}")
    if len(set(ids)) != len(ids):
        raise InputError(f"{source}: duplicate image ids")
    row = {v: k for k, v in enumerate(ids)}
    patient_ids = tuple(dict.fromkeys(pats))
    prow = {p: k for k, p in enumerate(patient_ids)}
    anns = obj["annotations"]
    a_img, a_box, a_les = [], [], []
    lesion_row: dict[tuple[str, Any], int] = {}
    for i, a in enumerate(anns):
        img = _field(a, "image_id", i, "annotations", source)
        if img not in row:
            raise InputError(f"{source}: annotations[{i}].image_id {img!r} is not an image id")
        if a.get("iscrowd", 0):
            raise InputError(f"{source}: annotations[{i}] is a crowd annotation (not supported)")
        a_img.append(row[img])
        a_box.append(_field(a, "bbox", i, "annotations", source))
        lid = a.get("lesion_id")
        key = (pats[row[img]], ("__ann__", i) if lid is None else str(lid))
        a_les.append(lesion_row.setdefault(key, len(lesion_row)))
    return M.GroundTruth(
        image_ids=np.asarray(ids, dtype=np.int64).reshape(-1),
        image_patient=np.asarray([prow[p] for p in pats], dtype=np.int64).reshape(-1),
        image_slice=np.asarray(slices, dtype=np.int64).reshape(-1),
        image_spacing=np.asarray(spacing, dtype=np.float64).reshape(-1, 2),
        patient_ids=patient_ids,
        boxes=_finite_boxes(a_box, source, "annotations"),
        box_image=np.asarray(a_img, dtype=np.int64).reshape(-1),
        box_lesion=np.asarray(a_les, dtype=np.int64).reshape(-1),
        n_lesions=len(lesion_row),
    )


def dets_from_coco(obj: Any, gt: M.GroundTruth, source: str = "<dets>",
                   categories: set | None = None) -> M.Detections:
    """Validate a COCO results list (``image_id, bbox [x,y,w,h], score``, optional ``category_id``)."""
    if isinstance(obj, dict) and isinstance(obj.get("annotations"), list):
        obj = obj["annotations"]
    if not isinstance(obj, list):
        raise InputError(f"{source}: COCO results must be a JSON list of detections")
    try:  # fast path; on any problem the slow loop below names the first bad entry
        img = [d["image_id"] for d in obj]
        box = [d["bbox"] for d in obj]
        score = [d["score"] for d in obj]
    except (KeyError, TypeError):
        for i, d in enumerate(obj):
            for key in ("image_id", "bbox", "score"):
                _field(d, key, i, "detections", source)
        raise  # pragma: no cover - the loop always raises
    if categories:
        default = next(iter(categories))
        for i, d in enumerate(obj):
            if d.get("category_id", default) not in categories:
                raise InputError(f"{source}: detections[{i}].category_id {d['category_id']!r} "
                                 "is not a GT category")
    row = dict(zip(gt.image_ids.tolist(), range(gt.n_images)))
    try:
        rows = np.fromiter((row[v] for v in img), dtype=np.int64, count=len(img))
    except (KeyError, TypeError):
        i = next(k for k, v in enumerate(img)
                 if isinstance(v, bool) or not isinstance(v, (int, float)) or v not in row)
        raise InputError(f"{source}: detections[{i}].image_id {img[i]!r} is not an image id of the "
                         "GT") from None
    if not _numeric_types(set(map(type, score))):
        i = next(k for k, s in enumerate(score) if not _numeric_types({type(s)}))
        raise InputError(f"{source}: detections[{i}].score must be a number, got {score[i]!r}")
    sc = np.asarray(score, dtype=np.float64).reshape(-1)
    if not np.isfinite(sc).all():
        raise InputError(f"{source}: detections[{int(np.argmax(~np.isfinite(sc)))}].score is NaN/inf")
    return M.Detections(boxes=_finite_boxes(box, source, "detections"), image=rows, scores=sc)


def load_gt(path: str | Path) -> M.GroundTruth:
    """Read and validate a COCO ground-truth JSON file."""
    return gt_from_coco(_read_json(Path(path)), str(path))


def _categories(obj: Any) -> set | None:
    """GT category ids (None when the GT lists none)."""
    cats = obj.get("categories") if isinstance(obj, dict) else None
    if not isinstance(cats, list):
        return None
    return {c.get("id") for c in cats if isinstance(c, dict)} or None


def load_detections(path: str | Path, gt: M.GroundTruth, categories: set | None = None) -> M.Detections:
    """Read and validate a COCO results JSON file against ``gt`` (``category_id`` checked if given)."""
    return dets_from_coco(_read_json(Path(path)), gt, str(path), categories)


def load_slice_objects(path: str | Path, gt: M.GroundTruth) -> M.SliceObjects:
    """Read ``slice_objects.csv`` (patient_id, slice_index, kind, object_id, x0, y0, x1, y1; xyxy pixels).

    Rows on slices that are not GT images are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    need = ("patient_id", "slice_index", "kind", "x0", "y0", "x1", "y1")
    key = {(gt.patient_ids[p], int(s)): k for k, (p, s) in enumerate(zip(gt.image_patient, gt.image_slice))}
    img, kind, box = [], [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path}: missing columns {missing}")
        for n, r in enumerate(reader, start=2):
            try:
                k = key.get((r["patient_id"], int(r["slice_index"])))
                b = [float(r[c]) for c in ("x0", "y0", "x1", "y1")]
            except (TypeError, ValueError):
                raise InputError(f"{path}: line {n}: slice_index/x0/y0/x1/y1 must be numbers") from None
            if not all(math.isfinite(v) for v in b) or b[2] < b[0] or b[3] < b[1]:
                raise InputError(f"{path}: line {n}: box must be finite with x1 >= x0, y1 >= y0")
            if k is not None:
                img.append(k)
                kind.append(r["kind"])
                box.append(b)
    return M.SliceObjects(image=np.asarray(img, dtype=np.int64), kind=np.asarray(kind, dtype=str),
                          boxes=np.asarray(box, dtype=np.float64).reshape(-1, 4))


def evaluate(gt: M.GroundTruth, dets: M.Detections, *, match: str = "iou", iou: float = 0.5,
             radius_mm: float = 2.5, target: float = 0.9, objects: M.SliceObjects | None = None,
             bootstrap: int = 0, seed: int = 0, ci: float = 0.95, slice_mm: float | None = None,
             lesion_threshold: float | None = None) -> dict[str, Any]:
    """Match, summarise and (``bootstrap > 0``) add patient-bootstrap CIs.

    With ``slice_mm`` (the slice spacing, mm) the metrics get ``valdo``: VALDO's lesion metrics
    (:func:`cmbfe.detect.lesion_metrics.valdo_metrics`, centres < 5 mm and < 3 mm) of the 3D detections at
    ``lesion_threshold`` (default: the threshold of the per-lesion metrics, else all detections).
    Returns ``{"metrics": dict, "curve": metrics.Curve, "matching": metrics.Matching}``.
    """
    if match == "centre" and gt.n_gt and not np.isfinite(gt.image_spacing[gt.box_image]).all():
        raise InputError("--match centre needs pixel_spacing_mm on every image with a CMB")
    m = M.match(gt, dets, rule=match, iou=iou, radius_mm=radius_mm)
    out, c = M.summarise(gt, dets, m, target=target, objects=objects)
    out["match"] = {"rule": match, "iou": iou if match == "iou" else None,
                    "radius_mm": radius_mm if match == "centre" else None}
    if bootstrap > 0:
        out["bootstrap"] = stats.bootstrap_ci(stats.prepare(gt, dets, m), n=bootstrap, seed=seed, ci=ci,
                                              target=target)
    if slice_mm is not None:
        out["valdo"] = valdo_summary(gt, dets, slice_mm, lesion_threshold if lesion_threshold is not None
                                     else out.get(f"threshold_at_sensitivity_{target:g}"))
    return {"metrics": out, "curve": c, "matching": m}


def valdo_summary(gt: M.GroundTruth, dets: M.Detections, slice_mm: float, threshold: float | None
                  ) -> dict[str, Any]:
    """VALDO lesion metrics at ``threshold`` (None: all detections) at 5 and 3 mm, per-subject F1 listed."""
    from cmbfe.valdo import lesion_centres_mm, valdo_metrics

    keep = dets.scores >= threshold if threshold is not None else np.ones(len(dets.scores), bool)
    subjects = lesion_centres_mm(gt, dets, keep, slice_mm)
    out: dict[str, Any] = {"threshold": threshold, "slice_mm": slice_mm,
                           "matching": "centres of mass, one-to-one"}
    for d in (5.0, 3.0):
        v = valdo_metrics(subjects, d)
        t = v.pop("subjects")
        out[f"{d:g}mm"] = v | {"f1_by_subject": dict(zip(t["subject"], t["f1"]))}
    return out


def _slice_mm(gt_obj: Any) -> float | None:
    """The slice spacing (mm) the COCO images record (``slice_mm``; the median), or None (no VALDO
    metrics)."""
    vals = [im.get("slice_mm") for im in gt_obj.get("images", []) if isinstance(im, dict)] \
        if isinstance(gt_obj, dict) else []
    vals = [float(v) for v in vals if isinstance(v, (int, float)) and math.isfinite(v) and v > 0]
    return float(np.median(vals)) if vals else None


def _csv(header: list[str], cols: list[np.ndarray]) -> str:
    """CSV text: integer columns as integers, floats with 10 significant digits (nan as ``nan``)."""
    fmt = ",".join("%d" if np.issubdtype(np.asarray(c).dtype, np.integer) else "%.10g" for c in cols)
    rows = zip(*[np.asarray(c).tolist() for c in cols])
    return "\n".join([",".join(header), *[fmt % r for r in rows]]) + "\n"


def write_outputs(result: dict[str, Any], out: Path) -> list[Path]:
    """Write ``out`` (metrics JSON) plus ``pr.csv`` and ``froc.csv`` in its folder, atomically."""
    out = Path(out)
    c: M.Curve = result["curve"]
    pr = out.parent / "pr.csv"
    fr = out.parent / "froc.csv"
    atomic_write_text(pr, _csv(["score", "tp", "fp", "recall", "precision", "precision_interp"],
                               [c.threshold, c.tp, c.fp, c.sensitivity, c.precision, c.precision_interp]))
    atomic_write_text(fr, _csv(["score", "tp", "fp", "fp_per_scan", "fp_per_slice", "sensitivity"],
                               [c.threshold, c.tp, c.fp, c.fp_per_scan, c.fp_per_slice, c.sensitivity]))
    atomic_write_json(out, json_safe(result["metrics"]))
    return [out, pr, fr]


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (see module docstring). Returns 0 on success."""
    ap = argparse.ArgumentParser(prog="cmbfe evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--gt", required=True, type=Path, help="COCO ground-truth JSON")
    ap.add_argument("--dets", required=True, type=Path, help="COCO results JSON")
    ap.add_argument("--out", required=True, type=Path, help="metrics JSON (pr.csv, froc.csv beside it)")
    ap.add_argument("--params", default=None, help="profile name or params YAML (eval section)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--match", choices=get_args(MatchRule), default=None)
    ap.add_argument("--iou", type=float, default=None)
    ap.add_argument("--radius-mm", type=float, default=None)
    ap.add_argument("--objects", type=Path, default=None, help="slice_objects.csv for FP attribution")
    ap.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples (0: none)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--lesion-threshold", type=float, default=None,
                    help="score threshold of the VALDO lesion metrics (default: the per-lesion metrics')")
    args = ap.parse_args(argv)
    flags = {"match": args.match, "iou": args.iou, "radius_mm": args.radius_mm, "bootstrap": args.bootstrap,
             "seed": args.seed}  # the flags are eval.* overrides, checked with the profile at load
    over = [f"eval.{k}={v}" for k, v in flags.items() if v is not None]
    cfg = load(args.params, [*args.overrides, *over]).eval
    match, iou, radius, n_boot, seed = cfg.match, cfg.iou, cfg.radius_mm, cfg.bootstrap, cfg.seed
    t0 = time.perf_counter()
    gt_obj = _read_json(args.gt)
    gt = gt_from_coco(gt_obj, str(args.gt))
    dets = load_detections(args.dets, gt, _categories(gt_obj))
    objects = load_slice_objects(args.objects, gt) if args.objects else None
    slice_mm = _slice_mm(gt_obj)
    res = evaluate(gt, dets, match=match, iou=iou, radius_mm=radius, objects=objects, bootstrap=n_boot,
                   seed=seed, ci=cfg.ci, slice_mm=slice_mm, lesion_threshold=args.lesion_threshold)
    res["metrics"]["inputs"] = {"gt": str(args.gt), "dets": str(args.dets),
                                "objects": str(args.objects) if args.objects else None}
    write_outputs(res, args.out)
    mt = res["metrics"]
    print(f"evaluate: {mt['n_dets']} detections, {mt['n_gt']} CMBs on {mt['n_images']} slices of "
          f"{mt['n_patients']} patients: AP {mt['ap_voc']:.4f}, "
          f"P@S0.9 {mt['precision_at_sensitivity_0.9']:.4f}, "
          f"FROC mean {mt['froc_mean']:.4f} ({time.perf_counter() - t0:.2f} s) -> {args.out}")
    if "valdo" in mt:
        v = mt["valdo"]["5mm"]
        print(f"evaluate: VALDO (centres < 5 mm): median F1 {v['median_f1']:.3f}, FP / subject "
              f"{v['fp_per_subject']:.2f}, sensitivity {v['sensitivity']:.3f}, "
              f"precision {v['precision']:.3f}")
    return 0

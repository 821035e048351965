"""The files ``cmbfe detect`` writes per scan (:data:`OUTPUTS`): the lesion table ``cmbs.csv``
(:func:`cmbfe.detect.pipeline.lesion_table`), the label image ``cmbs_mask.nii.gz`` on the input's own grid,
the slice detections ``detections.json`` (COCO results, :mod:`cmbfe.cocoresults`), ``report.json`` and the
PDF/HTML report (:mod:`cmbfe.detect.report`). Coordinates: see :mod:`cmbfe.detect.pipeline`. No DICOM tag
that could identify a patient is written: patients are named after their folder or file.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from cmbfe.cocoresults import coco_results, write_coco_results
from cmbfe.detect.detector import Detector
from cmbfe.detect.pipeline import ScanResult
from cmbfe.detect.report import RESEARCH_ONLY, burden_bin, render_report
from cmbfe.detect.scans import Grid
from cmbfe.runtime import package_versions
from cmbfe.utils import atomic_write_json, atomic_write_text

OUTPUTS = ("cmbs.csv", "cmbs_mask.nii.gz", "detections.json", "report.json", "report.pdf", "report.html")


def _ellipse(box: np.ndarray, ny: int, nx: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, cols)`` of the pixels in a box's inscribed ellipse, the pixel holding its centre first."""
    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, max((x1 - x0) / 2, 1e-3), max((y1 - y0) / 2, 1e-3)
    i0, i1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), nx)
    j0, j1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), ny)
    jj, ii = np.mgrid[j0:j1, i0:i1]
    inside = ((ii + 0.5 - cx) / rx) ** 2 + ((jj + 0.5 - cy) / ry) ** 2 <= 1.0
    cj, ci = min(max(int(cy), 0), ny - 1), min(max(int(cx), 0), nx - 1)
    return np.append(cj, jj[inside]), np.append(ci, ii[inside])


def label_image(shape: tuple[int, int, int], boxes: np.ndarray, slices: np.ndarray, ids: np.ndarray,
                lesions: list[dict]) -> np.ndarray:
    """``[slice, row, col]`` uint16 label image: each lesion's member boxes as filled ellipses (the box's
    inscribed ellipse; at least the pixel holding its centre), lesion id as value.

    Overlaps go to the higher-scoring lesion, but every lesion keeps at least one voxel: a lesion that the
    others cover completely takes back one of its pixels from a lesion that has more than one (so every row
    of ``cmbs.csv`` has a label in the mask)."""
    lab = np.zeros(shape, np.uint16)
    _, ny, nx = shape
    pixels = {}
    for les in sorted(lesions, key=lambda d: -d["max_score"]):  # best first, never painting over
        pix = [(np.full(len(r), int(slices[d])), r, c) for d in les["members"]
               for r, c in [_ellipse(boxes[d], ny, nx)]]
        k, r, c = (np.concatenate(v) for v in zip(*pix)) if pix else (np.zeros(0, int),) * 3
        pixels[les["lesion_id"]] = (k, r, c)
        free = lab[k, r, c] == 0
        lab[k[free], r[free], c[free]] = les["lesion_id"]
    counts = np.bincount(lab.ravel(), minlength=max((d["lesion_id"] for d in lesions), default=0) + 1)
    for lid, (k, r, c) in pixels.items():
        if counts[lid] or not len(k):
            continue
        owners = lab[k, r, c].astype(np.int64)
        take = int(np.argmax(counts[owners] > 1)) if (counts[owners] > 1).any() else 0
        counts[owners[take]] -= 1
        lab[k[take], r[take], c[take]] = lid
        counts[lid] = 1
    return lab


def write_mask(path: Path, lab_kji: np.ndarray, grid: Grid) -> None:
    """The label image on the input's grid and affine (qform and sform), gzipped NIfTI, atomically."""
    import nibabel as nib

    arr = grid.to_input(lab_kji)
    img = nib.Nifti1Image(arr.astype(np.uint16), grid.affine_ras)
    img.set_qform(grid.affine_ras, code=grid.codes[0])
    img.set_sform(grid.affine_ras, code=grid.codes[1])
    img.header["descrip"] = b"cmbfe detect: CMB labels"
    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    nib.save(img, str(tmp))
    tmp.replace(path)


def model_summary(det: Detector) -> dict[str, Any]:
    """The model facts report.json and the report carry."""
    m = det.cfg.model
    out = {"name": det.name, "path": str(det.path) if det.path else None, "exported": bool(det.meta),
           "architecture": f"SSD-{m.size} {m.backbone}{'-BN' if m.batch_norm else ''} x{m.width:g} width, "
                           f"{m.priors} priors, input {m.input}",
           "fe_in_training": det.cfg.fe.enabled, "training_pixel_mm": det.pixel_spacing_mm,
           "training_matrix": det.matrix, "threshold_rule": det.meta.get("threshold_rule"),
           "test_metrics": det.meta.get("test_metrics"), "source_run": det.meta.get("source_run"),
           "weights_sha256": det.meta.get("weights_sha256")}
    return out


def write_scan_outputs(res: ScanResult, det: Detector, out: Path, *, input_path: str, report: bool = True,
                       extra_timings: dict[str, float] | None = None) -> dict[str, Any]:
    """Write :data:`OUTPUTS` for one scan into ``out`` (an existing folder inside the atomic temp)."""
    t0 = time.perf_counter()
    vol = res.vol
    atomic_write_text(out / "cmbs.csv", res.table.to_csv(index=False))
    lab = label_image(vol.shape, res.boxes, res.slices, res.lesion_of, res.lesions)
    write_mask(out / "cmbs_mask.nii.gz", lab, res.grid)
    nz, ny, nx = vol.shape
    coco = coco_results(res.boxes, res.scores, np.asarray(res.slices) + 1,
                        extra={"slice_index": res.slices, "lesion_id": res.lesion_of})
    write_coco_results(out / "detections.json", coco)
    t1 = time.perf_counter()
    timings = dict(res.timings) | {"write": round(t1 - t0, 3)}
    kept = res.lesion_of > 0
    summary = {
        "created_by": "cmbfe detect", "note": RESEARCH_ONLY,
        "scan": {"name": res.scan.name, "input": input_path, "kind": res.scan.kind, "shape_kji": [nz, ny, nx],
                 "spacing_mm_kji": [round(v, 6) for v in vol.spacing_mm],
                 "affine_lps": np.round(vol.affine, 6).tolist(), "input_grid_shape": list(res.grid.shape),
                 "input_affine_ras": np.round(res.grid.affine_ras, 6).tolist()},
        "counts": {"cmbs": len(res.lesions), "burden_bin": burden_bin(len(res.lesions)),
                   "slices_with_cmb": len(np.unique(res.slices[kept])),
                   "slice_detections_kept": int(kept.sum()), "slice_detections_all": len(res.scores),
                   "slices_inferred": res.info["slices_inferred"], "slices_total": res.info["slices_total"]},
        "threshold": res.threshold, "threshold_source": det.threshold_source,
        "model": model_summary(det), "preprocessing": {
            "n4_iterations": list(det.cfg.preprocess.n4_iterations),
            "n4_shrink": det.cfg.preprocess.n4_shrink,
            "clip_percentiles": list(det.cfg.preprocess.clip_percentiles),
            **{k: v for k, v in res.info.items() if k != "stage2"}},
        "second_stage": res.info.get("stage2"),
        "detections_json": "COCO results: image_id = slice_index + 1 (axial slice k), bbox xywh px, every "
                           "detection of the model; lesion_id 0 = not kept (below the threshold, or a "
                           "candidate the second stage dropped)",
        "coordinates": "i, j, k: voxel of the input grid (= cmbs_mask.nii.gz); LPS = DICOM patient mm; "
                       "RAS = NIfTI scanner mm",
        "timings_s": timings, "versions": package_versions(), "outputs": list(OUTPUTS),
    }
    if det.threshold_source == "fallback":
        summary["warning"] = (f"the model stores no operating threshold; {det.threshold:g} was used "
                              "(pass --threshold)")
    if report:
        t2 = time.perf_counter()
        render_report(res, det, out, summary)
        timings["report"] = round(time.perf_counter() - t2, 3)
    timings |= extra_timings or {}
    timings["total"] = round(sum(v for k, v in timings.items() if k != "total"), 3)
    atomic_write_json(out / "report.json", summary)
    return summary

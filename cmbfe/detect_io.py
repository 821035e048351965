"""Inputs and outputs of ``cmbfe detect``: which scans ``INPUT`` holds, reading one (with the grid it came
on), and writing one scan's results (:data:`OUTPUTS`; the PDF/HTML report is :mod:`cmbfe.detect_report`).

Coordinates: ``i, j, k`` in ``cmbs.csv`` are voxel indices of the input's own grid (NIfTI voxel axes; for
DICOM: column, row and slice sorted along the slice normal), the grid of ``cmbs_mask.nii.gz``;
``x/y/z_lps_mm`` are DICOM patient coordinates, ``x/y/z_ras_mm`` NIfTI/scanner RAS (LPS with x, y negated).
``slice_first``/``slice_last`` and the report tiles use the axial slices the detector saw (``k`` of the
reoriented volume; equal to ``k`` for axial DICOM and axial NIfTI stored inferior to superior).
No DICOM tag that could identify a patient is written: patients are named after their folder or file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cmbfe.detect_report import RESEARCH_ONLY, render_report
from cmbfe.errors import InputError
from cmbfe.runtime import package_versions
from cmbfe.utils import atomic_write_json, atomic_write_text
from cmbfe.volume import Volume

if TYPE_CHECKING:
    from cmbfe.detect import Detector, ScanResult

FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS <-> RAS
OUTPUTS = ("cmbs.csv", "cmbs_mask.nii.gz", "detections.json", "report.json", "report.pdf", "report.html")
CSV_COLUMNS = ["lesion_id", "i", "j", "k", "x_lps_mm", "y_lps_mm", "z_lps_mm", "x_ras_mm", "y_ras_mm",
               "z_ras_mm", "slice_first", "slice_last", "n_slices", "diameter_mm", "max_score"]


# ------------------------------------------------------------------------------------------ inputs
@dataclass
class Scan:
    """One scan to process: output name (folder/file name, never a DICOM tag), kind, path."""

    name: str
    kind: str  # dicom | nifti
    path: Path


def _is_nifti(p: Path) -> bool:
    return p.is_file() and (p.name.endswith(".nii") or p.name.endswith(".nii.gz"))


def _nifti_name(p: Path) -> str:
    stem = p.name.removesuffix(".gz").removesuffix(".nii")
    return stem.split("_")[0] if "_space-" in stem else stem


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _scan_in(folder: Path) -> Scan | None:
    """The single scan a patient folder holds (``dicom/`` sub-folder, DICOM files, or one NIfTI), or None."""
    if (folder / "dicom").is_dir():
        return Scan(folder.name, "dicom", folder / "dicom")
    items = _visible(folder)
    niftis = [p for p in items if _is_nifti(p) and "_CMB." not in p.name]
    if niftis:
        if len(niftis) > 1:
            raise InputError(f"{folder}: {len(niftis)} NIfTI images ({', '.join(p.name for p in niftis[:4])}); "
                             "one scan per patient folder")
        return Scan(folder.name, "nifti", niftis[0])
    files = [p for p in items if p.is_file() and p.name.upper() != "DICOMDIR"]
    return Scan(folder.name, "dicom", folder) if files else None


def find_scans(input_path: str | Path) -> tuple[list[Scan], bool]:
    """(scans, cohort): what ``INPUT`` holds (see the module docstring) and whether it is a folder of patients."""
    from cmbfe.io import find_valdo_pairs

    src = Path(input_path)
    if not src.exists():
        raise InputError(f"{src}: not found")
    if src.is_file():
        if _is_nifti(src):
            return [Scan(_nifti_name(src), "nifti", src)], False
        raise InputError(f"{src}: not a NIfTI file (.nii/.nii.gz); for DICOM pass the series folder")
    pairs = find_valdo_pairs(src)
    if pairs:
        scans = [Scan(sub, "nifti", img) for sub, img, _ in pairs]
        return scans, not (len(scans) == 1 and scans[0].path.parent == src)
    own = _scan_in(src)
    if own is not None and own.kind == "dicom":
        return [Scan(src.name, "dicom", own.path)], False
    niftis = [p for p in _visible(src) if _is_nifti(p) and "_CMB." not in p.name]
    if len(niftis) > 1:  # a folder of NIfTI files: one patient each
        return [Scan(_nifti_name(p), "nifti", p) for p in niftis], True
    if own is not None:
        return [own], False
    scans = []
    for sub in (p for p in _visible(src) if p.is_dir()):
        s = _scan_in(sub)
        if s is None:
            raise InputError(f"{sub}: no DICOM files, dicom/ folder or NIfTI image in this patient folder")
        scans.append(s)
    if not scans:
        raise InputError(f"{src}: empty folder (expected a DICOM series, a NIfTI file or patient folders)")
    names = [s.name for s in scans]
    if len(set(names)) != len(names):
        raise InputError(f"{src}: two patients would get the same output name ({names})")
    return scans, True


@dataclass
class Grid:
    """The input's own voxel grid, for writing a label image there: NIfTI array shape and RAS affine;
    ``ornt`` (NIfTI input) maps the input's axes to the reoriented ones (nibabel orientation)."""

    shape: tuple[int, int, int]
    affine_ras: np.ndarray
    ornt: np.ndarray | None = None
    codes: tuple[int, int] = (1, 1)  # qform, sform codes (1: scanner)

    def to_input(self, lab_kji: np.ndarray) -> np.ndarray:
        """A ``[slice, row, col]`` array of the reoriented volume on the input's grid."""
        xyz = np.ascontiguousarray(np.transpose(lab_kji, (2, 1, 0)))
        if self.ornt is None:
            return xyz
        import nibabel as nib

        inv = np.zeros_like(self.ornt)
        for ax, (out_ax, flip) in enumerate(self.ornt):
            inv[int(out_ax)] = (ax, flip)
        return np.ascontiguousarray(nib.orientations.apply_orientation(xyz, inv))


def read_scan(scan: Scan, *, series_uid: str | None = None, on_bad_file: str = "fail") -> tuple[Volume, Grid]:
    """The scan as a :class:`Volume` (axial slices, LPS affine) and its own grid; InputError naming the file for
    several series, non-image DICOM, a 2D image, NaN voxels."""
    from cmbfe.io import _load_nifti, _to_internal, read_dicom_series

    if scan.kind == "dicom":
        try:
            vol = read_dicom_series(scan.path, series_uid=series_uid, on_bad_file=on_bad_file)
        except InputError as e:
            raise InputError(str(e).replace("choose one with series_uid", "choose one with --series UID")) from None
        vol.patient_id = scan.name
        grid = Grid(vol.shape[::-1], FLIP @ vol.affine)
    else:
        import nibabel as nib

        data, aff = _load_nifti(scan.path)
        if not np.isfinite(data).all():
            raise InputError(f"{scan.path}: image contains NaN/inf values ({int((~np.isfinite(data)).sum())} voxels)")
        vdata, vaff = _to_internal(data, aff)
        vol = Volume(vdata, vaff, scan.name, source=str(scan.path))
        hdr = nib.load(str(scan.path)).header
        codes = (int(hdr["qform_code"]) or 1, int(hdr["sform_code"]) or 1)
        grid = Grid(tuple(data.shape), aff, nib.orientations.io_orientation(FLIP @ aff), codes)
    nz, ny, nx = vol.shape
    if nz < 3 or min(ny, nx) < 16:
        raise InputError(f"{scan.path}: a 2D image ({nz} slice(s) of {ny}x{nx}); cmbfe detect needs a 3D scan "
                         "(>= 3 axial slices of >= 16x16)")
    if float(vol.data.max()) <= float(vol.data.min()):
        raise InputError(f"{scan.path}: constant image (every voxel {float(vol.data.min()):g})")
    return vol, grid


# ------------------------------------------------------------------------------------------ outputs
def label_image(shape: tuple[int, int, int], boxes: np.ndarray, slices: np.ndarray, ids: np.ndarray,
                lesions: list[dict]) -> np.ndarray:
    """``[slice, row, col]`` uint16 label image: each lesion's member boxes as filled ellipses (the box's
    inscribed ellipse; at least the pixel holding its centre), lesion id as value; a higher-scoring lesion
    is drawn last (wins overlaps)."""
    lab = np.zeros(shape, np.uint16)
    _, ny, nx = shape
    for les in sorted(lesions, key=lambda d: d["max_score"]):
        for d in les["members"]:
            x0, y0, x1, y1 = boxes[d]
            k = int(slices[d])
            cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, max((x1 - x0) / 2, 1e-3), max((y1 - y0) / 2, 1e-3)
            i0, i1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), nx)
            j0, j1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), ny)
            jj, ii = np.mgrid[j0:j1, i0:i1]
            inside = ((ii + 0.5 - cx) / rx) ** 2 + ((jj + 0.5 - cy) / ry) ** 2 <= 1.0
            lab[k, j0:j1, i0:i1][inside] = les["lesion_id"]
            lab[k, min(max(int(cy), 0), ny - 1), min(max(int(cx), 0), nx - 1)] = les["lesion_id"]
    return lab


def lesion_table(lesions: list[dict], vol: Volume, grid: Grid) -> pd.DataFrame:
    """``cmbs.csv`` rows (:data:`CSV_COLUMNS`): centres in the input's voxel grid, LPS and RAS mm."""
    rows = []
    to_input = np.linalg.inv(grid.affine_ras) @ FLIP @ vol.affine
    for les in lesions:
        ijk = np.append(np.array(les["centre_vox"], float), 1.0)
        lps = vol.affine @ ijk
        vox = to_input @ ijk
        rows.append([les["lesion_id"], *np.round(vox[:3], 2), *np.round(lps[:3], 2),
                     *np.round((FLIP @ lps)[:3], 2), les["slice_first"], les["slice_last"], les["n_slices"],
                     round(les["diameter_mm"], 2), round(les["max_score"], 4)])
    return pd.DataFrame(rows, columns=CSV_COLUMNS)


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
    coco = [{"image_id": int(k) + 1, "category_id": 1, "slice_index": int(k),
             "bbox": [round(float(b[0]), 3), round(float(b[1]), 3), round(float(b[2] - b[0]), 3),
                      round(float(b[3] - b[1]), 3)], "score": round(float(s), 6), "lesion_id": int(lid)}
            for b, k, s, lid in zip(res.boxes, res.slices, res.scores, res.lesion_of)]
    atomic_write_json(out / "detections.json", coco, indent=None)
    t1 = time.perf_counter()
    timings = dict(res.timings) | {"write": round(t1 - t0, 3)}
    kept = res.lesion_of > 0
    summary = {
        "created_by": "cmbfe detect", "note": RESEARCH_ONLY,
        "scan": {"name": res.scan.name, "input": input_path, "kind": res.scan.kind, "shape_kji": [nz, ny, nx],
                 "spacing_mm_kji": [round(v, 6) for v in vol.spacing_mm],
                 "affine_lps": np.round(vol.affine, 6).tolist(), "input_grid_shape": list(res.grid.shape),
                 "input_affine_ras": np.round(res.grid.affine_ras, 6).tolist()},
        "counts": {"cmbs": len(res.lesions), "slices_with_cmb": len(np.unique(res.slices[kept])),
                   "slice_detections_kept": int(kept.sum()), "slice_detections_all": len(res.scores),
                   "slices_inferred": res.info["slices_inferred"], "slices_total": res.info["slices_total"]},
        "threshold": res.threshold, "threshold_source": det.threshold_source,
        "model": model_summary(det), "preprocessing": {
            "n4_iterations": list(det.cfg.preprocess.n4_iterations), "n4_shrink": det.cfg.preprocess.n4_shrink,
            "clip_percentiles": list(det.cfg.preprocess.clip_percentiles), **res.info},
        "detections_json": "COCO results: image_id = slice_index + 1 (axial slice k), bbox xywh px, every "
                           "detection of the model; lesion_id 0 = below the threshold",
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

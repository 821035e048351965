"""``cmbfe detect``: a scan in, a CMB report out.

Usage::

    cmbfe detect INPUT --out DIR [--model M] [--threshold T] [--device D] [--overwrite] [--series UID]

``INPUT`` is a DICOM series folder (files directly in it, or in ``INPUT/dicom/``), a NIfTI file (any 3D
SWI / T2* magnitude; VALDO names work), or a folder of patients (one sub-folder, NIfTI file or VALDO
subject each: one report folder per patient plus ``DIR/cohort.csv``). Per scan, ``DIR`` (or
``DIR/<patient>/``) gets ``cmbs.csv``, ``cmbs_mask.nii.gz``, ``detections.json``, ``report.json``,
``report.pdf`` and ``report.html`` (see :data:`OUTPUTS`); ``DIR`` is built in a temp sibling and renamed at
the end, so a failed run leaves nothing.

Pipeline (the training code's own functions): read (:mod:`cmbfe.io`), head mask + N4 + percentile
normalisation to 8 bit (:mod:`cmbfe.preprocess`, the model's ``preprocess`` settings), in-plane resampling
to the model's training pixel when the scan's differs by > 2 % (and square ``matrix`` tiles, padded, so the
network input spans what it spanned in training), batched inference on every head slice (``gray3`` or
``2.5d`` as the model was trained), 3D merging of the slice detections kept at the threshold by
:func:`cmbfe.metrics.link_detections` (the linking of the per-lesion metrics).

Coordinates: ``i, j, k`` in ``cmbs.csv`` are voxel indices of the input's own grid (NIfTI voxel axes; for
DICOM: column, row and slice sorted along the slice normal), the grid of ``cmbs_mask.nii.gz``;
``x/y/z_lps_mm`` are DICOM patient coordinates, ``x/y/z_ras_mm`` NIfTI/scanner RAS (LPS with x, y negated).
``slice_first``/``slice_last`` and the report tiles use the axial slices the detector saw (``k`` of the
reoriented volume; equal to ``k`` for axial DICOM and axial NIfTI stored inferior to superior).
No DICOM tag that could identify a patient is written: patients are named after their folder or file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cmbfe import config as C
from cmbfe import metrics as M
from cmbfe.detect_report import RESEARCH_ONLY, render_report
from cmbfe.errors import ConfigError, InputError
from cmbfe.runtime import apply_thread_env, package_versions
from cmbfe.utils import atomic_path, atomic_write_json, atomic_write_text
from cmbfe.volume import Volume

FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS <-> RAS
DEFAULT_MODEL_DIR = C.REPO_ROOT / "models"
OUTPUTS = ("cmbs.csv", "cmbs_mask.nii.gz", "detections.json", "report.json", "report.pdf", "report.html")
CSV_COLUMNS = ["lesion_id", "i", "j", "k", "x_lps_mm", "y_lps_mm", "z_lps_mm", "x_ras_mm", "y_ras_mm",
               "z_ras_mm", "slice_first", "slice_last", "n_slices", "diameter_mm", "max_score"]
COHORT_COLUMNS = ["patient", "input", "kind", "n_cmb", "slices_with_cmb", "max_score", "threshold", "seconds",
                  "report"]
RESAMPLE_TOLERANCE = 0.02  # in-plane pixel within 2 % of the training pixel: no resampling
FALLBACK_THRESHOLD = 0.5


# ------------------------------------------------------------------------------------------ the model
@dataclass
class Detector:
    """A loaded detector: the network, its training config, the operating threshold and the model card."""

    model: nn.Module
    cfg: C.Config
    threshold: float
    threshold_source: str  # "model" (stored, chosen on val) | "--threshold" | "fallback"
    meta: dict[str, Any] = field(default_factory=dict)  # detect.json of an exported model ({} for a run)
    path: Path | None = None
    pixel_spacing_mm: tuple[float, float] | None = None  # (dy, dx) of the training slices
    matrix: int | None = None  # side of the (square) training slices in px
    card: str = ""  # the model card (README.md) text of an exported model

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or (self.path.name if self.path else "model"))


def _training_geometry(cfg: C.Config) -> tuple[tuple[float, float] | None, int | None]:
    """(pixel spacing, matrix) of a run's training slices from its PRE folder, when it is on this machine."""
    path = cfg.pre_path() / "annotations" / "train.json"
    try:
        im = json.loads(path.read_text())["images"][0]
        return (float(im["pixel_spacing_mm"][0]), float(im["pixel_spacing_mm"][1])), int(max(im["width"],
                                                                                              im["height"]))
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None, None


def load_detector(path: str | Path | None = None, *, threshold: float | None = None,
                  device: torch.device | str = "cpu") -> Detector:
    """Load an exported model (``models/``: ``model.pt``, ``config.yaml``, ``detect.json``, ``README.md``) or
    any training run folder (``config.yaml`` + ``model.pt``; a ``.pt`` file stands for its folder).

    ``threshold`` overrides the stored one; a run folder without one uses 0.5 (``threshold_source``
    ``fallback``, the report says so). Errors (InputError / ConfigError, one line): missing files, weights
    that do not load, weights that do not match the config.
    """
    from cmbfe.models import build_model

    folder = Path(path) if path is not None else DEFAULT_MODEL_DIR
    if folder.is_file():
        if folder.suffix != ".pt":
            raise InputError(f"{folder}: not a model (--model takes a model folder, a run folder or its .pt file)")
        weights, folder = folder, folder.parent
    else:
        weights = folder / "model.pt"
    cfg_path = folder / "config.yaml"
    if not folder.is_dir() or not weights.is_file() or not cfg_path.is_file():
        what = "model.pt" if not weights.is_file() else "config.yaml"
        hint = (" (no model is shipped until `make reproduce` exports one; pass --model RUN_FOLDER)"
                if path is None else "")
        raise InputError(f"{folder}: {what} not found; not a model or training run folder{hint}")
    cfg = C.load(cfg_path)
    meta: dict[str, Any] = {}
    if (folder / "detect.json").is_file():
        try:
            meta = json.loads((folder / "detect.json").read_text())
        except ValueError as e:
            raise InputError(f"{folder / 'detect.json'}: not valid JSON ({e})") from None
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a corrupt or foreign file
        raise InputError(f"{weights}: cannot be loaded as PyTorch weights ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a training checkpoint
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise InputError(f"{weights}: not a state dict of tensors")
    try:
        model = build_model(cfg.model, cfg.fe)
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()
        detail = "; ".join(s.strip() for s in first[:3])
        raise InputError(f"{weights}: weights do not match {cfg_path.name} ({detail[:400]})") from None
    model.to(device).eval()
    if torch.device(device).type == "cpu":
        model.to(memory_format=torch.channels_last)  # ~25 % faster convolutions on CPU (oneDNN)
    spacing, matrix = None, None
    if meta.get("training_data", {}).get("pixel_spacing_mm"):
        td = meta["training_data"]
        spacing, matrix = tuple(float(v) for v in td["pixel_spacing_mm"]), int(td["matrix"])
    else:
        spacing, matrix = _training_geometry(cfg)
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"--threshold must be in [0, 1], got {threshold}")
        thr, src = float(threshold), "--threshold"
    elif meta.get("threshold") is not None:
        thr, src = float(meta["threshold"]), "model"
    else:
        thr, src = FALLBACK_THRESHOLD, "fallback"
    card = (folder / "README.md").read_text() if meta and (folder / "README.md").is_file() else ""
    return Detector(model, cfg, thr, src, meta, folder, spacing, matrix, card)  # type: ignore[arg-type]


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


# ------------------------------------------------------------------------------------------ preprocessing
def preprocess_volume(vol: Volume, pcfg: C.PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """8-bit slices exactly as ``cmbfe preprocess`` writes them (head mask, N4, percentile clip) and the
    per-slice "brain slice" flags (head mask covers >= ``brain_min_fraction``)."""
    from cmbfe.preprocess import head_mask, n4, normalise

    mask = head_mask(vol.data)
    corrected = n4(vol.data, vol.spacing_mm, pcfg.n4_iterations, pcfg.n4_shrink, mask=mask)
    u8 = normalise(corrected, mask, pcfg.clip_percentiles)
    return u8, mask.mean(axis=(1, 2)) >= pcfg.brain_min_fraction


def _tile_starts(length: int, tile: int) -> list[int]:
    if length <= tile:
        return [0]
    n = math.ceil((length - tile) / (tile // 2)) + 1
    return sorted({round(v) for v in np.linspace(0, length - tile, n)})


@torch.inference_mode()
def infer(det: Detector, u8: np.ndarray, slices: list[int], spacing_yx: tuple[float, float], *,
          batch_size: int = 8, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                              dict]:
    """Slice detections ``(boxes xyxy px of the slice, slice index, score)`` over ``slices`` of ``u8``.

    Slices are resampled in-plane to the detector's training pixel (if known and > 2 % off) and cut into
    square tiles of its training matrix (padded; overlapping tiles when larger, merged by NMS), so that the
    network sees what it saw in training. Returns also a record of what was done.
    """
    import torch.nn.functional as F
    from torchvision.ops import batched_nms

    nz, ny, nx = u8.shape
    scale = np.array([1.0, 1.0])  # (y, x) resampled px per input px
    if det.pixel_spacing_mm is not None:
        s = np.array(spacing_yx, float) / np.array(det.pixel_spacing_mm, float)
        if np.abs(s - 1).max() > RESAMPLE_TOLERANCE:
            scale = s
    ry, rx = max(1, round(ny * scale[0])), max(1, round(nx * scale[1]))
    side = det.matrix or max(ry, rx)
    starts = [(x0, y0) for y0 in _tile_starts(ry, side) for x0 in _tile_starts(rx, side)]
    two5 = det.cfg.model.input == "2.5d"
    vol = torch.from_numpy(u8)
    items: list[tuple[int, int, int]] = [(k, x0, y0) for k in slices for x0, y0 in starts]
    boxes, ks, scores = [], [], []
    model = det.model.to(device).eval()
    last: tuple[int, torch.Tensor] | None = None
    for b in range(0, len(items), batch_size):
        chunk = items[b:b + batch_size]
        ims = []
        for k, x0, y0 in chunk:
            if last is None or last[0] != k:
                zs = [min(max(z, 0), nz - 1) for z in (k - 1, k, k + 1)] if two5 else [k, k, k]
                im = vol[zs].float().div_(255.0)
                if (ry, rx) != (ny, nx):
                    im = F.interpolate(im[None], size=(ry, rx), mode="bilinear", align_corners=False,
                                       antialias=True)[0].clamp_(0, 1)
                last = (k, im)
            im = last[1]
            tile = torch.zeros(3, side, side)
            part = im[:, y0:y0 + side, x0:x0 + side]
            tile[:, : part.shape[1], : part.shape[2]] = part
            ims.append(tile.to(device))
        for (k, x0, y0), out in zip(chunk, model(ims)):
            bx = out["boxes"].detach().float().cpu().reshape(-1, 4)
            bx[:, 0::2] = (bx[:, 0::2] + x0).clamp(0, rx) / (rx / nx)
            bx[:, 1::2] = (bx[:, 1::2] + y0).clamp(0, ry) / (ry / ny)
            ok = (bx[:, 2] > bx[:, 0]) & (bx[:, 3] > bx[:, 1])
            boxes.append(bx[ok])
            scores.append(out["scores"].detach().float().cpu().reshape(-1)[ok])
            ks.append(torch.full((int(ok.sum()),), k, dtype=torch.int64))
    bx = torch.cat(boxes) if boxes else torch.zeros(0, 4)
    sc = torch.cat(scores) if scores else torch.zeros(0)
    kk = torch.cat(ks) if ks else torch.zeros(0, dtype=torch.int64)
    if len(starts) > 1 and len(sc):
        keep = batched_nms(bx, sc, kk, det.cfg.model.nms_thresh)
        keep = torch.cat([keep[kk[keep] == k][: det.cfg.model.detections_per_img] for k in kk[keep].unique()])
        bx, sc, kk = bx[keep], sc[keep], kk[keep]
    order = np.lexsort((-sc.numpy(), kk.numpy()))
    info = {"resampled_to_px": [ry, rx] if (ry, rx) != (ny, nx) else None,
            "scale_yx": [round(float(v), 6) for v in scale], "tile_px": side, "tiles_per_slice": len(starts),
            "input": det.cfg.model.input, "network_px": det.cfg.model.size}
    return bx.numpy()[order].astype(np.float64), kk.numpy()[order], sc.numpy()[order].astype(np.float64), info


# ------------------------------------------------------------------------------------------ 3D lesions
def merge_lesions(boxes: np.ndarray, slices: np.ndarray, scores: np.ndarray, keep: np.ndarray, nz: int,
                  spacing_mm: tuple[float, float, float]) -> tuple[np.ndarray, list[dict]]:
    """Link kept slice detections into 3D lesions (:func:`cmbfe.metrics.link_detections`: adjacent slices,
    overlapping boxes or a centre inside the other box, transitively).

    Returns per-detection lesion ids (1 = highest max score; 0 = not kept) and the lesions: centre (voxel
    of the reoriented volume: box-area-weighted mean of the member boxes' centres), first/last slice,
    in-plane diameter (largest member box, mean of its sides in mm), max score, number of slices.
    """
    _, dy, dx = spacing_mm
    gt = M.GroundTruth(image_ids=np.arange(nz), image_patient=np.zeros(nz, np.int64),
                       image_slice=np.arange(nz), image_spacing=np.tile([dy, dx], (nz, 1)).astype(float),
                       patient_ids=("scan",), boxes=np.zeros((0, 4)), box_image=np.zeros(0, np.int64),
                       box_lesion=np.zeros(0, np.int64), n_lesions=0)
    dets = M.Detections(boxes=np.asarray(boxes, float).reshape(-1, 4), image=np.asarray(slices, np.int64),
                        scores=np.asarray(scores, float))
    comp, n = M.link_detections(gt, dets, np.asarray(keep, bool))
    groups = [np.flatnonzero(comp == c) for c in range(n)]
    groups.sort(key=lambda g: (-float(dets.scores[g].max()), int(dets.image[g].min()), float(dets.boxes[g, 0].min())))
    ids = np.zeros(len(dets.scores), np.int64)
    lesions = []
    for lid, g in enumerate(groups, start=1):
        ids[g] = lid
        b = dets.boxes[g]
        w = np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 1e-6)
        ci = float(np.average((b[:, 0] + b[:, 2]) / 2, weights=w)) - 0.5
        cj = float(np.average((b[:, 1] + b[:, 3]) / 2, weights=w)) - 0.5
        ck = float(np.average(dets.image[g].astype(float), weights=w))
        diam = float(np.max(((b[:, 2] - b[:, 0]) * dx + (b[:, 3] - b[:, 1]) * dy) / 2))
        lesions.append({"lesion_id": lid, "centre_vox": (ci, cj, ck), "slice_first": int(dets.image[g].min()),
                        "slice_last": int(dets.image[g].max()), "n_slices": len(np.unique(dets.image[g])),
                        "diameter_mm": diam, "max_score": float(dets.scores[g].max()), "members": g})
    return ids, lesions


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


# ------------------------------------------------------------------------------------------ one scan
@dataclass
class ScanResult:
    """Everything about one processed scan that the outputs and the report need."""

    scan: Scan
    vol: Volume
    grid: Grid
    u8: np.ndarray
    boxes: np.ndarray
    slices: np.ndarray
    scores: np.ndarray
    lesion_of: np.ndarray  # per detection: lesion id, 0 = below the threshold
    lesions: list[dict]
    table: pd.DataFrame
    threshold: float
    timings: dict[str, float]
    info: dict[str, Any]


def detect_scan(scan: Scan, det: Detector, *, series_uid: str | None = None, on_bad_file: str = "fail",
                batch_size: int = 8, device: torch.device | str = "cpu") -> ScanResult:
    """Read, preprocess, detect and merge one scan (no files written)."""
    t = [time.perf_counter()]
    vol, grid = read_scan(scan, series_uid=series_uid, on_bad_file=on_bad_file)
    t.append(time.perf_counter())
    u8, brain = preprocess_volume(vol, det.cfg.preprocess)
    t.append(time.perf_counter())
    _dz, dy, dx = vol.spacing_mm
    slices = [int(k) for k in np.flatnonzero(brain)]
    boxes, ks, scores, info = infer(det, u8, slices, (dy, dx), batch_size=batch_size, device=device)
    t.append(time.perf_counter())
    keep = scores >= det.threshold
    lesion_of, lesions = merge_lesions(boxes, ks, scores, keep, vol.shape[0], vol.spacing_mm)
    table = lesion_table(lesions, vol, grid)
    t.append(time.perf_counter())
    timings = {name: round(b - a, 3) for name, a, b in zip(("read", "n4", "inference", "merge"), t, t[1:])}
    info |= {"slices_inferred": len(slices), "slices_total": vol.shape[0]}
    return ScanResult(scan, vol, grid, u8, boxes, ks, scores, lesion_of, lesions, table, det.threshold,
                      timings, info)


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
        summary["warning"] = (f"the model stores no operating threshold; {FALLBACK_THRESHOLD} was used "
                              "(pass --threshold)")
    if report:
        t2 = time.perf_counter()
        render_report(res, det, out, summary)
        timings["report"] = round(time.perf_counter() - t2, 3)
    timings |= extra_timings or {}
    timings["total"] = round(sum(v for k, v in timings.items() if k != "total"), 3)
    atomic_write_json(out / "report.json", summary)
    return summary


# ------------------------------------------------------------------------------------------ the command
def run_detect(input_path: str | Path, out_dir: str | Path, *, model: str | Path | Detector | None = None,
               threshold: float | None = None, device: str = "auto", overwrite: bool = False,
               series_uid: str | None = None, on_bad_file: str = "fail", batch_size: int = 8,
               report: bool = True, log: Any = None) -> dict[str, Any]:
    """``cmbfe detect`` as a function: returns ``{"out", "cohort", "scans": [report.json dicts]}``.

    ``model``: a folder/``.pt`` path (default ``models/``) or an already loaded :class:`Detector`.
    """
    from cmbfe.predict import resolve_device

    src, out = Path(input_path).resolve(), Path(out_dir).resolve()
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: exists (use --overwrite to replace it)")
    if src.is_dir() and out.is_relative_to(src):
        raise InputError(f"{out}: output folder must not be inside the input folder {src}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    scans, cohort = find_scans(src)
    if series_uid is not None and (cohort or scans[0].kind != "dicom"):
        raise InputError(f"{src}: --series selects a series in one DICOM folder; INPUT is not one")
    apply_thread_env()
    dev = resolve_device(device)
    t0 = time.perf_counter()
    det = model if isinstance(model, Detector) else load_detector(model, threshold=threshold, device=dev)
    if isinstance(model, Detector) and threshold is not None:
        det.threshold, det.threshold_source = float(threshold), "--threshold"
    load_s = round(time.perf_counter() - t0, 3)
    results = []
    rows = []
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        for n, scan in enumerate(scans):
            ts = time.perf_counter()
            res = detect_scan(scan, det, series_uid=series_uid, on_bad_file=on_bad_file, batch_size=batch_size,
                              device=dev)
            folder = tmp / scan.name if cohort else tmp
            folder.mkdir(parents=True, exist_ok=True)
            rel = scan.path.relative_to(src) if scan.path.is_relative_to(src) else scan.path
            extra = {"load_model": load_s} if n == 0 else {}
            summary = write_scan_outputs(res, det, folder, input_path=str(rel) if cohort else str(src),
                                         report=report, extra_timings=extra)
            results.append(summary)
            rows.append({"patient": scan.name, "input": str(rel), "kind": scan.kind, "n_cmb": len(res.lesions),
                         "slices_with_cmb": summary["counts"]["slices_with_cmb"],
                         "max_score": round(float(res.scores.max()), 4) if len(res.scores) else 0.0,
                         "threshold": det.threshold, "seconds": round(time.perf_counter() - ts, 2),
                         "report": f"{scan.name}/report.html" if cohort else "report.html"})
            if log is not None:
                log(f"{scan.name}: {len(res.lesions)} CMB(s) at threshold {det.threshold:.3g} "
                    f"({time.perf_counter() - ts:.1f} s)")
        if cohort:
            atomic_write_text(tmp / "cohort.csv", pd.DataFrame(rows, columns=COHORT_COLUMNS).to_csv(index=False))
    return {"out": out, "cohort": cohort, "scans": results, "detector": det}


def main(argv: list[str] | None = None) -> int:
    """``cmbfe detect INPUT --out DIR [--model M] [--threshold T] [--device D] [--overwrite] [--series UID]``."""
    ap = argparse.ArgumentParser(prog="cmbfe detect", description=__doc__.split("\n\n")[0].strip("` "))
    ap.add_argument("input", type=Path, help="DICOM series folder, NIfTI file, or folder of patients")
    ap.add_argument("--out", required=True, type=Path, help="report folder to create")
    ap.add_argument("--model", type=Path, default=None,
                    help="exported model folder or training run folder (default: models/)")
    ap.add_argument("--threshold", type=float, default=None, help="score threshold (default: the model's)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    ap.add_argument("--series", default=None, metavar="UID", help="SeriesInstanceUID when a folder holds several")
    ap.add_argument("--on-bad-file", choices=("fail", "skip"), default="fail",
                    help="non-image or unreadable files in a DICOM folder: fail (default) or skip")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-report", action="store_true", help="skip report.pdf / report.html")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. torchvision's antialias notes
        r = run_detect(args.input, args.out, model=args.model, threshold=args.threshold, device=args.device,
                       overwrite=args.overwrite, series_uid=args.series, on_bad_file=args.on_bad_file,
                       batch_size=args.batch_size, report=not args.no_report,
                       log=lambda s: print(f"cmbfe detect: {s}", flush=True))
    n = sum(s["counts"]["cmbs"] for s in r["scans"])
    det: Detector = r["detector"]
    src = {"model": "the model's", "--threshold": "--threshold", "fallback": "fallback"}[det.threshold_source]
    print(f"cmbfe detect: {len(r['scans'])} scan(s), {n} CMB(s), model {det.name}, threshold {det.threshold:.3g} "
          f"({src}), in {time.perf_counter() - t0:.1f} s -> {r['out']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

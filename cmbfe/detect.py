"""``cmbfe detect``: a scan in, a CMB report out.

Usage::

    cmbfe detect INPUT --out DIR [--model M] [--threshold T] [--device D] [--overwrite] [--series UID]

``INPUT`` is a DICOM series folder (files directly in it, or in ``INPUT/dicom/``), a NIfTI file (any 3D
SWI / T2* magnitude; VALDO names work), or a folder of patients (one sub-folder, NIfTI file or VALDO
subject each: one report folder per patient plus ``DIR/cohort.csv``). Per scan, ``DIR`` (or
``DIR/<patient>/``) gets ``cmbs.csv``, ``cmbs_mask.nii.gz``, ``detections.json``, ``report.json``,
``report.pdf`` and ``report.html`` (see :data:`cmbfe.detect_io.OUTPUTS`); ``DIR`` is built in a temp sibling and renamed at
the end, so a failed run leaves nothing.

Pipeline (the training code's own functions): read (:mod:`cmbfe.io`), head mask + N4 + percentile
normalisation to 8 bit (:mod:`cmbfe.preprocess`, the model's ``preprocess`` settings), in-plane resampling
to the model's training pixel when the scan's differs by > 2 % (and square ``matrix`` tiles, padded, so the
network input spans what it spanned in training), batched inference on every head slice (``gray3`` or
``2.5d`` as the model was trained), 3D merging of the slice detections kept at the threshold by
:func:`cmbfe.metrics.link_detections` (the linking of the per-lesion metrics).

Inputs, coordinates and the files written: :mod:`cmbfe.detect_io`; the PDF/HTML report:
:mod:`cmbfe.detect_report`; the shipped model, its threshold and card: :mod:`cmbfe.detect_model`.
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
from cmbfe.detect_io import Grid, Scan, find_scans, lesion_table, read_scan, write_scan_outputs
from cmbfe.errors import ConfigError, InputError
from cmbfe.runtime import apply_thread_env
from cmbfe.utils import atomic_path, atomic_write_text
from cmbfe.volume import Volume

DEFAULT_MODEL_DIR = C.REPO_ROOT / "models"
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

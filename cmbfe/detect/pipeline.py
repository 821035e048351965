"""One scan through the detector: the training code's own functions, in order.

Read (:mod:`cmbfe.detect.scans`), head mask + N4 + percentile normalisation to 8 bit (:mod:`cmbfe.preprocess`,
the model's ``preprocess`` settings), in-plane resampling to the model's training pixel when the scan's
differs by > 2 % (and square ``matrix`` tiles, padded, so the network input spans what it spanned in
training), batched inference on every head slice (``gray3`` or ``2.5d`` as the model was trained), 3D merging
of the slice detections kept at the threshold by :func:`cmbfe.metrics.link_detections` (the linking of the
per-lesion metrics), and the lesion table (:data:`CSV_COLUMNS`). With a second stage
(:mod:`cmbfe.detect.stage2`) the detections are linked at its low candidate threshold and a candidate is kept
when its second-stage probability reaches the operating point's threshold (:func:`apply_stage2`).

Coordinates: ``i, j, k`` in the lesion table are voxel indices of the input's own grid (NIfTI voxel axes; for
DICOM: column, row and slice sorted along the slice normal), the grid of ``cmbs_mask.nii.gz``;
``x/y/z_lps_mm`` are DICOM patient coordinates, ``x/y/z_ras_mm`` NIfTI/scanner RAS (LPS with x, y negated).
``slice_first``/``slice_last`` and slice detections use the axial slices the detector saw (``k`` of the
reoriented volume; equal to ``k`` for axial DICOM and axial NIfTI stored inferior to superior).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from cmbfe import config as C
from cmbfe import metrics as M
from cmbfe.detect.detector import Detector
from cmbfe.detect.scans import FLIP, Grid, Scan, read_scan
from cmbfe.volume import Volume

RESAMPLE_TOLERANCE = 0.02  # in-plane pixel within 2 % of the training pixel: no resampling
CSV_COLUMNS = ["lesion_id", "i", "j", "k", "x_lps_mm", "y_lps_mm", "z_lps_mm", "x_ras_mm", "y_ras_mm",
               "z_ras_mm", "slice_first", "slice_last", "n_slices", "diameter_mm", "max_score",
               "stage2_score"]


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
          batch_size: int = 8, device: torch.device | str = "cpu"
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
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
                  spacing_mm: tuple[float, float, float], *, same_slice: bool = True
                  ) -> tuple[np.ndarray, list[dict]]:
    """Link kept slice detections into 3D lesions (:func:`cmbfe.metrics.link_detections`: the same or
    adjacent slices, overlapping boxes or a centre inside the other box, transitively).

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
    comp, n = M.link_detections(gt, dets, np.asarray(keep, bool), same_slice=same_slice)
    groups = [np.flatnonzero(comp == c) for c in range(n)]
    groups.sort(key=lambda g: (-float(dets.scores[g].max()), int(dets.image[g].min()),
                               float(dets.boxes[g, 0].min())))
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
                     round(les["diameter_mm"], 2), round(les["max_score"], 4),
                     round(les["stage2_score"], 4) if les.get("stage2_score") is not None else None])
    return pd.DataFrame(rows, columns=CSV_COLUMNS)


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
    st = det.stage2
    keep = scores >= (st.candidate_threshold if st is not None else det.threshold)
    lesion_of, lesions = merge_lesions(boxes, ks, scores, keep, vol.shape[0], vol.spacing_mm)
    t.append(time.perf_counter())
    names = ["read", "n4", "inference", "merge"]
    if st is not None:
        lesion_of, lesions, info["stage2"] = apply_stage2(det, u8, ks, scores, lesion_of, lesions)
        t.append(time.perf_counter())
        names.append("stage2")
    table = lesion_table(lesions, vol, grid)
    t[-1] = time.perf_counter()
    timings = {name: round(b - a, 3) for name, a, b in zip(names, t, t[1:])}
    info |= {"slices_inferred": len(slices), "slices_total": vol.shape[0]}
    return ScanResult(scan, vol, grid, u8, boxes, ks, scores, lesion_of, lesions, table, det.threshold,
                      timings, info)


def apply_stage2(det: Detector, u8: np.ndarray, slices: np.ndarray, scores: np.ndarray, lesion_of: np.ndarray,
                 candidates: list[dict]) -> tuple[np.ndarray, list[dict], dict[str, Any]]:
    """Keep the candidates whose second-stage probability reaches the operating point's threshold.

    Returns per-detection lesion ids (1 = highest probability; 0 = not kept), the kept lesions (with
    ``stage2_score``) and a record (operating point, thresholds, candidates scored)."""
    from cmbfe.detect.stage2 import score_candidates

    st, op = det.stage2, det.operating_point or "balanced"
    thr = st.threshold(op)
    prob = score_candidates(st, u8, scores, slices, candidates)
    order = [n for n in np.argsort(-prob, kind="stable") if prob[n] >= thr]
    ids = np.zeros(len(lesion_of), np.int64)
    kept = []
    for lid, n in enumerate(order, start=1):
        les = dict(candidates[n], lesion_id=lid, stage2_score=float(prob[n]))
        ids[np.asarray(les["members"], np.int64)] = lid
        kept.append(les)
    rec = {"operating_point": op, "threshold": thr, "candidate_threshold": st.candidate_threshold,
           "candidates": len(candidates), "kept": len(kept),
           "rule": st.meta["operating_points"][op].get("rule")}
    return ids, kept, rec

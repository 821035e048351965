"""Label models: which slices a 3D lesion gets a box on, and how large that box is.

Two models, chosen by ``preprocess.labels``:

- ``geometric``: the cross-section of a sphere of the lesion's apparent diameter on every slice it
  crosses (:func:`cmbfe.volume.slice_boxes`). Edge slices give 1-2 px boxes of lesions that are barely
  or not at all visible there.
- ``annotator`` (default): a box where a reader would draw one. On each slice near the lesion the
  rendered signal drop is measured on the image the reader sees (the 8-bit, N4-corrected slice):

  * the slice is smoothed with a Gaussian of sigma 0.7 px (one noisy pixel is no focus);
  * background ``b`` = median of an annulus ``[R + 2, R + 5]`` px around the centre (``R`` = apparent
    radius in px), noise ``s`` = 1.4826 x its median absolute deviation;
  * depth ``d = b - min(core)``, the core being the pixels within ``max(1.5, R / 2)`` px of the centre;
  * **visible** when ``d >= min_contrast * b`` and ``d >= min_snr * s`` (a clear, darker-than-noise focus);
  * the box encloses the connected hypointensity (pixels below ``b - d / 2``, within ``R + 2`` px of the
    centre, 8-connected to the darkest core pixel), i.e. the full width at half depth of the dip;
  * no side below ``min_side_mm`` (2 mm, the lower bound of the CMB definition): a smaller side is
    widened about its centre; boxes are clipped to the image.

Lesions that carry explicit per-slice boxes (from a mask, e.g. VALDO) keep them: a mask already is an
annotation. Boxes are ``xyxy`` in continuous pixel coordinates (pixel ``(j, i)`` covers
``[i, i+1) x [j, j+1)``); the lesion centre ``(i, j, k)`` is in voxel coordinates (centres at integers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import numpy as np
from scipy import ndimage

from cmbfe.config import LabelModel
from cmbfe.volume import Lesion, slice_boxes

Box = tuple[float, float, float, float]
LABEL_MODELS: tuple[str, ...] = get_args(LabelModel)
SMOOTH_PX = 0.7  # Gaussian sigma (px) applied before measuring, so that one noisy pixel is not a focus


@dataclass(frozen=True)
class AnnotatorRule:
    """Thresholds of the annotator label model (see the module docstring); lengths in mm."""

    min_contrast: float = 0.3  # signal drop relative to the local background (0.2 marks faint smears)
    min_snr: float = 3.0  # signal drop relative to the background's robust noise
    min_side_mm: float = 2.0
    extra_slices: int = 1  # slices beyond the geometric extent that are also examined


def slice_signal(image: np.ndarray, centre_ij: tuple[float, float], radius_px: float) -> dict[str, float]:
    """Signal-drop measures of a focus centred at voxel ``(i, j)`` with apparent radius ``radius_px`` on a
    2D ``image`` [row, col]: ``background``, ``noise``, ``depth`` (background - core minimum) and the box
    (``x0, y0, x1, y1``) of the connected region below half depth (NaN when the focus is off the image)."""
    h, w = image.shape
    ci, cj = centre_ij
    r_out = radius_px + 5.0
    i0, i1 = max(0, int(np.floor(ci - r_out))), min(w, int(np.ceil(ci + r_out)) + 1)
    j0, j1 = max(0, int(np.floor(cj - r_out))), min(h, int(np.ceil(cj + r_out)) + 1)
    nan = {"background": np.nan, "noise": np.nan, "depth": np.nan, "x0": np.nan, "y0": np.nan,
           "x1": np.nan, "y1": np.nan}
    if i1 <= i0 or j1 <= j0:
        return nan
    patch = ndimage.gaussian_filter(image[j0:j1, i0:i1].astype(np.float64), SMOOTH_PX, mode="nearest")
    jj, ii = np.mgrid[j0:j1, i0:i1]
    d = np.hypot(ii - ci, jj - cj)
    ring = patch[(d >= radius_px + 2.0) & (d <= r_out)]
    core = d <= max(1.5, radius_px / 2.0)
    if ring.size < 4 or not core.any():
        return nan
    bg = float(np.median(ring))
    noise = float(1.4826 * np.median(np.abs(ring - bg)))
    cvals = np.where(core, patch, np.inf)
    jm, im = np.unravel_index(int(np.argmin(cvals)), patch.shape)
    depth = bg - float(patch[jm, im])
    region = (patch < bg - depth / 2.0) & (d <= radius_px + 2.0)
    lab, _ = ndimage.label(region, structure=np.ones((3, 3), bool))
    if depth <= 0 or lab[jm, im] == 0:
        ys, xs = np.array([jm]), np.array([im])
    else:
        ys, xs = np.nonzero(lab == lab[jm, im])
    return {"background": bg, "noise": noise, "depth": depth, "x0": float(i0 + xs.min()),
            "y0": float(j0 + ys.min()), "x1": float(i0 + xs.max() + 1), "y1": float(j0 + ys.max() + 1)}


def _widen(lo: float, hi: float, side: float, limit: float) -> tuple[float, float]:
    """Widen ``[lo, hi]`` about its centre to at least ``side``, shifted (not shrunk) to stay in
    ``[0, limit]``."""
    if hi - lo < side:
        c = (lo + hi) / 2.0
        lo, hi = c - side / 2.0, c + side / 2.0
    if lo < 0:
        lo, hi = 0.0, min(limit, hi - lo)
    if hi > limit:
        lo, hi = max(0.0, lo - (hi - limit)), limit
    return lo, hi


def annotator_boxes(
    data: np.ndarray,
    lesion: Lesion,
    spacing_mm: tuple[float, float, float],
    rule: AnnotatorRule = AnnotatorRule(),
) -> dict[int, Box]:
    """Per-slice boxes of ``lesion`` under the annotator model, measured on ``data`` [slice, row, col] (the
    image the reader sees, e.g. the 8-bit normalised volume). ``{k: (x0, y0, x1, y1)}``, pixels."""
    nz, ny, nx = data.shape
    if lesion.slice_boxes is not None:
        return slice_boxes(lesion, spacing_mm, data.shape)
    dz, dy, dx = spacing_mm
    ci, cj, ck = lesion.centre_vox
    r_mm = lesion.diameter_mm / 2.0
    radius_px = max(r_mm / min(dx, dy), 0.5)
    reach = int(np.ceil(r_mm / dz)) + rule.extra_slices
    side_x, side_y = rule.min_side_mm / dx, rule.min_side_mm / dy
    out: dict[int, Box] = {}
    for k in range(max(0, round(ck) - reach), min(nz - 1, round(ck) + reach) + 1):
        m = slice_signal(data[k], (ci, cj), radius_px)
        if not np.isfinite(m["depth"]) or m["depth"] < rule.min_contrast * m["background"] or \
                m["depth"] < rule.min_snr * max(m["noise"], 1.0):
            continue
        x0, x1 = _widen(m["x0"], m["x1"], side_x, float(nx))
        y0, y1 = _widen(m["y0"], m["y1"], side_y, float(ny))
        out[k] = (x0, y0, x1, y1)
    return out


def lesion_boxes(
    data: np.ndarray,
    objects: list[Lesion],
    spacing_mm: tuple[float, float, float],
    model: str = "annotator",
    rule: AnnotatorRule = AnnotatorRule(),
) -> dict[int, list[tuple[int, Box]]]:
    """Map slice index -> ``[(object id, box)]`` for ``objects`` under label ``model``
    (``data`` is the rendered volume [slice, row, col]; ``geometric`` uses only its shape)."""
    if model not in LABEL_MODELS:
        raise ValueError(f"label model must be one of {LABEL_MODELS}, got {model!r}")
    out: dict[int, list[tuple[int, Box]]] = {}
    for o in objects:
        if model == "geometric":
            boxes = slice_boxes(o, spacing_mm, data.shape)
        else:
            boxes = annotator_boxes(data, o, spacing_mm, rule)
        for k, b in boxes.items():
            out.setdefault(k, []).append((o.lesion_id, b))
    return out

"""The one internal representation of a scan: a volume, its geometry, its patient and its 3D lesions.

Conventions:
- ``Volume.data`` is float32 indexed ``[k, j, i]`` = ``[slice, row, col]``.
- ``Volume.affine`` maps voxel index ``(i, j, k, 1)`` (col, row, slice) to DICOM patient coordinates
  (LPS, mm). ``spacing_mm`` is ``(dz, dy, dx)`` = (slice spacing, row spacing, column spacing).
- A lesion centre is given in voxel coordinates ``(i, j, k)`` (col, row, slice; continuous, voxel
  centres at integers) and its size as a diameter in mm.
- Slice boxes are ``xyxy`` in continuous pixel coordinates where pixel ``(row j, col i)`` covers
  ``[i, i+1) x [j, j+1)``: a lesion centred on voxel centre ``i`` spans ``i + 0.5 -/+ r``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Lesion:
    """A 3D object (a CMB or, with another ``kind``, a mimic).

    ``centre_vox``: (i, j, k) = (col, row, slice), continuous voxel coordinates.
    ``diameter_mm``: apparent (rendered) diameter used for boxes when ``slice_boxes`` is None.
    ``slice_boxes``: optional exact per-slice boxes ``{k: (x0, y0, x1, y1)}`` (e.g. from a mask).
    """

    lesion_id: int
    centre_vox: tuple[float, float, float]
    diameter_mm: float
    kind: str = "cmb"
    location: str = ""
    slice_boxes: dict[int, tuple[float, float, float, float]] | None = None


@dataclass
class Volume:
    """A scan in cmbfe's internal representation (see module docstring for conventions)."""

    data: np.ndarray
    affine: np.ndarray
    patient_id: str
    lesions: list[Lesion] = field(default_factory=list)
    mimics: list[Lesion] = field(default_factory=list)
    source: str = ""

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """(dz, dy, dx) in mm, from the affine's column norms."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(norms[2]), float(norms[1]), float(norms[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    def vox_to_mm(self, ijk: np.ndarray) -> np.ndarray:
        """Voxel (i, j, k) -> patient LPS mm; accepts ``[..., 3]``."""
        ijk = np.asarray(ijk, dtype=float)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def mm_to_vox(self, xyz: np.ndarray) -> np.ndarray:
        """Patient LPS mm -> voxel (i, j, k); accepts ``[..., 3]``."""
        xyz = np.asarray(xyz, dtype=float)
        return (xyz - self.affine[:3, 3]) @ np.linalg.inv(self.affine[:3, :3]).T


def slice_boxes(
    lesion: Lesion, spacing_mm: tuple[float, float, float], shape: tuple[int, int, int], min_px: float = 1.0
) -> dict[int, tuple[float, float, float, float]]:
    """Per-slice ``xyxy`` pixel boxes of a lesion on every slice it crosses.

    With ``lesion.slice_boxes`` set they are returned (clipped). Otherwise the lesion is a sphere of
    ``diameter_mm``: on slice k its cross-section radius is ``sqrt(r^2 - dz^2)`` where dz is the
    distance in mm from the centre to the slice centre; slices whose in-plane extent is below
    ``min_px`` pixels are skipped. Boxes are clipped to the image ``[0, W] x [0, H]``.
    """
    nz, ny, nx = shape
    dz, dy, dx = spacing_mm
    out: dict[int, tuple[float, float, float, float]] = {}

    def clip(b: tuple[float, float, float, float]) -> tuple[float, float, float, float] | None:
        x0, y0, x1, y1 = max(b[0], 0.0), max(b[1], 0.0), min(b[2], float(nx)), min(b[3], float(ny))
        return (x0, y0, x1, y1) if x1 - x0 > 0 and y1 - y0 > 0 else None

    if lesion.slice_boxes is not None:
        for k, b in lesion.slice_boxes.items():
            c = clip(b)
            if c is not None and 0 <= k < nz:
                out[int(k)] = c
        return out
    ci, cj, ck = lesion.centre_vox
    r = lesion.diameter_mm / 2.0
    k_lo = int(np.floor(ck - r / dz)) - 1
    k_hi = int(np.ceil(ck + r / dz)) + 1
    for k in range(max(k_lo, 0), min(k_hi, nz - 1) + 1):
        dist = abs(k - ck) * dz
        if dist >= r:
            continue
        rr = float(np.sqrt(r * r - dist * dist))
        rx, ry = rr / dx, rr / dy
        if 2 * min(rx, ry) < min_px:
            continue
        c = clip((ci + 0.5 - rx, cj + 0.5 - ry, ci + 0.5 + rx, cj + 0.5 + ry))
        if c is not None:
            out[k] = c
    return out


def volume_slice_boxes(
    vol: Volume, kind: str = "cmb", min_px: float = 1.0
) -> dict[int, list[tuple[int, tuple[float, float, float, float]]]]:
    """Map slice index -> list of (lesion_id, xyxy box) for the volume's lesions (``kind='cmb'``) or
    mimics (any other ``kind`` value selects ``vol.mimics`` filtered to that kind, ``'*'`` all mimics)."""
    objs = vol.lesions if kind == "cmb" else [m for m in vol.mimics if kind == "*" or m.kind == kind]
    out: dict[int, list[tuple[int, tuple[float, float, float, float]]]] = {}
    for les in objs:
        for k, b in slice_boxes(les, vol.spacing_mm, vol.shape, min_px).items():
            out.setdefault(k, []).append((les.lesion_id, b))
    return out

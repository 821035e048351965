"""What ``cmbfe detect``'s ``INPUT`` holds (:func:`find_scans`) and reading one scan (:func:`read_scan`) with
the grid it came on (:class:`Grid`, for writing results back onto it).

``INPUT`` is a DICOM series folder (files directly in it, or in ``INPUT/dicom/``), a NIfTI file (VALDO names
work), or a folder of patients (one sub-folder, NIfTI file or VALDO subject each). Scans are named after
their folder or file, never after a DICOM tag that could identify a patient. Voxel axes: the reoriented
:class:`~cmbfe.volume.Volume` is ``[k, j, i]`` (axial slices, LPS affine); :class:`Grid` is the input's own
NIfTI-ordered grid with its RAS affine (:data:`FLIP` maps LPS <-> RAS).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmbfe.errors import InputError
from cmbfe.volume import Volume

FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS <-> RAS


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
            names = ", ".join(p.name for p in niftis[:4])
            raise InputError(f"{folder}: {len(niftis)} NIfTI images ({names}); "
                             "one scan per patient folder")
        return Scan(folder.name, "nifti", niftis[0])
    files = [p for p in items if p.is_file() and p.name.upper() != "DICOMDIR"]
    return Scan(folder.name, "dicom", folder) if files else None


def find_scans(input_path: str | Path) -> tuple[list[Scan], bool]:
    """(scans, cohort): what ``INPUT`` holds (see the module docstring) and whether it is a folder of
    patients."""
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
    """The scan as a :class:`Volume` (axial slices, LPS affine) and its own grid; InputError naming the file
    for several series, non-image DICOM, a 2D image, NaN voxels."""
    from cmbfe.io import _load_nifti, _to_internal, read_dicom_series

    if scan.kind == "dicom":
        try:
            vol = read_dicom_series(scan.path, series_uid=series_uid, on_bad_file=on_bad_file)
        except InputError as e:
            msg = str(e).replace("choose one with series_uid", "choose one with --series UID")
            raise InputError(msg) from None
        vol.patient_id = scan.name
        grid = Grid(vol.shape[::-1], FLIP @ vol.affine)
    else:
        import nibabel as nib

        data, aff = _load_nifti(scan.path)
        if not np.isfinite(data).all():
            bad = int((~np.isfinite(data)).sum())
            raise InputError(f"{scan.path}: image contains NaN/inf values ({bad} voxels)")
        vdata, vaff = _to_internal(data, aff)
        vol = Volume(vdata, vaff, scan.name, source=str(scan.path))
        hdr = nib.load(str(scan.path)).header
        codes = (int(hdr["qform_code"]) or 1, int(hdr["sform_code"]) or 1)
        grid = Grid(tuple(data.shape), aff, nib.orientations.io_orientation(FLIP @ aff), codes)
    nz, ny, nx = vol.shape
    if nz < 3 or min(ny, nx) < 16:
        raise InputError(f"{scan.path}: a 2D image ({nz} slice(s) of {ny}x{nx}); cmbfe detect needs a 3D "
                         "scan (>= 3 axial slices of >= 16x16)")
    if float(vol.data.max()) <= float(vol.data.min()):
        raise InputError(f"{scan.path}: constant image (every voxel {float(vol.data.min()):g})")
    return vol, grid

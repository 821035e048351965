"""Readers of scans and CMB annotations: DICOM series, synthetic patients, VALDO NIfTI pairs, centroid CSVs.

The synthetic cohort's writer is :mod:`cmbfe.dicom_write`.

All readers return :class:`cmbfe.volume.Volume` (data ``[slice, row, col]`` float32, affine
voxel (col, row, slice) -> LPS mm). Bad input raises :class:`InputError` naming the file and problem.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from cmbfe.errors import InputError
from cmbfe.volume import Lesion, Volume

if TYPE_CHECKING:
    import pandas as pd


_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _decoder_hint(ts: pydicom.uid.UID) -> str:
    """pip packages that decode transfer syntax ``ts``."""
    name = ts.name
    if "JPEG-LS" in name:
        return "pylibjpeg + pylibjpeg-libjpeg (or pyjpegls, or python-gdcm)"
    if "2000" in name or "High-Throughput" in name:
        return "pylibjpeg + pylibjpeg-openjpeg (or python-gdcm)"
    if "JPEG" in name:
        return "pylibjpeg + pylibjpeg-libjpeg (or python-gdcm)"
    if "RLE" in name:
        return "pylibjpeg + pylibjpeg-rle"
    return "pylibjpeg with its plugins, or python-gdcm"


def _bad_file(path: Path, problem: str, on_bad_file: str) -> None:
    """Raise for a bad file, or (``on_bad_file='skip'``) warn naming it."""
    if on_bad_file == "skip":
        warnings.warn(f"{path}: {problem}; skipped", stacklevel=3)
        return
    raise InputError(f"{path}: {problem} (on_bad_file='skip' / --on-bad-file skip ignores such files)")


def _decode(path: Path, ds: pydicom.Dataset) -> tuple[np.ndarray | None, str | None, str | None]:
    """(pixels after the modality LUT as float32, decoder-missing message, other problem)."""
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for bad pixel data
        text = str(e)
        if ts is not None and ts.is_compressed and isinstance(e, (RuntimeError, NotImplementedError)) and (
            "missing" in text or "plugin" in text or "decoder" in text
        ):
            return None, (f"{path}: pixel data use the compressed transfer syntax '{ts.name}' ({ts}) and no "
                          f"decoder is installed; install {_decoder_hint(ts)}"), None
        return None, None, f"pixel data cannot be decoded ({type(e).__name__}: {text.splitlines()[0]})"
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return None, None, "multi-frame (Enhanced MR) images are not supported; convert to single-frame first"
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        return None, None, f"{ds.SamplesPerPixel} samples per pixel (colour); a grayscale MR image is needed"
    arr = np.asarray(pydicom.pixels.apply_modality_lut(arr, ds), dtype=np.float32)
    return arr, None, None


def read_dicom_series(
    folder: str | Path, *, series_uid: str | None = None, on_bad_file: str = "fail"
) -> Volume:
    """Read one DICOM series (one file per slice, files directly in ``folder``) into a :class:`Volume`.

    Slices are grouped by SeriesInstanceUID (several series need ``series_uid``), sorted by the
    position of ImagePositionPatient along the slice normal (row cosine x column cosine; not by
    InstanceNumber), and rescaled by the modality LUT (RescaleSlope/Intercept). The affine maps voxel
    (col, row, slice) to LPS mm from ImageOrientationPatient, ImagePositionPatient and PixelSpacing;
    a single slice takes its thickness from SpacingBetweenSlices or SliceThickness.
    ``on_bad_file``: ``"fail"`` raises on a non-DICOM, unreadable or truncated file; ``"skip"`` warns
    naming it and goes on. ``patient_id`` is the PatientID tag (the folder name when empty).
    """
    folder = Path(folder)
    if on_bad_file not in ("fail", "skip"):
        raise ValueError(f"on_bad_file must be 'fail' or 'skip', got {on_bad_file!r}")
    if not folder.is_dir():
        raise InputError(f"{folder}: DICOM folder not found")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR")
    good: list[tuple[Path, pydicom.Dataset, np.ndarray | None, str | None]] = []
    for p in files:
        try:
            ds = pydicom.dcmread(p)
        except InvalidDicomError:
            _bad_file(p, "not a DICOM file", on_bad_file)
            continue
        except Exception as e:  # noqa: BLE001 - truncated headers raise EOFError, OSError, ValueError...
            _bad_file(p, f"unreadable DICOM file ({type(e).__name__}: {e})", on_bad_file)
            continue
        if not any(t in ds for t in _PIXEL_TAGS):
            _bad_file(p, "DICOM file without pixel data", on_bad_file)
            continue
        arr, missing_decoder, problem = _decode(p, ds)
        if problem is not None:
            _bad_file(p, problem, on_bad_file)
            continue
        good.append((p, ds, arr, missing_decoder))
    if not good:
        raise InputError(f"{folder}: no readable DICOM image files ({len(files)} file(s) looked at)")
    groups: dict[str, list[tuple[Path, pydicom.Dataset, np.ndarray | None, str | None]]] = {}
    for g in good:
        groups.setdefault(str(g[1].get("SeriesInstanceUID", "")), []).append(g)
    if series_uid is not None:
        if series_uid not in groups:
            raise InputError(f"{folder}: series {series_uid} not found (series present: {', '.join(groups)})")
        chosen = groups[series_uid]
    elif len(groups) > 1:
        desc = "; ".join(f"{uid} ({str(v[0][1].get('SeriesDescription', '')) or 'no description'}, "
                         f"{len(v)} files)" for uid, v in groups.items())
        raise InputError(f"{folder}: {len(groups)} series mixed in one folder: {desc}; "
                         "choose one with series_uid")
    else:
        chosen = next(iter(groups.values()))
    for _, _, _, missing in chosen:
        if missing is not None:
            raise InputError(missing)
    return _assemble(folder, chosen)


def _geometry_of(p: Path, ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(IOP [6], IPP [3], PixelSpacing [row, col]) as float arrays; InputError naming a missing tag."""
    out = []
    for tag, n in (("ImageOrientationPatient", 6), ("ImagePositionPatient", 3), ("PixelSpacing", 2)):
        v = ds.get(tag)
        if v is None or len(v) != n:
            raise InputError(f"{p}: {tag} missing or malformed ({v!r}); slice geometry is unknown")
        out.append(np.array([float(x) for x in v]))
    return out[0], out[1], out[2]


def _assemble(folder: Path, chosen: list) -> Volume:
    """Check the chosen slices' geometry, sort them, stack pixels and build the affine."""
    p0, ds0, a0, _ = chosen[0]
    iop0, _, ps0 = _geometry_of(p0, ds0)
    row_cos, col_cos = iop0[:3], iop0[3:]
    normal = np.cross(row_cos, col_cos)
    items = []
    for p, ds, arr, _ in chosen:
        iop, ipp, ps = _geometry_of(p, ds)
        if arr.shape != a0.shape:
            raise InputError(f"{p}: slice is {arr.shape[0]}x{arr.shape[1]} (rows x columns) but {p0.name} is "
                             f"{a0.shape[0]}x{a0.shape[1]}; slices of different sizes in one series")
        if not np.allclose(iop, iop0, atol=1e-4):
            raise InputError(f"{p}: ImageOrientationPatient {iop.tolist()} differs from {p0.name}'s "
                             f"{iop0.tolist()}; inconsistent orientation within the series")
        if not np.allclose(ps, ps0, atol=1e-4):
            raise InputError(f"{p}: PixelSpacing {ps.tolist()} differs from {p0.name}'s {ps0.tolist()}")
        if not np.isfinite(arr).all():
            raise InputError(f"{p}: pixel data contain NaN/inf values")
        items.append((float(np.dot(ipp, normal)), p, ipp, arr))
    items.sort(key=lambda t: t[0])
    pos = np.array([t[0] for t in items])
    if len(items) > 1:
        d = np.diff(pos)
        if d.min() < 1e-3:
            i = int(np.argmin(d))
            raise InputError(f"{items[i + 1][1]}: same slice position as {items[i][1].name} "
                             "(repeated acquisitions or echoes in one series?)")
        if d.max() - d.min() > max(0.01, 0.01 * d.mean()):
            raise InputError(f"{folder}: non-uniform slice spacing ({d.min():.4g} to {d.max():.4g} mm; "
                             "missing or skipped slices?)")
        step = (items[-1][2] - items[0][2]) / (len(items) - 1)
    else:
        thick = ds0.get("SpacingBetweenSlices") or ds0.get("SliceThickness")
        if thick is None or float(thick) <= 0:
            warnings.warn(f"{p0}: single slice without SliceThickness; assuming 1 mm", stacklevel=2)
            thick = 1.0
        step = normal * float(thick)
    affine = np.eye(4)
    affine[:3, 0] = row_cos * ps0[1]
    affine[:3, 1] = col_cos * ps0[0]
    affine[:3, 2] = step
    affine[:3, 3] = items[0][2]
    data = np.stack([t[3] for t in items]).astype(np.float32)
    pid = str(ds0.get("PatientID", "") or "") or folder.name
    return Volume(data, affine, pid, source=str(folder))


def _read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """Read a CSV with pandas; InputError naming the file for a missing file, bad format or columns."""
    import pandas as pd

    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        df = pd.read_csv(path)
    except Exception as e:  # noqa: BLE001 - pandas parser errors
        raise InputError(f"{path}: not a readable CSV ({type(e).__name__}: {e})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        found = ", ".join(map(str, df.columns))
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (found: {found})")
    return df


def _objects_from_csv(path: Path, vol: Volume, id_col: str, default_kind: str) -> list[Lesion]:
    """Lesions/mimics from a ``lesions.csv``/``mimics.csv`` (design.md columns), in row order.

    The centre is taken from ``x_mm, y_mm, z_mm`` (LPS) through the volume's affine when present (robust
    to the reader's slice order), else from ``i, j, k``; a disagreement over 0.5 voxel is warned about.
    """
    df = _read_csv(path, (id_col, "i", "j", "k", "diameter_mm"))
    out = []
    shape = np.array(vol.shape[::-1], float)  # (nx, ny, nz)
    has_mm = all(c in df.columns for c in ("x_mm", "y_mm", "z_mm"))
    worst = 0.0
    for n, row in enumerate(df.to_dict("records")):
        where = f"{path}: row {n + 1} (line {n + 2})"
        try:
            ijk = np.array([float(row["i"]), float(row["j"]), float(row["k"])])
            diam = float(row["diameter_mm"])
            if has_mm:
                mm = np.array([float(row["x_mm"]), float(row["y_mm"]), float(row["z_mm"])])
        except (TypeError, ValueError):
            raise InputError(f"{where}: non-numeric coordinates or diameter") from None
        if has_mm:
            from_mm = vol.mm_to_vox(mm)
            if np.isfinite(from_mm).all():
                worst = max(worst, float(np.abs(from_mm - ijk).max()))
                ijk = from_mm
        if not (np.isfinite(ijk).all() and np.isfinite(diam) and diam > 0):
            raise InputError(f"{where}: NaN/inf coordinates or a non-positive diameter")
        if ((ijk < -0.5) | (ijk > shape - 0.5)).any():
            raise InputError(f"{where}: centre (i, j, k) = {np.round(ijk, 2).tolist()} is outside the volume "
                             f"(nx, ny, nz) = {vol.shape[::-1]}")
        kind = row.get("kind")
        loc = row.get("location")
        out.append(Lesion(int(row[id_col]), (float(ijk[0]), float(ijk[1]), float(ijk[2])), diam,
                          kind=str(kind) if isinstance(kind, str) and kind else default_kind,
                          location=str(loc) if isinstance(loc, str) else ""))
    if worst > 0.5:
        warnings.warn(f"{path}: i, j, k differ from x_mm, y_mm, z_mm by up to {worst:.2f} voxel; "
                      "the mm positions were used", stacklevel=2)
    return out


def load_patient(folder: str | Path, *, on_bad_file: str = "fail") -> Volume:
    """Read a patient of the synthetic layout: ``folder/dicom/*.dcm`` + ``lesions.csv`` (required) +
    ``mimics.csv`` (optional). Lesions/mimics keep their CSV row order and ids."""
    folder = Path(folder)
    vol = read_dicom_series(folder / "dicom", on_bad_file=on_bad_file)
    vol.lesions = _objects_from_csv(folder / "lesions.csv", vol, "lesion_id", "cmb")
    if (folder / "mimics.csv").exists():
        vol.mimics = _objects_from_csv(folder / "mimics.csv", vol, "mimic_id", "mimic")
    vol.source = str(folder)
    return vol


def _load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(data float32 3D, RAS affine) of a NIfTI file; InputError naming the file on failure."""
    import nibabel as nib

    if not Path(path).is_file():
        raise InputError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as e:  # noqa: BLE001 - nibabel raises several types for bad files
        raise InputError(f"{path}: not a readable NIfTI image ({type(e).__name__}: {e})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path}: expected a 3D image, got shape {data.shape}")
    return data, np.asarray(img.affine, float)


def _to_internal(data: np.ndarray, affine_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient NIfTI (x, y, z) data to ``[slice, row, col]`` with voxel axes closest to +L, +P, +S."""
    import nibabel as nib

    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_ras
    ornt = nib.orientations.io_orientation(lps)
    arr = nib.orientations.apply_orientation(data, ornt)
    aff = lps @ nib.orientations.inv_ornt_aff(ornt, data.shape)
    return np.ascontiguousarray(np.transpose(arr, (2, 1, 0)), dtype=np.float32), aff


def mask_lesions(mask: np.ndarray, spacing_mm: tuple[float, float, float]) -> list[Lesion]:
    """CMBs from a boolean mask ``[slice, row, col]``: 26-connected components, centre = centroid
    (voxel i, j, k), diameter = equivalent-sphere diameter in mm, exact per-slice xyxy boxes."""
    from scipy import ndimage

    lab, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    dz, dy, dx = spacing_mm
    out = []
    for idx, sl in enumerate(ndimage.find_objects(lab), start=1):
        kk, jj, ii = np.nonzero(lab[sl] == idx)
        kk, jj, ii = kk + sl[0].start, jj + sl[1].start, ii + sl[2].start
        boxes = {}
        for k in np.unique(kk):
            s = kk == k
            i_s, j_s = ii[s], jj[s]
            boxes[int(k)] = (float(i_s.min()), float(j_s.min()), float(i_s.max() + 1), float(j_s.max() + 1))
        diam = float((6.0 * len(ii) * dx * dy * dz / np.pi) ** (1.0 / 3.0))
        centre = (float(ii.mean()), float(jj.mean()), float(kk.mean()))
        out.append(Lesion(idx, centre, diam, slice_boxes=boxes))
    return out


def read_valdo(image_path: str | Path, mask_path: str | Path | None, *, patient_id: str | None = None,
               allow_empty: bool = False) -> Volume:
    """Read a VALDO-style pair (image ``sub-XXX_space-T2S_desc-masked_T2S.nii.gz``, mask
    ``sub-XXX_space-T2S_CMB.nii.gz``).

    The image is reoriented to cmbfe's convention (axial slices, voxel axes towards +L, +P, +S; the
    NIfTI RAS affine becomes LPS by ``diag(-1, -1, 1, 1)``). Lesions are the mask's 26-connected
    components (:func:`mask_lesions`). ``mask_path=None`` reads the image only. Errors (InputError):
    image/mask shape or affine mismatch, non-binary mask, NaN/inf, and an empty mask unless ``allow_empty``.
    """
    image_path = Path(image_path)
    data, aff = _load_nifti(image_path)
    if not np.isfinite(data).all():
        raise InputError(f"{image_path}: image contains NaN/inf values")
    vdata, vaff = _to_internal(data, aff)
    pid = patient_id or image_path.name.split("_")[0].removesuffix(".nii.gz").removesuffix(".nii")
    vol = Volume(vdata, vaff, pid, source=str(image_path))
    if mask_path is None:
        return vol
    mask_path = Path(mask_path)
    mdata, maff = _load_nifti(mask_path)
    if mdata.shape != data.shape:
        raise InputError(f"{mask_path}: mask shape {mdata.shape} differs from image shape {data.shape} "
                         f"({image_path.name})")
    if not np.allclose(maff, aff, atol=1e-3):
        raise InputError(f"{mask_path}: mask affine differs from the image's ({image_path.name})")
    bad = ~((mdata == 0) | (mdata == 1))
    if bad.any():
        vals = np.unique(mdata[bad])[:5]
        raise InputError(f"{mask_path}: mask is not binary (values such as {vals.tolist()} besides 0 and 1)")
    mask, _ = _to_internal(mdata, maff)
    if not mask.any():
        if not allow_empty:
            raise InputError(f"{mask_path}: mask is empty (no CMB voxel); "
                             "pass allow_empty=True for a CMB-free scan")
        return vol
    vol.lesions = mask_lesions(mask > 0.5, vol.spacing_mm)
    return vol


def find_valdo_pairs(folder: str | Path) -> list[tuple[str, Path, Path | None]]:
    """VALDO subjects under ``folder`` (searched recursively): ``(subject, image, mask or None)``, sorted."""
    out: dict[str, tuple[str, Path, Path | None]] = {}
    for img in sorted(Path(folder).rglob("*_space-T2S_desc-masked_T2S.nii*")):
        if any(part.startswith(".") for part in img.relative_to(folder).parts):
            continue
        sub = img.name.split("_")[0]
        ext = ".nii.gz" if img.name.endswith(".nii.gz") else ".nii"
        mask = img.with_name(f"{sub}_space-T2S_CMB{ext}")
        if sub in out:
            raise InputError(f"{img}: subject {sub} found twice (also {out[sub][1]})")
        out[sub] = (sub, img, mask if mask.is_file() else None)
    return [out[k] for k in sorted(out)]


def read_centroids(csv_path: str | Path, volumes: dict[str, Volume] | None, *, units: str = "vox",
                   default_diameter_mm: float = 5.0, only: str | None = None) -> dict[str, list[Lesion]]:
    """CMB centroids from a CSV (columns ``patient, x, y, z``, optional ``diameter_mm``) as Lesions.

    ``units="vox"``: x, y, z are voxel (col, row, slice) of the Volume; ``"mm"``: LPS mm, converted
    with the patient's affine (needs ``volumes``). With ``volumes``, an unknown patient or a centre
    outside the volume is an InputError naming the row. ``only``: read just that patient's rows (the
    others are still parsed and checked for numbers). Lesion ids count from 1 per patient.
    """
    if units not in ("vox", "mm"):
        raise ValueError(f"units must be 'vox' or 'mm', got {units!r}")
    if units == "mm" and volumes is None:
        raise ValueError("units='mm' needs the volumes (their affines)")
    path = Path(csv_path)
    df = _read_csv(path, ("patient", "x", "y", "z"))
    out: dict[str, list[Lesion]] = {}
    for n, row in enumerate(df.to_dict("records")):
        where = f"{path}: row {n + 1} (line {n + 2})"
        pid = str(row["patient"])
        try:
            xyz = np.array([float(row["x"]), float(row["y"]), float(row["z"])])
            d = row.get("diameter_mm")
            missing = d is None or (isinstance(d, float) and np.isnan(d))
            diam = float(default_diameter_mm) if missing else float(d)
        except (TypeError, ValueError):
            raise InputError(f"{where}: non-numeric x, y, z or diameter_mm") from None
        if not np.isfinite(xyz).all() or not diam > 0:
            raise InputError(f"{where}: NaN/inf coordinates or a non-positive diameter")
        ijk = xyz
        if only is not None and pid != only:
            continue
        if volumes is not None:
            if pid not in volumes:
                known = ", ".join(sorted(volumes)[:5]) + (" ..." if len(volumes) > 5 else "")
                raise InputError(f"{where}: unknown patient {pid!r} (known: {known})")
            vol = volumes[pid]
            if units == "mm":
                ijk = vol.mm_to_vox(xyz)
            lim = np.array(vol.shape[::-1], float) - 0.5
            if ((ijk < -0.5) | (ijk > lim)).any():
                raise InputError(f"{where}: centroid (i, j, k) = {np.round(ijk, 2).tolist()} is outside the "
                                 f"volume of patient {pid} (nx, ny, nz) = {vol.shape[::-1]}")
        les = out.setdefault(pid, [])
        les.append(Lesion(len(les) + 1, (float(ijk[0]), float(ijk[1]), float(ijk[2])), diam))
    return out


__all__ = [
    "InputError",
    "find_valdo_pairs",
    "load_patient",
    "mask_lesions",
    "pydicom",
    "read_centroids",
    "read_dicom_series",
    "read_valdo",
]

"""Tests of cmbfe.io readers: DICOM series, synthetic patients, VALDO NIfTI pairs, centroid CSVs."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from cmbfe.dicom_write import write_dicom_series
from cmbfe.io import (
    InputError,
    find_valdo_pairs,
    load_patient,
    read_centroids,
    read_dicom_series,
    read_valdo,
)
from cmbfe.volume import Lesion, Volume, slice_boxes


def oblique_affine(flip_slices: bool = False) -> np.ndarray:
    """Voxel (col, row, slice) -> LPS with a 20 degree in-plane rotation and anisotropic spacing."""
    t = np.deg2rad(20)
    rot = np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.5, 0.6, -2.0 if flip_slices else 2.0])
    aff[:3, 3] = (-12.0, 7.5, 30.0)
    return aff


def small_volume(nz: int = 5, ny: int = 32, nx: int = 40, pid: str = "P001", integral: bool = True,
                 affine: np.ndarray | None = None) -> Volume:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 4000, (nz, ny, nx)).astype(np.float32)
    if not integral:
        data = data * 0.37 - 50.0
    return Volume(data, oblique_affine() if affine is None else affine, pid)


def write_series(vol: Volume, folder: Path, seed: str = "s") -> Path:
    write_dicom_series(vol, folder, uid_seed=seed)
    return folder


# ---------------------------------------------------------------- DICOM round trip and geometry


@pytest.mark.parametrize("integral", [True, False])
def test_dicom_roundtrip_geometry_and_pixels(tmp_path, integral):
    vol = small_volume(integral=integral)
    back = read_dicom_series(write_series(vol, tmp_path / "d"))
    assert back.shape == vol.shape and back.data.dtype == np.float32
    assert np.allclose(back.affine, vol.affine, atol=1e-4)
    tol = 0 if integral else (vol.data.max() - vol.data.min()) / 4095 / 2 + 1e-3  # rescale quantisation
    assert np.abs(back.data - vol.data).max() <= tol
    assert back.patient_id == "P001"


def test_dicom_sorted_by_position_not_instance_number(tmp_path):
    vol = small_volume(affine=oblique_affine(flip_slices=True))  # slice k runs against the normal
    folder = write_series(vol, tmp_path / "d")
    back = read_dicom_series(folder)
    assert np.array_equal(back.data, vol.data[::-1])  # re-sorted along +normal
    ijk = np.array([[3.0, 4.0, 1.0], [10.0, 2.0, 4.0]])
    flipped = ijk.copy()
    flipped[:, 2] = vol.shape[0] - 1 - ijk[:, 2]
    assert np.allclose(back.vox_to_mm(flipped), vol.vox_to_mm(ijk), atol=1e-3)


def write_patient_csvs(vol: Volume, folder: Path) -> None:
    cols = ["lesion_id", "patient_id", "kind", "location", "i", "j", "k", "x_mm", "y_mm", "z_mm",
            "diameter_mm"]
    for name, objs, id_col in (("lesions.csv", vol.lesions, "lesion_id"),
                               ("mimics.csv", vol.mimics, "mimic_id")):
        rows = [[o.lesion_id, vol.patient_id, o.kind, o.location, *o.centre_vox, *vol.vox_to_mm(o.centre_vox),
                 o.diameter_mm] for o in objs]
        pd.DataFrame(rows, columns=[id_col, *cols[1:]]).to_csv(folder / name, index=False)


@pytest.mark.parametrize("flip", [False, True])
def test_load_patient_preserves_lesion_mm_positions(tmp_path, flip):
    vol = small_volume(affine=oblique_affine(flip_slices=flip))
    vol.lesions = [Lesion(1, (10.0, 12.0, 1.0), 3.0, location="lobar"), Lesion(2, (30.5, 20.0, 3.2), 2.0)]
    vol.mimics = [Lesion(1, (5.0, 5.0, 2.0), 2.5, kind="vein")]
    write_series(vol, tmp_path / "P001" / "dicom")
    write_patient_csvs(vol, tmp_path / "P001")
    with warnings.catch_warnings(record=True):  # the flipped case warns that i, j, k were re-derived
        back = load_patient(tmp_path / "P001")
    for a, b in zip(vol.lesions + vol.mimics, back.lesions + back.mimics):
        assert np.allclose(back.vox_to_mm(b.centre_vox), vol.vox_to_mm(a.centre_vox), atol=1e-3)
        assert (a.lesion_id, a.kind, a.diameter_mm) == (b.lesion_id, b.kind, b.diameter_mm)
    assert back.lesions[0].location == "lobar" and back.mimics[0].kind == "vein"


def test_pydicom_mr_small_spacing(tmp_path):
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "a.dcm")
    vol = read_dicom_series(tmp_path)
    ds = pydicom.dcmread(tmp_path / "a.dcm")
    assert vol.shape == (1, 64, 64)
    assert vol.spacing_mm == pytest.approx((0.8, 0.3125, 0.3125))  # single slice: SliceThickness
    assert np.allclose(vol.affine[:3, 3], [float(v) for v in ds.ImagePositionPatient])
    assert np.array_equal(vol.data[0], ds.pixel_array.astype(np.float32))


# ---------------------------------------------------------------- bad DICOM input


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_dicom_series(tmp_path / "nope")
    with pytest.raises(InputError, match="no readable DICOM"):
        read_dicom_series(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="notes.txt: not a DICOM file"):
        read_dicom_series(tmp_path)
    with pytest.warns(UserWarning, match="notes.txt"), pytest.raises(InputError, match="no readable DICOM"):
        read_dicom_series(tmp_path, on_bad_file="skip")


def test_truncated_file_fail_vs_skip(tmp_path):
    vol = small_volume(nz=4)
    folder = write_series(vol, tmp_path / "d")
    shutil.copy(get_testdata_file("MR_truncated.dcm"), folder / "zz_truncated.dcm")
    with pytest.raises(InputError, match="zz_truncated.dcm: pixel data cannot be decoded"):
        read_dicom_series(folder)
    with pytest.warns(UserWarning, match="zz_truncated.dcm"):
        back = read_dicom_series(folder, on_bad_file="skip")
    assert back.shape == vol.shape


def test_cut_file_fail_vs_skip(tmp_path):
    vol = small_volume(nz=4)
    folder = write_series(vol, tmp_path / "d")
    last = folder / "IM_0004.dcm"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(InputError, match="IM_0004.dcm"):
        read_dicom_series(folder)
    with pytest.warns(UserWarning, match="IM_0004.dcm"):
        back = read_dicom_series(folder, on_bad_file="skip")
    assert np.array_equal(back.data, vol.data[:3])
    # a missing slice in the middle leaves a gap: refused rather than silently mis-placed
    write_series(vol, folder)
    mid = folder / "IM_0002.dcm"
    mid.write_bytes(mid.read_bytes()[:300])
    with pytest.warns(UserWarning), pytest.raises(InputError, match="non-uniform slice spacing"):
        read_dicom_series(folder, on_bad_file="skip")


def test_two_series_mixed(tmp_path):
    a, b = small_volume(nz=3), small_volume(nz=2)
    write_series(a, tmp_path / "a", seed="A")
    write_series(b, tmp_path / "b", seed="B")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in (tmp_path / "a").iterdir():
        shutil.copy(f, mixed / f"a_{f.name}")
    for f in (tmp_path / "b").iterdir():
        shutil.copy(f, mixed / f"b_{f.name}")
    uid_b = pydicom.dcmread(tmp_path / "b" / "IM_0001.dcm").SeriesInstanceUID
    with pytest.raises(InputError, match=f"2 series mixed.*{uid_b}"):
        read_dicom_series(mixed)
    assert read_dicom_series(mixed, series_uid=uid_b).shape == b.shape
    with pytest.raises(InputError, match="not found"):
        read_dicom_series(mixed, series_uid="1.2.3")


def _edit(path: Path, fn) -> None:
    ds = pydicom.dcmread(path)
    fn(ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path)


def test_slices_of_different_sizes(tmp_path):
    folder = write_series(small_volume(nz=3), tmp_path / "d")
    _edit(folder / "IM_0002.dcm",
          lambda ds: ds.set_pixel_data(np.zeros((20, 20), np.uint16), "MONOCHROME2", 16))
    with pytest.raises(InputError, match="IM_0002.dcm.*different sizes"):
        read_dicom_series(folder)


def test_inconsistent_orientation(tmp_path):
    folder = write_series(small_volume(nz=3), tmp_path / "d")

    def tilt(ds):
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    _edit(folder / "IM_0003.dcm", tilt)
    with pytest.raises(InputError, match="IM_0003.dcm.*inconsistent orientation"):
        read_dicom_series(folder)


def test_nan_pixels(tmp_path):
    folder = write_series(small_volume(nz=3), tmp_path / "d")

    def nan_slope(ds):
        ds.RescaleSlope = "NaN"
        ds.RescaleIntercept = "0"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that 'NaN' is not a valid DS
        _edit(folder / "IM_0002.dcm", nan_slope)
        with pytest.raises(InputError, match="IM_0002.dcm: pixel data contain NaN"):
            read_dicom_series(folder)


def test_compressed_without_decoder(tmp_path, monkeypatch):
    src = get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
    shutil.copy(src, tmp_path / "jls.dcm")
    try:
        _ = pydicom.dcmread(src).pixel_array
    except RuntimeError:
        pass  # no JPEG-LS decoder installed: the real situation
    else:  # a decoder is installed here: simulate its absence the way pydicom reports it
        def missing(self):
            raise RuntimeError("Unable to decompress 'JPEG-LS Lossless Image Compression' pixel data because "
                               "all plugins are missing dependencies")
        monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(missing))
    msg = r"jls.dcm: .*JPEG-LS Lossless.*1\.2\.840\.10008\.1\.2\.4\.80.*install pylibjpeg"
    with pytest.raises(InputError, match=msg):
        read_dicom_series(tmp_path)
    with pytest.raises(InputError, match="no decoder"):  # not a "bad file": skipping would hide it
        read_dicom_series(tmp_path, on_bad_file="skip")


# ---------------------------------------------------------------- VALDO NIfTI pairs

NX, NY, NZ = 40, 36, 10


def valdo_pair(folder: Path, sub: str = "sub-101", mask: np.ndarray | None = None,
               image: np.ndarray | None = None) -> tuple[Path, Path]:
    """A VALDO-like pair: RAS affine with x flipped (radiological storage), 0.5 x 0.5 x 2 mm."""
    aff = np.diag([-0.5, 0.5, 2.0, 1.0])
    aff[:3, 3] = (10.0, -9.0, -10.0)
    if image is None:
        image = np.random.default_rng(1).uniform(100, 200, (NX, NY, NZ)).astype(np.float32)
    if mask is None:
        mask = np.zeros((NX, NY, NZ), np.uint8)
        x, y, z = np.mgrid[:NX, :NY, :NZ]
        mask[((x - 20) ** 2 + (y - 10) ** 2 <= 6.25) & (abs(z - 4) <= 1)] = 1  # a disc-stack "sphere"
        mask[30, 30, 7] = mask[31, 31, 8] = 1  # two voxels touching by a corner: one 26-connected lesion
    d = folder / sub / "ses-1"
    d.mkdir(parents=True, exist_ok=True)
    ip, mp = d / f"{sub}_space-T2S_desc-masked_T2S.nii.gz", d / f"{sub}_space-T2S_CMB.nii.gz"
    nib.save(nib.Nifti1Image(image, aff), ip)
    nib.save(nib.Nifti1Image(mask, aff), mp)
    return ip, mp


def test_valdo_boxes_orientation_and_world(tmp_path):
    ip, mp = valdo_pair(tmp_path)
    vol = read_valdo(ip, mp)
    assert vol.patient_id == "sub-101" and vol.shape == (NZ, NY, NX)
    img = nib.load(ip)
    # RAS x flipped in storage -> LPS +x along stored axis 0; y (A) -> P flips rows; z unchanged
    nifti = np.asarray(img.dataobj)
    assert np.allclose(vol.data, np.transpose(nifti, (2, 1, 0))[:, ::-1, :])
    assert vol.spacing_mm == pytest.approx((2.0, 0.5, 0.5))
    assert len(vol.lesions) == 2
    disc, corner = vol.lesions
    j_c = NY - 1 - 10  # row of NIfTI y = 10 after the flip
    assert sorted(disc.slice_boxes) == [3, 4, 5]
    for b in disc.slice_boxes.values():
        assert b == (18.0, j_c - 2.0, 23.0, j_c + 3.0)  # x 18..22 and 5 rows, xyxy exclusive end
    assert slice_boxes(disc, vol.spacing_mm, vol.shape) == disc.slice_boxes
    n_vox = 21 * 3  # 21 voxels within radius 2.5 per slice
    assert disc.diameter_mm == pytest.approx((6 * n_vox * 0.5 * 0.5 * 2.0 / np.pi) ** (1 / 3))
    # the centroid lands on the same world point as in the NIfTI file
    ras = img.affine @ np.array([20.0, 10.0, 4.0, 1.0])
    assert np.allclose(vol.vox_to_mm(disc.centre_vox), [-ras[0], -ras[1], ras[2]], atol=1e-4)
    assert sorted(corner.slice_boxes) == [7, 8]
    assert find_valdo_pairs(tmp_path) == [("sub-101", ip, mp)]


def test_valdo_bad_inputs(tmp_path):
    good_ip, _ = valdo_pair(tmp_path / "a")
    _, small_mask = valdo_pair(tmp_path / "b", mask=np.zeros((NX, NY, NZ - 1), np.uint8))
    with pytest.raises(InputError, match="mask shape .* differs"):
        read_valdo(good_ip, small_mask)
    labels = np.zeros((NX, NY, NZ), np.uint8)
    labels[5, 5, 5], labels[9, 9, 5] = 1, 2
    ip, mp = valdo_pair(tmp_path / "c", mask=labels)
    with pytest.raises(InputError, match="not binary.*2"):
        read_valdo(ip, mp)
    ip, mp = valdo_pair(tmp_path / "d", mask=np.zeros((NX, NY, NZ), np.uint8))
    with pytest.raises(InputError, match="mask is empty"):
        read_valdo(ip, mp)
    assert read_valdo(ip, mp, allow_empty=True).lesions == []
    img = np.ones((NX, NY, NZ), np.float32)
    img[3, 3, 3] = np.nan
    ip, mp = valdo_pair(tmp_path / "e", image=img)
    with pytest.raises(InputError, match="NaN"):
        read_valdo(ip, mp)
    with pytest.raises(InputError, match="not found"):
        read_valdo(tmp_path / "missing.nii.gz", None)


# ---------------------------------------------------------------- centroid CSVs


def test_centroids_to_boxes(tmp_path):
    vol = small_volume(nz=6, affine=np.diag([0.5, 0.5, 2.0, 1.0]))
    csv = tmp_path / "c.csv"
    pd.DataFrame({"patient": ["P001", "P001"], "x": [10.0, 20.0], "y": [12.0, 5.0], "z": [2.0, 4.0],
                  "diameter_mm": [4.0, np.nan]}).to_csv(csv, index=False)
    les = read_centroids(csv, {"P001": vol}, default_diameter_mm=3.0)["P001"]
    assert [x.lesion_id for x in les] == [1, 2] and [x.diameter_mm for x in les] == [4.0, 3.0]
    assert slice_boxes(les[0], vol.spacing_mm, vol.shape) == {2: (6.5, 8.5, 14.5, 16.5)}
    mm = tmp_path / "mm.csv"
    xyz = vol.vox_to_mm([10.0, 12.0, 2.0])
    pd.DataFrame({"patient": ["P001"], "x": [xyz[0]], "y": [xyz[1]], "z": [xyz[2]]}).to_csv(mm, index=False)
    assert read_centroids(mm, {"P001": vol}, units="mm")["P001"][0].centre_vox == pytest.approx((10, 12, 2))
    assert read_centroids(csv, None)["P001"][1].centre_vox == (20.0, 5.0, 4.0)


def test_centroid_errors(tmp_path):
    vol = small_volume(nz=6)
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"patient": ["P001"], "x": [1.0], "y": [1.0]}).to_csv(bad, index=False)
    with pytest.raises(InputError, match="bad.csv: missing column.*z"):
        read_centroids(bad, {"P001": vol})
    out = tmp_path / "out.csv"
    pd.DataFrame({"patient": ["P001", "P001"], "x": [1.0, 45.0], "y": [1.0, 1.0], "z": [1.0, 1.0]}).to_csv(
        out, index=False)
    with pytest.raises(InputError, match=r"out.csv: row 2 \(line 3\).*outside the volume"):
        read_centroids(out, {"P001": vol})
    unk = tmp_path / "unk.csv"
    pd.DataFrame({"patient": ["P999"], "x": [1.0], "y": [1.0], "z": [1.0]}).to_csv(unk, index=False)
    with pytest.raises(InputError, match="unknown patient 'P999'"):
        read_centroids(unk, {"P001": vol})
    with pytest.raises(InputError, match="file not found"):
        read_centroids(tmp_path / "none.csv", None)

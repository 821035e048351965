"""Tests of the synthetic SWI generator (small matrices, 1-3 patients)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from cmbfe import synth
from cmbfe.cli import main as cli_main
from cmbfe.config import SynthConfig
from cmbfe.dicom_write import PHI_KEYWORDS
from cmbfe.io import InputError
from cmbfe.volume import slice_boxes, volume_slice_boxes

LOCATIONS = {"lobar", "subcortical_wm", "basal_ganglia", "thalamus", "cerebellum", "brainstem"}


def small_cfg(**kw) -> SynthConfig:
    base = {"patients": 2, "seed": 7, "matrix": 128, "p_no_cmb": 0.0, "cmb_mean": 8.0, "veins": 150,
            "workers": 1}
    return SynthConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def vol():
    return synth.synthesize_patient(0, small_cfg())


def test_deterministic_and_seed_dependent(vol):
    again = synth.synthesize_patient(0, small_cfg())
    assert np.array_equal(vol.data, again.data)
    assert np.array_equal(vol.affine, again.affine)
    assert [(les.centre_vox, les.diameter_mm) for les in vol.lesions] == [
        (les.centre_vox, les.diameter_mm) for les in again.lesions]
    base = synth.synthesize_patient(0, small_cfg(matrix=64)).data
    assert not np.array_equal(base, synth.synthesize_patient(0, small_cfg(matrix=64, seed=8)).data)
    assert not np.array_equal(base, synth.synthesize_patient(1, small_cfg(matrix=64)).data)


def test_geometry_and_range(vol):
    cfg = small_cfg()
    nsl = round((cfg.z_range_mm[1] - cfg.z_range_mm[0]) / cfg.slice_mm)
    assert vol.shape == (nsl, cfg.matrix, cfg.matrix)
    dz, dy, dx = vol.spacing_mm
    assert dz == pytest.approx(cfg.slice_mm) and dy == pytest.approx(cfg.fov_mm / cfg.matrix) == dx
    assert dx * vol.shape[2] == pytest.approx(cfg.fov_mm)
    assert np.allclose(vol.affine[:3, :3], np.diag([dx, dy, dz]))  # axial, LPS, no oblique
    assert vol.vox_to_mm([0, 0, 0])[2] == pytest.approx(cfg.z_range_mm[0] + dz / 2)
    assert vol.vox_to_mm([0, 0, nsl - 1])[2] == pytest.approx(cfg.z_range_mm[1] - dz / 2)
    assert vol.data.dtype == np.float32 and np.array_equal(vol.data, np.round(vol.data))
    assert 0 <= vol.data.min() and vol.data.max() <= 4095
    assert vol.patient_id == "SYN-0001"
    # a head in the middle of the FOV, air (noise only) in the corners
    mid = vol.data[nsl // 2]
    assert mid[40:56, 40:56].mean() > 5 * mid[:8, :8].mean()


def test_cmbs_present_dark_and_boxed(vol):
    assert len(vol.lesions) > 0
    assert {les.location for les in vol.lesions} <= LOCATIONS
    darker = 0
    for les in vol.lesions:
        assert les.kind == "cmb" and 1.0 < les.diameter_mm < 12.0
        assert 0.5 <= les.radius_true_mm <= 2.5 and les.dchi_ppm > 0
        i, j, k = (round(v) for v in les.centre_vox)
        assert 0 <= i < vol.shape[2] and 0 <= j < vol.shape[1] and 0 <= k < vol.shape[0]
        sl = vol.data[k]
        jj, ii = np.mgrid[: sl.shape[0], : sl.shape[1]]
        r = np.hypot(ii - les.centre_vox[0], jj - les.centre_vox[1]) * vol.spacing_mm[1]
        ring = sl[(r > 6) & (r < 10)]
        darker += sl[j, i] < 0.8 * np.median(ring)
        boxes = slice_boxes(les, vol.spacing_mm, vol.shape)
        for x0, y0, x1, y1 in boxes.values():
            assert 0 <= x0 < x1 <= vol.shape[2] and 0 <= y0 < y1 <= vol.shape[1]
    assert darker >= 0.8 * len(vol.lesions)
    assert sum(len(b) for b in volume_slice_boxes(vol).values()) >= len(vol.lesions) // 2


def test_mimics_of_each_kind(vol):
    kinds = {m.kind for m in vol.mimics}
    assert {"vein", "calcification", "iron", "air"} <= kinds
    for m in vol.mimics:
        assert -0.5 <= m.centre_vox[2] < vol.shape[0] - 0.5 and m.diameter_mm > 0
    assert {m.location for m in vol.mimics if m.kind == "iron"} >= {"globus_pallidus", "dentate"}


def test_no_cmb_patients():
    assert synth.synthesize_patient(0, small_cfg(p_no_cmb=1.0, matrix=64)).lesions == []


def test_tables_columns(vol):
    les, mim = synth.lesion_table(vol), synth.mimic_table(vol)
    assert list(les.columns) == synth.LESION_COLUMNS and len(les) == len(vol.lesions)
    assert list(mim.columns) == synth.MIMIC_COLUMNS and len(mim) == len(vol.mimics)
    xyz = vol.vox_to_mm(les[["i", "j", "k"]].to_numpy())
    assert np.allclose(xyz, les[["x_mm", "y_mm", "z_mm"]].to_numpy(), atol=0.01)


def _cli(out: Path, *extra: str) -> int:
    return cli_main(["synth", "--out", str(out), "--params", "smoke", "--patients", "2", "--matrix", "64",
                     "--seed", "3", "--workers", "1", "--quiet", *extra])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "raw"
    assert _cli(out) == 0
    return out


def test_cli_writes_cohort(cohort, capsys):
    df = pd.read_csv(cohort / "cohort.csv")
    assert list(df.columns) == synth.COHORT_COLUMNS
    assert list(df.patient_id) == ["SYN-0001", "SYN-0002"]
    for pid, n_sl, n_cmb in zip(df.patient_id, df.n_slices, df.n_cmb):
        les = pd.read_csv(cohort / pid / "lesions.csv")
        mim = pd.read_csv(cohort / pid / "mimics.csv")
        assert list(les.columns) == synth.LESION_COLUMNS and len(les) == n_cmb
        assert list(mim.columns) == synth.MIMIC_COLUMNS
        assert set(mim.kind) <= {"vein", "calcification", "iron", "air"}
        files = sorted((cohort / pid / "dicom").glob("IM_*.dcm"))
        assert len(files) == n_sl == 63
    assert not list(cohort.parent.glob(".raw.partial-*"))


def test_dicom_readable_no_phi(cohort):
    files = sorted((cohort / "SYN-0002" / "dicom").glob("IM_*.dcm"))
    ds = pydicom.dcmread(files[10])
    assert ds.Modality == "MR" and ds.Rows == ds.Columns == 64
    assert "RescaleSlope" not in ds  # integral pixels stored as is
    assert re.fullmatch(r"SYN-\d{4}", ds.PatientID) and str(ds.PatientName) == ds.PatientID
    for kw in PHI_KEYWORDS:
        if kw not in ("PatientID", "PatientName") and kw in ds:
            assert str(ds.data_element(kw).value) == "", kw
    assert float(ds.EchoTime) == 20.0 and float(ds.MagneticFieldStrength) == 3.0
    assert ds.pixel_array.dtype == np.uint16 and ds.pixel_array.max() > 500


@pytest.fixture(scope="module")
def cohort_again(cohort):
    out = cohort.parent / "again"
    assert _cli(out) == 0
    return out


def test_same_seed_same_pixels_and_truth(cohort, cohort_again):
    for a in sorted(cohort.rglob("*.dcm"))[::20]:
        b = cohort_again / a.relative_to(cohort)
        assert pydicom.dcmread(a).PixelData == pydicom.dcmread(b).PixelData
    for name in ("cohort.csv", "SYN-0001/lesions.csv", "SYN-0002/mimics.csv"):
        assert (cohort / name).read_bytes() == (cohort_again / name).read_bytes()


def test_same_seed_byte_identical_files(cohort, cohort_again):
    for a in sorted(cohort.rglob("*.dcm"))[::20]:
        assert a.read_bytes() == (cohort_again / a.relative_to(cohort)).read_bytes()


def test_refuses_to_overwrite(cohort, tmp_path, capsys):
    before = (cohort / "cohort.csv").read_bytes()
    assert _cli(cohort) == 2
    assert "exists" in capsys.readouterr().err
    assert (cohort / "cohort.csv").read_bytes() == before
    with pytest.raises(InputError):
        synth.synthesize_cohort(cohort, small_cfg(patients=1, matrix=64), progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    synth.synthesize_cohort(empty, small_cfg(patients=1, matrix=64), progress=False)  # empty folder is fine
    assert (empty / "cohort.csv").is_file()
    cfg9 = small_cfg(patients=1, matrix=64, seed=9)
    df = synth.synthesize_cohort(empty, cfg9, progress=False, overwrite=True)
    assert pd.read_csv(empty / "cohort.csv").seed.tolist() == [9] and len(df) == 1


def test_atomic_on_failure(tmp_path, monkeypatch):
    real = synth.synthesize_patient

    def flaky(index, cfg, *rest):
        if index == 1:
            raise RuntimeError("boom")
        return real(index, cfg, *rest)

    monkeypatch.setattr(synth, "synthesize_patient", flaky)
    out = tmp_path / "raw"
    with pytest.raises(RuntimeError, match="boom"):
        synth.synthesize_cohort(out, small_cfg(patients=2, matrix=64), progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_parallel_matches_serial(tmp_path):
    cfg = small_cfg(patients=2, matrix=64)
    serial = synth.synthesize_cohort(tmp_path / "s", cfg, progress=False)
    par = synth.synthesize_cohort(tmp_path / "p", dataclasses.replace(cfg, workers=2), progress=False)
    assert serial[synth.COHORT_COLUMNS].equals(par[synth.COHORT_COLUMNS])
    for a in sorted((tmp_path / "s").rglob("*")):
        b = tmp_path / "p" / a.relative_to(tmp_path / "s")
        if a.is_file():
            assert a.read_bytes() == b.read_bytes(), a

"""``cmbfe detect``: inputs, 3D merging, coordinates (CSV <-> NIfTI mask round trip from DICOM and NIfTI
input), reports, atomic outputs, one clear error per bad input, the exported model and its threshold.

Most tests use a hand-made phantom (a bright head with dark spheres at known positions) and a stand-in
detector that boxes dark blobs, so that the geometry is checked exactly; the model plumbing uses a tiny
untrained or briefly trained SSD. ``test_shipped_model_finds_cmbs_on_an_unseen_patient`` uses ``models/``
when ``make reproduce`` has exported it and is skipped otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from scipy import ndimage
from torch import nn

from cmbfe import cli
from cmbfe import config as C
from cmbfe import metrics as M
from cmbfe.detect.command import run_detect
from cmbfe.detect.detector import Detector, load_detector
from cmbfe.detect.export import export_model
from cmbfe.detect.lesion_metrics import compare_with_truth, lesion_threshold
from cmbfe.detect.outputs import OUTPUTS
from cmbfe.detect.pipeline import CSV_COLUMNS, merge_lesions
from cmbfe.detect.scans import FLIP, find_scans
from cmbfe.dicom_write import write_dicom_series
from cmbfe.models import build_model
from cmbfe.volume import Volume

FAST = ["preprocess.n4_iterations=[5,5]", "preprocess.n4_shrink=2", "model.size=128", "model.width=0.125",
        "model.priors=cmb"]
NAME = "Doe^Jane"  # written into PatientName/PatientID; must never reach an output


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------------ fixtures
def oblique(dx: float = 0.9, dy: float = 0.8, dz: float = 2.0) -> np.ndarray:
    t = np.deg2rad(12)
    rot = np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([dx, dy, dz])
    aff[:3, 3] = (-30.0, -25.0, -10.0)
    return aff


BLOBS = [(20.0, 24.0, 4.0), (44.0, 30.0, 7.0), (30.0, 42.0, 9.0)]  # (i, j, k) voxel centres


def phantom(affine: np.ndarray | None = None, nz: int = 12, ny: int = 60, nx: int = 68) -> Volume:
    """A bright ellipsoidal head with a smooth bias and noise; dark spheres (2.6 mm) at :data:`BLOBS`."""
    aff = oblique() if affine is None else affine
    rng = np.random.default_rng(0)
    kk, jj, ii = np.mgrid[0:nz, 0:ny, 0:nx].astype(float)
    head = ((ii - nx / 2 + 0.5) / (nx * 0.42)) ** 2 + ((jj - ny / 2 + 0.5) / (ny * 0.42)) ** 2 <= 1.0
    data = np.where(head, 1000.0 * (1 + 0.2 * ii / nx), 20.0) + rng.normal(0, 15, head.shape)
    dz, dy, dx = Volume(data, aff, "x").spacing_mm
    for ci, cj, ck in BLOBS:
        r = np.sqrt(((ii - ci) * dx) ** 2 + ((jj - cj) * dy) ** 2 + ((kk - ck) * dz) ** 2)
        data[r <= 2.6] = 150.0
    return Volume(np.clip(data, 0, None).astype(np.float32), aff, NAME)


class BlobNet(nn.Module):
    """Stand-in detector: boxes the dark connected blobs inside the bright head of the centre channel."""

    def forward(self, images):
        out = []
        for im in images:
            g = im[1].numpy()
            head = ndimage.binary_fill_holes(g > 0.35)
            lab, _n = ndimage.label((g < 0.35) & head)
            boxes, scores = [], []
            for idx, sl in enumerate(ndimage.find_objects(lab), start=1):
                size = int((lab[sl] == idx).sum())
                if 1 <= size <= 200:
                    boxes.append([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop])
                    scores.append(0.5 + min(size, 40) / 100)
            out.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                        "scores": torch.tensor(scores, dtype=torch.float32),
                        "labels": torch.ones(len(scores))})
        return out


@pytest.fixture(scope="module")
def blobnet() -> Detector:
    return Detector(BlobNet(), C.load(None, FAST), threshold=0.5, threshold_source="model")


def write_dicom(vol: Volume, folder: Path, seed: str = "a") -> Path:
    write_dicom_series(vol, folder, uid_seed=seed)
    return folder


def write_nifti(vol: Volume, path: Path, ornt: list | None = None) -> Path:
    """``vol`` as NIfTI (x, y, z) = (i, j, k) with its RAS affine, optionally stored in another axis order."""
    img = nib.Nifti1Image(np.transpose(vol.data, (2, 1, 0)), FLIP @ vol.affine)
    if ornt is not None:
        img = img.as_reoriented(np.array(ornt, float))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    """An untrained tiny SSD saved as a run folder (config.yaml + model.pt)."""
    folder = tmp_path_factory.mktemp("model")
    cfg = C.load(None, FAST)
    torch.manual_seed(0)
    torch.save(build_model(cfg.model, cfg.fe).state_dict(), folder / "model.pt")
    C.dump(cfg, folder / "config.yaml")
    return folder


def _mask_centroids(path: Path) -> tuple[nib.Nifti1Image, dict[int, np.ndarray]]:
    img = nib.load(str(path))
    lab = np.asarray(img.dataobj)
    return img, {int(v): np.argwhere(lab == v).mean(axis=0) for v in np.unique(lab) if v}


def _check_roundtrip(out: Path, truth_lps: np.ndarray, voxel_mm: float) -> pd.DataFrame:
    cmbs = pd.read_csv(out / "cmbs.csv")
    assert list(cmbs.columns) == CSV_COLUMNS
    assert len(cmbs) == len(truth_lps)
    lps = cmbs[["x_lps_mm", "y_lps_mm", "z_lps_mm"]].to_numpy()
    ras = cmbs[["x_ras_mm", "y_ras_mm", "z_ras_mm"]].to_numpy()
    assert np.allclose(ras, lps * [-1, -1, 1], atol=0.011)
    for t in truth_lps:  # every true centre found, within half a slice
        assert np.linalg.norm(lps - t, axis=1).min() < 0.6 * voxel_mm
    img, cents = _mask_centroids(out / "cmbs_mask.nii.gz")
    assert sorted(cents) == sorted(cmbs["lesion_id"])
    for _, row in cmbs.iterrows():
        ijk = row[["i", "j", "k"]].to_numpy(float)
        ras = row[["x_ras_mm", "y_ras_mm", "z_ras_mm"]]  # CSV voxel and mm agree through the mask's affine
        assert np.allclose(nib.affines.apply_affine(img.affine, ijk), ras, atol=0.02)
        c = cents[int(row["lesion_id"])]
        assert np.abs(c - ijk).max() < 0.6, (c, ijk)  # the mask's lesion sits where the CSV says
    return cmbs


# ------------------------------------------------------------------------------------------ geometry
def test_dicom_input_mask_and_csv_agree_and_no_phi(tmp_path, blobnet):
    vol = phantom()
    src = write_dicom(vol, tmp_path / "scan1")
    res = run_detect(src, tmp_path / "out", model=blobnet)
    out = res["out"]
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    truth = vol.vox_to_mm(np.array(BLOBS))
    cmbs = _check_roundtrip(out, truth, 2.0)
    img = nib.load(str(out / "cmbs_mask.nii.gz"))
    assert img.shape == vol.shape[::-1] and np.allclose(img.affine, FLIP @ vol.affine, atol=1e-4)
    assert (cmbs["n_slices"] >= 2).all() and (cmbs["diameter_mm"] > 2).all()
    rep = json.loads((out / "report.json").read_text())
    assert rep["counts"]["cmbs"] == 3 and rep["scan"]["name"] == "scan1" and rep["threshold"] == 0.5
    assert {"read", "n4", "inference", "merge", "write", "report", "total"} <= set(rep["timings_s"])
    assert torch.__version__.startswith(rep["versions"]["torch"])
    dets = json.loads((out / "detections.json").read_text())
    assert dets and all(d["image_id"] == d["slice_index"] + 1 and d["lesion_id"] >= 1 for d in dets)
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "http" not in html.replace("http-equiv", "")
    assert (out / "report.pdf").read_bytes()[:5] == b"%PDF-"
    for f in out.iterdir():
        text = f.read_bytes()
        assert NAME.encode() not in text, f.name  # no DICOM patient tag in any output ('^' is not base64)


def test_nifti_input_in_another_axis_order(tmp_path, blobnet):
    aff = np.diag([0.9, 0.8, 2.0, 1.0])
    aff[:3, 3] = (-20, -30, 5)
    vol = phantom(aff)
    # stored as (z, x, y) with x flipped: the mask must come back on this grid, not the reoriented one
    path = write_nifti(vol, tmp_path / "in" / "sub-007_space-T2S_desc-masked_T2S.nii.gz",
                       [[1, -1], [2, 1], [0, 1]])
    scans, cohort = find_scans(path)
    assert [s.name for s in scans] == ["sub-007"] and not cohort
    out = run_detect(path, tmp_path / "out", model=blobnet)["out"]
    src = nib.load(str(path))
    img = nib.load(str(out / "cmbs_mask.nii.gz"))
    assert img.shape == src.shape and np.allclose(img.affine, src.affine)
    assert img.header["sform_code"] > 0 and img.header["qform_code"] > 0
    _check_roundtrip(out, vol.vox_to_mm(np.array(BLOBS)), 2.0)


def test_cohort_folder_and_threshold_override(tmp_path, blobnet):
    vol = phantom()
    write_dicom(vol, tmp_path / "cohort" / "P01" / "dicom")
    write_nifti(vol, tmp_path / "cohort" / "P02" / "scan.nii.gz")
    res = run_detect(tmp_path / "cohort", tmp_path / "out", model=blobnet, threshold=0.99)
    assert res["cohort"]
    table = pd.read_csv(tmp_path / "out" / "cohort.csv")
    assert list(table["patient"]) == ["P01", "P02"] and list(table["kind"]) == ["dicom", "nifti"]
    assert (table["n_cmb"] == 0).all() and (table["threshold"] == 0.99).all()  # every score < 0.99
    for p in ("P01", "P02"):
        assert sorted(f.name for f in (tmp_path / "out" / p).iterdir()) == sorted(OUTPUTS)
        rep = json.loads((tmp_path / "out" / p / "report.json").read_text())
        assert rep["threshold_source"] == "--threshold"


def test_slices_are_byte_identical_to_cmbfe_preprocess(tmp_path, blobnet):
    """The network sees exactly the 8-bit slices training saw (the PNGs of ``cmbfe preprocess``)."""
    from PIL import Image

    from cmbfe.detect.pipeline import preprocess_volume
    from cmbfe.detect.scans import Scan, read_scan
    from cmbfe.preprocess import preprocess_cohort

    write_dicom(phantom(), tmp_path / "raw" / "P01")
    preprocess_cohort(tmp_path / "raw", tmp_path / "pre", blobnet.cfg, progress=False)
    vol, _ = read_scan(Scan("P01", "dicom", tmp_path / "raw" / "P01"))
    u8, _ = preprocess_volume(vol, blobnet.cfg.preprocess)
    pngs = sorted((tmp_path / "pre" / "images" / "P01").glob("z*.png"))
    assert len(pngs) == len(u8)
    assert all(np.array_equal(np.asarray(Image.open(p)), u8[k]) for k, p in enumerate(pngs))


def test_merge_links_adjacent_slices_only():
    boxes = np.array([[10, 10, 16, 16], [11, 11, 17, 17], [12, 10, 18, 16], [40, 40, 44, 44],
                      [10, 10, 16, 16.0]])
    slices = np.array([3, 4, 5, 4, 9])
    scores = np.array([0.6, 0.9, 0.7, 0.8, 0.3])
    ids, les = merge_lesions(boxes, slices, scores, scores >= 0.5, 12, (2.0, 0.5, 0.5))
    assert ids.tolist() == [1, 1, 1, 2, 0]  # the 0.3 detection is below the threshold
    first = les[0]
    assert (first["slice_first"], first["slice_last"], first["n_slices"]) == (3, 5, 3)
    assert first["max_score"] == 0.9 and first["diameter_mm"] == pytest.approx(3.0)
    assert first["centre_vox"] == pytest.approx((13.5, 12.5 + 1 / 3, 4.0))  # box centres, area-weighted


# ------------------------------------------------------------------------------------------ errors
def _fails(argv: list[str], out: Path, capsys, match: str) -> None:
    before = sorted(out.rglob("*")) if out.exists() else None
    assert cli.main(["detect", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1, err
    assert (sorted(out.rglob("*")) if out.exists() else None) == before
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


def test_bad_inputs_get_one_clear_error_and_nothing_written(tmp_path, random_model, capsys):
    m = ["--model", str(random_model), "--threshold", "0.9"]
    out = tmp_path / "out"
    vol = phantom()
    two = write_dicom(vol, tmp_path / "two", "s1")
    for f in write_dicom_series(Volume(vol.data[:5], vol.affine, "x"), tmp_path / "second", uid_seed="s2"):
        f.rename(two / f"B{f.name}")
    _fails([str(two), *m], out, capsys, "--series UID")
    uid = str(pydicom.dcmread(two / "IM_0010.dcm").SeriesInstanceUID)
    assert cli.main(["detect", str(two), *m, "--out", str(out), "--series", uid, "--no-report"]) == 0
    _fails([str(two), *m], out, capsys, "exists (use --overwrite")
    assert cli.main(["detect", str(two), *m, "--out", str(out), "--series", uid, "--overwrite"]) == 0
    assert (out / "report.pdf").is_file()
    out = tmp_path / "out2"
    sr = write_dicom(vol, tmp_path / "sr")  # a non-image DICOM object in the series folder
    ds = pydicom.dcmread(sr / "IM_0001.dcm")
    del ds.PixelData
    ds.save_as(sr / "IM_0001.dcm")
    _fails([str(sr), *m], out, capsys, "without pixel data")
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((40, 40), np.float32), np.eye(4)), str(flat))
    _fails([str(flat), *m], out, capsys, "3D")
    one = tmp_path / "one.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((40, 40, 1), np.float32), np.eye(4)), str(one))
    _fails([str(one), *m], out, capsys, "a 2D image")
    nan = tmp_path / "nan.nii.gz"
    arr = np.random.default_rng(0).random((40, 40, 8)).astype(np.float32)
    arr[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(nan))
    _fails([str(nan), *m], out, capsys, "NaN")
    _fails([str(tmp_path / "missing.nii.gz"), *m], out, capsys, "not found")


def test_bad_models_get_one_clear_error(tmp_path, random_model, capsys):
    src = write_nifti(phantom(), tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.yaml").write_text((random_model / "config.yaml").read_text())
    (bad / "model.pt").write_bytes(b"not a checkpoint")
    _fails([str(src), "--model", str(bad)], out, capsys, "cannot be loaded")
    cfg = C.load(None, [*FAST, "model.width=0.25"])
    torch.save(build_model(cfg.model, cfg.fe).state_dict(), bad / "model.pt")
    _fails([str(src), "--model", str(bad)], out, capsys, "do not match config.yaml")
    _fails([str(src), "--model", str(tmp_path / "nowhere")], out, capsys, "not found")
    _fails([str(src), "--model", str(random_model), "--threshold", "2"], out, capsys, "--threshold")


# ------------------------------------------------------------------------------------------ the model
def test_lesion_threshold_is_the_highest_reaching_the_target():
    n = 10  # ten 3D CMBs of one box each on ten slices, detected with scores 0.95, 0.85, ..., 0.05
    gt = M.GroundTruth(image_ids=np.arange(n), image_patient=np.zeros(n, np.int64),
                       image_slice=np.arange(n) * 5,
                       image_spacing=np.ones((n, 2)), patient_ids=("p",),
                       boxes=np.tile([10.0, 10, 14, 14], (n, 1)), box_image=np.arange(n),
                       box_lesion=np.arange(n), n_lesions=n)
    scores = 0.95 - 0.1 * np.arange(n)
    boxes = np.vstack([np.tile([10.0, 10, 14, 14], (n, 1)), [[40, 40, 44, 44]]])
    dets = M.Detections(boxes=boxes, image=np.append(np.arange(n), 0), scores=np.append(scores, 0.9))
    r = lesion_threshold(gt, dets, target=0.9)
    assert r["reached"] and r["threshold"] == pytest.approx(0.15) and r["sensitivity"] == pytest.approx(0.9)
    assert r["fp_per_scan"] == 1.0
    r = lesion_threshold(gt, M.Detections(boxes=boxes[:5], image=np.arange(5), scores=scores[:5]), target=0.9)
    assert not r["reached"] and r["threshold"] == pytest.approx(0.55) and "NOT reached" in r["text"]


def _evaluated(run: Path, pre: Path, split: str) -> tuple[M.GroundTruth, M.Detections]:
    """A split of ``pre`` and ``run``'s detections on it, through the core only (no study cache)."""
    from cmbfe import evaluate as E
    from cmbfe import modelfolder
    from cmbfe.datadir import DataDir
    from cmbfe.predict import predict

    mf = modelfolder.load(run)
    gt = E.gt_from_coco(DataDir(pre).coco(split), split)
    return gt, E.dets_from_coco(predict(mf.model, pre, split, input=mf.cfg.model.input), gt, split)


def test_export_model_then_detect_with_it(tmp_path):
    from test_data import make_pre

    from cmbfe.study.ship import export_run
    from cmbfe.train import fit

    pre = make_pre(tmp_path)
    cfg = C.load(None, [*FAST, "train.iterations=2", "train.batch_size=2", "train.checkpoint_every=0",
                        "model.input=2.5d"])
    fit(cfg, tmp_path / "run", data=pre, progress=False)
    run = tmp_path / "run"
    models = export_model(run, tmp_path / "models", val=_evaluated(run, pre, "val"),
                          test=_evaluated(run, pre, "test"), pre=pre, bootstrap=20)
    meta = json.loads((models / "detect.json").read_text())
    # the study's export (cached predictions, cmbfe.study.runs) writes the same facts
    shipped = export_run(run, tmp_path / "models_study", pre=pre, bootstrap=20)
    again = json.loads((shipped / "detect.json").read_text())
    for d in (meta, again):
        d.pop("created")
    assert again == meta
    assert meta["threshold_rule"]["level"] == "lesion (3D)" and meta["training_data"]["matrix"] == 64
    assert set(meta["test_metrics"]) >= {"lesion_sensitivity", "fp_per_scan", "ap_iou", "ap_centre"}
    card = (models / "README.md").read_text()
    assert "Research use only" in card and "not validated on real patients" in card and "{" not in card
    det = load_detector(models)
    assert det.threshold_source == "model" and det.threshold == meta["threshold"] and det.matrix == 64
    assert det.pixel_spacing_mm == (0.94, 0.94)
    vol = phantom()
    src = write_dicom(vol, tmp_path / "scan")
    out = tmp_path / "out"
    assert cli.main(["detect", str(src), "--model", str(models), "--out", str(out), "--device", "cpu"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["model"]["exported"] and rep["preprocessing"]["input"] == "2.5d"
    info = rep["preprocessing"]  # 68 x 60 px of 0.9 x 0.8 mm -> 65 x 51 px of 0.94 mm: two 64-px tiles
    assert info["resampled_to_px"] == [51, 65] and info["tile_px"] == 64 and info["tiles_per_slice"] == 2
    assert "Model card" in (out / "report.html").read_text()


def test_compare_with_truth_counts_hits_misses_and_mimic_fps():
    cmbs = pd.DataFrame({"lesion_id": [1, 2, 3], "x_lps_mm": [0.0, 10.0, 50.0], "y_lps_mm": [0.0, 1.0, 0.0],
                         "z_lps_mm": [1.0, 0.0, 0.0]})
    truth = pd.DataFrame({"lesion_id": [7, 8], "x_mm": [0.5, 30.0], "y_mm": [0.0, 0.0], "z_mm": [0.0, 0.0],
                          "diameter_mm": [4.0, 4.0]})
    mimics = pd.DataFrame({"kind": ["vein", "iron"], "x_mm": [10.0, 80.0], "y_mm": [0.0, 0.0],
                           "z_mm": [0.0, 0.0],
                           "diameter_mm": [2.0, 6.0]})
    r = compare_with_truth(cmbs, truth, mimics)
    assert r["counts"] == {"cmbs": 2, "hits": 1, "misses": 1, "sensitivity": 0.5, "detections": 3, "fp": 2,
                           "fp_by_mimic": {"vein": 1, "other": 1}}
    assert r["truth"]["lesion_id_detected"].tolist() == [1, 0]


SHIPPED = C.REPO_ROOT / "models"


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED / "model.pt").is_file() or not (SHIPPED / "detect.json").is_file(),
                    reason="no shipped model in models/ (make reproduce exports it; see models/README.md)")
def test_shipped_model_finds_cmbs_on_an_unseen_patient(tmp_path):
    """>= 80 % of the CMBs of a synthetic patient from a seed the study never used, at the stored
    threshold."""
    from cmbfe.synth import lesion_table, mimic_table, synthesize_patient

    meta = json.loads((SHIPPED / "detect.json").read_text())
    scfg = C.from_dict({"synth": {**meta["training_data"]["synth"], "seed": 90_001, "workers": 1}}).synth
    vol = next(v for v in (synthesize_patient(i, scfg) for i in range(5)) if len(v.lesions) >= 5)
    src = write_dicom(vol, tmp_path / "held_out" / "dicom", "held-out")
    res = run_detect(tmp_path / "held_out", tmp_path / "out")
    cmbs = pd.read_csv(res["out"] / "cmbs.csv")
    cmp = compare_with_truth(cmbs, lesion_table(vol), mimic_table(vol))
    c = cmp["counts"]
    print(f"shipped model on held-out {vol.patient_id} (seed 90001): {c['hits']}/{c['cmbs']} CMBs found, "
          f"{c['fp']} false positives {c['fp_by_mimic']}, threshold {res['detector'].threshold:.3g}")
    assert src.is_dir() and c["sensitivity"] >= 0.8, c

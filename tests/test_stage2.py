"""Issue 20: the mask keeps every lesion (defect 2), VALDO lesion metrics on a hand-computed fixture, and the
second stage (patches, deterministic training, the model folder round trip, operating points, ``cmbfe
detect`` with it)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from cmbfe import modelfolder
from cmbfe.detect import stage2 as S
from cmbfe.detect.lesion_metrics import match_centres, valdo_metrics
from cmbfe.detect.outputs import label_image
from cmbfe.detect.stage2_fit import Candidates, choose_operating_points

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------------ defect 2
def test_every_lesion_keeps_a_voxel_in_the_mask():
    # lesion 2 (lower score) lies wholly inside lesion 1's box on the same slice: it used to lose every voxel
    boxes = np.array([[10, 10, 20, 20], [13, 13, 16, 16], [40, 40, 41, 41.0]], float)
    slices = np.array([2, 2, 5])
    lesions = [{"lesion_id": 1, "max_score": 0.9, "members": [0]}, {"lesion_id": 2, "max_score": 0.5, "members": [1]},
               {"lesion_id": 3, "max_score": 0.4, "members": [2]}]
    lab = label_image((8, 64, 64), boxes, slices, np.array([1, 2, 3]), lesions)
    counts = np.bincount(lab.ravel(), minlength=4)
    assert (counts[1:] >= 1).all()
    assert counts[1] > 50 and lab[2, 14, 14] in (1, 2) and lab[2, 11, 15] == 1  # overlap goes to the higher
    # no overlap: each lesion paints its whole ellipse, as before
    lab = label_image((8, 64, 64), boxes, slices, np.array([1, 0, 3]), [lesions[0], lesions[2]])
    assert np.bincount(lab.ravel(), minlength=4)[2] == 0 and lab[5, 40, 40] == 3


# ------------------------------------------------------------------------------------------ VALDO metrics
def test_valdo_metrics_on_a_hand_computed_fixture():
    t = np.array([[0, 0, 0], [20, 0, 0], [40, 0, 0.0]])
    subjects = {
        # A: 3 true; predictions 1 mm, 4 mm (< 5 but not < 3) and 30 mm away from the first, second, none
        "A": (np.array([[1, 0, 0], [24, 0, 0], [70, 0, 0.0]]), t),
        "B": (np.zeros((0, 3)), t[:2]),  # no prediction: F1 0
        "C": (np.array([[5, 5, 5.0]]), np.zeros((0, 3))),  # CMB-free with one FP: F1 0
        "D": (np.zeros((0, 3)), np.zeros((0, 3))),  # CMB-free and clean: F1 undefined
        "E": (np.array([[0, 0, 4.99]]), t[:1]),  # 4.99 mm: a match at < 5 mm
    }
    v5 = valdo_metrics(subjects, 5.0)
    f = v5["subjects"].set_index("subject")["f1"]
    # A: TP 2, FP 1, FN 1 -> 4 / 6; B 0; C 0; D NaN; E 1
    assert f["A"] == pytest.approx(2 / 3) and f["B"] == 0 and f["C"] == 0 and np.isnan(f["D"]) and f["E"] == 1
    assert v5["median_f1"] == pytest.approx(1 / 3)  # median of (2/3, 0, 0, 1)
    assert v5["mean_f1"] == pytest.approx((2 / 3 + 1) / 4)
    assert v5["fp_per_subject"] == pytest.approx(2 / 5) and v5["fp_per_cmb_free_subject"] == pytest.approx(0.5)
    assert v5["sensitivity"] == pytest.approx(3 / 6) and v5["precision"] == pytest.approx(3 / 5)
    assert v5["abs_count_difference"] == pytest.approx((0 + 2 + 1 + 0 + 0) / 5)
    v3 = valdo_metrics(subjects, 3.0)
    f3 = v3["subjects"].set_index("subject")["f1"]
    assert f3["A"] == pytest.approx(2 / 6) and f3["E"] == 0  # 4 mm and 4.99 mm no longer match
    # one-to-one: two predictions near one truth give one TP
    assert match_centres(np.array([[0, 0, 0], [0, 0, 1.0]]), t[:1], 5.0)[0] == 1


# ------------------------------------------------------------------------------------------ second stage
def blob_patches(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half the 8-bit volumes hold a dark sphere at the centre, half a dark vertical line (a vein)."""
    u8 = np.full((n, 9, 24, 24), 200, np.uint8)
    kk, jj, ii = np.mgrid[0:9, 0:24, 0:24]
    y = np.arange(n) % 2
    for m in range(n):
        noise = rng.normal(0, 8, u8[m].shape)
        dark = ((kk - 4) * 2) ** 2 + (jj - 12) ** 2 + (ii - 12) ** 2 <= 9 if y[m] else (np.abs(ii - 12) <= 1)
        u8[m] = np.clip(np.where(dark, 60, 200) + noise, 0, 255)
    les = [{"centre_vox": (12.0, 12.0, 4.0)}]
    x = np.concatenate([S.patches(u8[m], les) for m in range(n)])
    return x, np.zeros((n, len(S.FEATURES)), np.float32), y


def test_patches_are_centred_and_padded():
    u8 = np.zeros((6, 30, 30), np.uint8)
    u8[3, 10, 20] = 255
    p = S.patches(u8, [{"centre_vox": (20.0, 10.0, 3.0)}, {"centre_vox": (0.0, 0.0, 0.0)}])
    assert p.shape == (2, *S.PATCH)
    assert p[0, 2, 8, 8] == pytest.approx(4.0) and p[0].sum() == pytest.approx(4.0)  # the voxel at the centre
    assert (p[1] == 0).all()  # out of the volume: zero


def test_training_is_deterministic_and_learns(tmp_path):
    rng = np.random.default_rng(0)
    x, f, y = blob_patches(64, rng)
    a = S.train_net(x, f, y, seed=3, epochs=6)
    b = S.train_net(x, f, y, seed=3, epochs=6)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    xt, ft, yt = blob_patches(32, np.random.default_rng(1))
    p = S.predict(a, xt, ft)
    assert p[yt == 1].min() > p[yt == 0].max()
    with pytest.raises(ValueError, match="positive and negative"):
        S.train_net(x, f, np.zeros(len(x), np.int64), epochs=1)


def test_operating_points_on_a_hand_example():
    # two scans, 4 true CMBs; candidates: 3 hits with p 0.9, 0.8, 0.3 and 2 misses with p 0.7, 0.2
    truth = {"a": np.array([[0, 0, 0], [50, 0, 0.0]]), "b": np.array([[0, 0, 0], [90, 0, 0.0]])}
    c = Candidates(np.zeros((5, *S.PATCH), np.float32), np.zeros((5, 4), np.float32),
                   np.array([[0, 0, 1], [50, 1, 0], [0, 2, 0], [20, 20, 20], [-40, 0, 0.0]]),
                   np.array(["a", "a", "b", "b", "b"], object), np.array([1, 1, 1, 0, 0]), truth)
    ops = choose_operating_points(c, np.array([0.9, 0.8, 0.3, 0.7, 0.2]))
    # sensitivity >= 0.9 never reached (max 3/4): the lowest threshold that finds 3
    assert ops["screening"]["threshold"] == pytest.approx(0.3) and not ops["screening"]["reached"]
    # F1: thr 0.8 -> 2 TP, 0 FP, 2 FN = 4/6; 0.3 -> 3 TP 1 FP 1 FN = 6/8 (best); 0.2 -> 6/9
    assert ops["balanced"]["threshold"] == pytest.approx(0.3) and ops["balanced"]["val_f1"] == pytest.approx(0.75)


def test_detect_with_a_second_stage_keeps_what_it_accepts(tmp_path):
    import nibabel as nib
    from test_detect import FAST, BlobNet, phantom, write_dicom

    from cmbfe import config as C
    from cmbfe.detect.command import run_detect
    from cmbfe.detect.detector import Detector

    src = write_dicom(phantom(), tmp_path / "dicom")
    ops = {"screening": {"threshold": 0.0, "rule": "keep all"}, "balanced": {"threshold": 1.01, "rule": "none"}}
    st = S.Stage2(S.Stage2Net().eval(), {"operating_points": ops, "candidate_threshold": 0.5})
    det = Detector(BlobNet(), C.load(None, FAST), threshold=0.5, threshold_source="model", stage2=st,
                   operating_point="screening")
    out = run_detect(src, tmp_path / "all", model=det)["out"]
    cmbs = pd.read_csv(out / "cmbs.csv")
    rep = json.loads((out / "report.json").read_text())
    assert len(cmbs) == 3 and cmbs["stage2_score"].between(0, 1).all()
    assert rep["second_stage"]["operating_point"] == "screening" and rep["second_stage"]["candidates"] == 3
    assert rep["counts"]["burden_bin"] == "1-4" and "stage2" in rep["timings_s"]
    lab = np.asarray(nib.load(str(out / "cmbs_mask.nii.gz")).dataobj)
    assert set(np.unique(lab)) == {0, 1, 2, 3}
    assert "Burden: 3 CMB(s), bin 1-4" in (out / "report.html").read_text()
    det.operating_point = "balanced"  # accepts nothing
    out = run_detect(src, tmp_path / "none", model=det)["out"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["counts"]["cmbs"] == 0 and rep["counts"]["burden_bin"] == "0"
    assert not np.asarray(nib.load(str(out / "cmbs_mask.nii.gz")).dataobj).any()


def test_burden_bins():
    from cmbfe.detect.report import burden_bin

    assert [burden_bin(n) for n in (0, 1, 4, 5, 9, 10, 80)] == ["0", "1-4", "1-4", "5-9", "5-9", ">= 10", ">= 10"]


def test_stage2_round_trip_and_bad_files(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / modelfolder.META).write_text(json.dumps({"name": "x", "threshold": 0.3}))
    net = S.Stage2Net()
    ops = {"screening": {"threshold": 0.1}, "balanced": {"threshold": 0.6}}
    modelfolder.write_stage2(folder, net.state_dict(), {"operating_points": ops})
    st = S.load_stage2(folder)
    assert st is not None and st.threshold("balanced") == 0.6 and st.candidate_threshold == S.CANDIDATE_THRESHOLD
    assert json.loads((folder / modelfolder.META).read_text())["threshold"] == 0.3  # the rest is kept
    assert all(torch.equal(net.state_dict()[k], st.net.state_dict()[k]) for k in net.state_dict())
    torch.save({"w": torch.zeros(3)}, folder / modelfolder.STAGE2)
    with pytest.raises(Exception, match="weights do not match the second stage"):
        S.load_stage2(folder)
    (folder / modelfolder.STAGE2).unlink()
    assert S.load_stage2(folder) is None


def test_operating_point_needs_a_second_stage(tmp_path, capsys):
    from test_detect import FAST, phantom, write_dicom

    from cmbfe import cli
    from cmbfe import config as C
    from cmbfe.models import build_model

    folder = tmp_path / "run"
    folder.mkdir()
    cfg = C.load(None, FAST)
    torch.manual_seed(0)
    torch.save(build_model(cfg.model, cfg.fe).state_dict(), folder / "model.pt")
    C.dump(cfg, folder / "config.yaml")
    src = write_dicom(phantom(), tmp_path / "dicom")
    out = tmp_path / "out"
    assert cli.main(["detect", str(src), "--out", str(out), "--model", str(folder), "--operating-point",
                     "screening"]) == 2
    err = capsys.readouterr().err
    assert "needs a model folder with a second stage" in err and err.count("\n") == 1 and not out.exists()


def test_evaluate_reports_valdo_metrics_from_coco():
    from cmbfe.evaluate import _slice_mm, dets_from_coco, gt_from_coco, valdo_summary

    ims = [{"id": i + 1, "patient_id": p, "slice_index": k, "pixel_spacing_mm": [1.0, 1.0], "slice_mm": 2.0}
           for i, (p, k) in enumerate([("P1", 0), ("P1", 1), ("P1", 2), ("P1", 3), ("P2", 0), ("P2", 1)])]
    anns = [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [10, 10, 4, 4], "lesion_id": 1},
            {"id": 2, "image_id": 3, "category_id": 1, "bbox": [10, 10, 4, 4], "lesion_id": 1},
            {"id": 3, "image_id": 5, "category_id": 1, "bbox": [20, 20, 4, 4], "lesion_id": 1}]
    coco = {"images": ims, "annotations": anns, "categories": [{"id": 1, "name": "cmb"}]}
    gt = gt_from_coco(coco)
    dets = dets_from_coco([{"image_id": 2, "category_id": 1, "bbox": [10, 10, 4, 4], "score": 0.9},
                           {"image_id": 3, "category_id": 1, "bbox": [10.5, 10, 4, 4], "score": 0.8},
                           {"image_id": 4, "category_id": 1, "bbox": [50, 50, 4, 4], "score": 0.7},
                           {"image_id": 6, "category_id": 1, "bbox": [90, 90, 4, 4], "score": 0.1}], gt)
    assert _slice_mm(coco) == 2.0
    v = valdo_summary(gt, dets, 2.0, 0.5)  # the 0.1 detection is dropped
    # P1: the 2-slice lesion found (TP), one FP -> F1 2/3; P2: its lesion missed, no prediction -> F1 0
    assert v["5mm"]["f1_by_subject"] == pytest.approx({"P1": 2 / 3, "P2": 0.0})
    assert v["5mm"]["median_f1"] == pytest.approx(1 / 3) and v["5mm"]["fp_per_subject"] == pytest.approx(0.5)
    assert v["5mm"]["sensitivity"] == pytest.approx(0.5) and v["5mm"]["precision"] == pytest.approx(0.5)
    v = valdo_summary(gt, dets, 2.0, None)  # every detection: P2 gets a far-off FP
    assert v["5mm"]["fp_per_subject"] == pytest.approx(1.0) and v["5mm"]["f1_by_subject"]["P2"] == 0.0

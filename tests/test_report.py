"""cmbfe.study.report pieces that need no trained model (the notebooks' smoke runs cover the rest)."""

from __future__ import annotations

import numpy as np
import pytest

from cmbfe import config, study
from cmbfe import metrics as M
from cmbfe.evaluate import dets_from_coco, gt_from_coco
from cmbfe.study import report


def _evaluated(dets: list[tuple]) -> dict:
    images = [{"id": 1, "patient_id": "P1", "slice_index": 0, "pixel_spacing_mm": [1.0, 1.0]}]
    anns = [{"id": k + 1, "image_id": 1, "category_id": 1, "bbox": b}
            for k, b in enumerate([[10, 10, 2, 2], [41, 41, 5, 5], [70, 70, 8, 8]])]
    gt = gt_from_coco({"images": images, "annotations": anns})
    d = dets_from_coco([{"image_id": 1, "bbox": b, "score": s} for b, s in dets], gt)
    return {"gt": gt, "dets": d, "matching": M.match(gt, d, rule="iou")}


def test_size_table_iou_vs_centre_mean_over_seeds():
    cfg = study.with_overrides(config.load("smoke"), {"study.sizes": [300], "study.seeds": [0, 1]})
    hit_small = [([10, 10, 2, 2], 0.9), ([42, 42, 6, 6], 0.8)]  # 2 mm found; 5 mm: IoU 0.36, centre 2.1 mm
    nothing: list[tuple] = []
    ev = {(300, False, 0): _evaluated(hit_small), (300, False, 1): _evaluated(nothing),
          (300, True, 0): _evaluated(hit_small), (300, True, 1): _evaluated(hit_small)}
    t = report.size_table(cfg, ev)
    assert t["model"].tolist() == ["SSD-300"] * 2 + ["SSD-300-FE"] * 2
    assert t["match"].tolist()[:2] == ["IoU >= 0.5", "centre <= 2.5 mm"]
    cols = [c for c in t.columns if c.startswith("sens.")]
    assert [c.split(" (")[0] for c in cols] == ["sens. [0, 2) mm", "sens. [2, 3) mm", "sens. [3, 4) mm",
                                                "sens. [4, 6) mm", "sens. [6, inf) mm"]
    assert "(n=1)" in cols[1] and "(n=0)" in cols[0]
    fe_iou, fe_centre = t.iloc[2], t.iloc[3]
    assert fe_iou[cols[1]] == 1.0 and fe_iou[cols[3]] == 0.0 and fe_centre[cols[3]] == 1.0
    assert np.isnan(fe_iou[cols[0]])
    ssd_centre = t.iloc[1]  # seed 0 finds the 2 and 5 mm boxes, seed 1 nothing: mean 0.5
    assert ssd_centre[cols[1]] == 0.5 and ssd_centre[cols[3]] == 0.5 and ssd_centre[cols[4]] == 0.0
    ap = next(c for c in t.columns if c.startswith("AP"))
    assert fe_centre[ap] > fe_iou[ap] > 0


def test_mimic_table_says_when_90_percent_is_not_reached():
    cfg = study.with_overrides(config.load("smoke"), {"study.sizes": [300], "study.seeds": [0, 1]})
    reached = {"at_sensitivity_0.9": {"vein": 2, "air": 1}, "all": {"vein": 9, "air": 5}}
    missed = {"at_sensitivity_0.9": None, "all": {"vein": 4}}
    ev = {(300, False, 0): {"metrics": {"fp_attribution": reached}},
          (300, False, 1): {"metrics": {"fp_attribution": reached}},
          (300, True, 0): {"metrics": {"fp_attribution": reached}},
          (300, True, 1): {"metrics": {"fp_attribution": missed}}}
    t = report.mimic_table(cfg, ev).set_index("model")
    assert t.loc["SSD-300", "vein"] == 4 and t.loc["SSD-300", "air"] == 2
    assert t.loc["SSD-300", "operating point"] == "90 % sensitivity"
    assert t.loc["SSD-300-FE", "vein"] == 6 and t.loc["SSD-300-FE", "air"] == 1
    assert t.loc["SSD-300-FE", "operating point"].startswith("all detections (1 of 2 seeds")


def test_box_scale_table_medians():
    cfg = study.with_overrides(config.load("smoke"), {"study.sizes": [300], "study.seeds": [0]})
    # GT sides 2, 5, 8 px; detections centred on each, half the side (IoU 0.25) or exact
    half = [([10.5, 10.5, 1, 1], 0.9), ([42.25, 42.25, 2.5, 2.5], 0.8), ([72, 72, 4, 4], 0.7)]
    exact = [([10, 10, 2, 2], 0.9), ([41, 41, 5, 5], 0.8), ([70, 70, 8, 8], 0.7)]
    ev = {(300, False, 0): _evaluated(exact), (300, True, 0): _evaluated(half)}
    t = report.box_scale_table(cfg, ev).set_index("model")
    ratio = next(c for c in t.columns if c.startswith("median predicted/GT"))
    big = next(c for c in t.columns if c.startswith("same ratio, GT side >= 5 px"))
    assert t["matched GT boxes, side >= 5 px"].tolist() == [2, 2]
    # one column per quantity, whatever the counts: a second seed with other matches adds rows, not columns
    ev[(300, False, 1)] = _evaluated(exact[:1])
    ev[(300, True, 1)] = _evaluated(half)
    two = report.box_scale_table(study.with_overrides(cfg, {"study.seeds": [0, 1]}), ev)
    assert list(two.columns) == list(report.box_scale_table(cfg, ev).columns) and len(two) == 4
    assert two["matched GT boxes, side >= 5 px"].tolist() == [2, 0, 2, 2]
    iou = next(c for c in t.columns if c.startswith("median IoU"))
    assert t.loc["SSD-300", "matched GT boxes"] == 3 and t.loc["SSD-300", ratio] == 1.0
    assert t.loc["SSD-300", iou] == 1.0
    assert t.loc["SSD-300-FE", ratio] == 0.5 and t.loc["SSD-300-FE", big] == 0.5
    assert abs(t.loc["SSD-300-FE", iou] - 0.25) < 1e-9


def test_holdout_vs_test_per_arm():
    cfg = study.with_overrides(config.load("smoke"), {"study.sizes": [512], "study.seeds": [0, 1]})
    ap = {(False, 0): 0.60, (False, 1): 0.62, (True, 0): 0.70, (True, 1): 0.66}
    ev = {(512, fe, s): {"metrics": {"ap_voc": v}} for (fe, s), v in ap.items()}
    hold = {k: {"metrics": {"ap_voc": v["metrics"]["ap_voc"] - (0.1 if k[1] else 0.02)}} for k, v in ev.items()}
    t = report.holdout_vs_test(cfg, ev, hold).set_index("model")
    assert list(t.index) == ["SSD-512", "SSD-512-FE"]
    assert t.loc["SSD-512", "hold-out minus test"] == pytest.approx(-0.02)
    assert t.loc["SSD-512-FE", "hold-out minus test"] == pytest.approx(-0.1)
    assert list(t["within 0.05"]) == [True, False] and t.loc["SSD-512", "AP hold-out per seed"] == "0.580, 0.600"

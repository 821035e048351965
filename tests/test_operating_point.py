"""Table 4 (cmbfe.study.operating_point): the 90 %-sensitivity point under the IoU and centre rules, at slice
level and for 3D lesions, on a hand-built case whose numbers are worked out below."""

from __future__ import annotations

import pytest

from cmbfe import config, study
from cmbfe import metrics as M
from cmbfe.evaluate import dets_from_coco, gt_from_coco
from cmbfe.study import operating_point as OP

# One patient, slices 0 and 1 (1 mm pixels). CMB 1 spans both slices (2-px boxes), CMB 2 is on slice 0.
GT = [(0, [10, 10, 2, 2], 1), (1, [10, 10, 2, 2], 1), (0, [40, 40, 5, 5], 2)]
# Detections (slice, xywh, score): CMB 1 on slice 0 one pixel off (IoU 1/7, centre 1.4 mm), CMB 1 on slice 1
# exact, CMB 2 exact, and a false positive far from everything on slice 1.
DETS = [(0, [11, 11, 2, 2], 0.9), (0, [40, 40, 5, 5], 0.8), (1, [70, 70, 4, 4], 0.7), (1, [10, 10, 2, 2], 0.6)]


def _evaluated() -> dict:
    images = [{"id": z + 1, "patient_id": "P1", "slice_index": z, "pixel_spacing_mm": [1.0, 1.0]} for z in (0, 1)]
    anns = [{"id": k + 1, "image_id": z + 1, "category_id": 1, "bbox": b, "lesion_id": lid}
            for k, (z, b, lid) in enumerate(GT)]
    gt = gt_from_coco({"images": images, "annotations": anns})
    d = dets_from_coco([{"image_id": z + 1, "bbox": b, "score": s} for z, b, s in DETS], gt)
    return {"gt": gt, "dets": d, "matching": M.match(gt, d, rule="iou")}


def test_points_by_rule_and_level():
    r = _evaluated()
    cfg = config.load("smoke")
    iou, centre = OP.matching(cfg, r, "iou"), OP.matching(cfg, r, "centre")
    assert iou is r["matching"] and OP.matching(cfg, r, "centre") is centre  # computed once, kept
    # slice level, IoU: the offset box is missed, 2 of 3 boxes at most -> 90 % never reached
    assert OP.slice_point(r["gt"], r["dets"], iou) == {"reached": False, "max_sensitivity": pytest.approx(2 / 3)}
    # slice level, centre: all 3 boxes by score 0.6, with the 0.7 false positive: precision 3/4, FP/CMB 1/3
    p = OP.slice_point(r["gt"], r["dets"], centre)
    assert p["reached"] and p["sensitivity"] == 1.0
    assert p["precision"] == pytest.approx(0.75) and p["fp_per_cmb"] == pytest.approx(1 / 3)
    # 3D, IoU: CMB 1 is found on slice 1 (score 0.6), so both CMBs by 0.6; the two CMB-1 detections link into
    # one 3D detection (adjacent slices, overlapping), the false positive is its own: 3 3D detections, 1 FP
    q = OP.lesion_point(r["gt"], r["dets"], iou, rule="iou", iou=0.5, radius_mm=2.5)
    assert q["reached"] and q["sensitivity"] == 1.0
    assert q["precision"] == pytest.approx(2 / 3) and q["fp_per_cmb"] == pytest.approx(0.5)
    # 3D, centre: both CMBs by score 0.8, before the false positive
    q = OP.lesion_point(r["gt"], r["dets"], centre, rule="centre", iou=0.5, radius_mm=2.5)
    assert (q["reached"], q["precision"], q["fp_per_cmb"]) == (True, 1.0, 0.0)


def test_table4_side_by_side_says_when_90_percent_is_not_reached():
    cfg = study.with_overrides(config.load("smoke"), {"study.sizes": [300], "study.seeds": [0, 1]})
    ev = {(300, fe, s): _evaluated() for fe in (False, True) for s in (0, 1)}
    pts = OP.points(cfg, ev)
    assert len(pts) == 2 * 2 * 2 * 2  # FE x seeds x rules x levels
    t = OP.table4(cfg, pts)
    ours = t[t["method"].str.endswith("(this run)")].set_index(["method", "level"])
    row = ours.loc[("SSD-300 (this run)", "slice boxes")]
    assert row["IoU >= 0.5: sensitivity (this run)"] == "90% not reached: max 0.667, 0.667"
    assert row["IoU >= 0.5: precision (this run)"] == "n/a (not reached)"
    assert row["centre <= 2.5 mm: precision (this run)"].startswith("0.750")
    assert row["centre <= 2.5 mm: FP/CMB (this run)"].startswith("0.333")
    les = ours.loc[("SSD-300-FE (this run)", "3D lesions")]
    assert les["IoU >= 0.5: precision (this run)"].startswith("0.667")
    assert les["centre <= 2.5 mm: FP/CMB (this run)"].startswith("0.000")
    assert all("(this run)" in c or "(paper, private data)" in c or c in ("method", "level", "seeds")
               for c in t.columns)
    paper = t[t["method"].str.contains("paper")]
    assert len(paper) == 3 and paper["precision (paper, private data)"].notna().all()
    cap = OP.caption(cfg, pts)
    assert "Slice boxes, SSD-300 with and without FE, every seed: 90% is reached under centre <= 2.5 mm (" in cap
    assert "3D lesions, SSD-300 with and without FE, every seed: 90% is reached under IoU >= 0.5 and centre" in cap
    # CMB 1's 2-mm boxes: 1 of 2 at IoU, 2 of 2 by centre; CMB 2 (5 mm) found either way
    assert "under 3 mm are found with sensitivity 0.500 at IoU >= 0.5 and 1.000 at centre" in cap


def test_some_seeds_short_of_90_percent_are_counted():
    cfg = study.with_overrides(config.load("smoke"), {"study.sizes": [300], "study.seeds": [0, 1]})
    ev = {(300, fe, s): _evaluated() for fe in (False, True) for s in (0, 1)}
    r = ev[(300, True, 1)]
    r["dets"] = M.Detections(r["dets"].boxes[:3], r["dets"].image[:3], r["dets"].scores[:3])  # no slice-1 hit
    r["matching"] = M.match(r["gt"], r["dets"], rule="iou")
    row = OP.table4(cfg, OP.points(cfg, ev)).set_index(["method", "level"]).loc[
        ("SSD-300-FE (this run)", "slice boxes")]
    assert row["centre <= 2.5 mm: sensitivity (this run)"] == "1.000 (1 of 2 seeds reach 90%; max 1.000, 0.667)"
    assert row["centre <= 2.5 mm: precision (this run)"] == "0.750"

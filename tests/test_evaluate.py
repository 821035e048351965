"""``cmbfe evaluate``: input validation and the CLI end to end."""

from __future__ import annotations

import csv
import json

import pytest

from cmbfe import cli
from cmbfe import evaluate as E
from cmbfe.io import InputError


def gt_obj():
    images = [{"id": k + 1, "file_name": f"P{k // 3}/z{k % 3:04d}.png", "width": 64, "height": 64,
               "patient_id": f"P{k // 3}", "slice_index": k % 3, "n_slices": 3, "pixel_spacing_mm": [0.5, 0.5],
               "slice_mm": 2.0, "has_cmb": k in (0, 1, 4), "mimic_kinds": []} for k in range(6)]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 6, 6], "area": 36, "iscrowd": 0,
             "lesion_id": 1},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [10, 10, 6, 6], "area": 36, "iscrowd": 0,
             "lesion_id": 1},
            {"id": 3, "image_id": 5, "category_id": 1, "bbox": [30, 30, 4, 4], "area": 16, "iscrowd": 0,
             "lesion_id": 2}]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "cmb"}]}


DETS = [{"image_id": 1, "category_id": 1, "bbox": [10, 11, 6, 6], "score": 0.9},
        {"image_id": 2, "category_id": 1, "bbox": [11, 10, 6, 6], "score": 0.8},
        {"image_id": 3, "category_id": 1, "bbox": [40, 40, 5, 5], "score": 0.7},
        {"image_id": 5, "category_id": 1, "bbox": [30, 30, 4, 5], "score": 0.4},
        {"image_id": 6, "category_id": 1, "bbox": [2, 2, 5, 5], "score": 0.3}]


def write(tmp_path, gt=None, dets=None):
    gp, dp = tmp_path / "gt.json", tmp_path / "dets.json"
    gp.write_text(gt if isinstance(gt, str) else json.dumps(gt_obj() if gt is None else gt))
    dp.write_text(dets if isinstance(dets, str) else json.dumps(DETS if dets is None else dets))
    return gp, dp


def test_cli_end_to_end(tmp_path, capsys):
    gp, dp = write(tmp_path)
    objs = tmp_path / "slice_objects.csv"
    objs.write_text("patient_id,slice_index,kind,object_id,x0,y0,x1,y1\n"
                    "P0,0,cmb,1,10,10,16,16\nP0,2,vein,7,38,38,50,50\nP9,0,air,1,0,0,9,9\n")
    out = tmp_path / "res" / "metrics.json"
    rc = cli.main(["evaluate", "--gt", str(gp), "--dets", str(dp), "--out", str(out), "--objects", str(objs),
                   "--bootstrap", "50", "--seed", "1"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads(out.read_text())
    assert (m["n_gt"], m["n_dets"], m["n_images"], m["n_patients"], m["tp"], m["fp"]) == (3, 5, 6, 2, 3, 2)
    assert m["ap_voc"] == pytest.approx(2 / 3 + 1 / 3 * 3 / 4)
    assert m["precision_at_sensitivity_0.9"] == pytest.approx(3 / 4) and m["fp_per_cmb"] == pytest.approx(1 / 3)
    assert m["lesion_sensitivity"] == 1.0 and m["lesion_fp_per_scan"] == pytest.approx(0.5)
    assert m["lesion_at"] == "sensitivity_0.9" and m["lesion_fp_per_scan_all"] == pytest.approx(1.0)
    assert m["fp_attribution"]["all"]["vein"] == 1 and m["fp_attribution"]["all"]["other"] == 1
    assert m["fp_attribution"]["at_sensitivity_0.9"]["other"] == 0
    assert m["bootstrap"]["ap_voc"]["lo"] <= m["ap_voc"] <= m["bootstrap"]["ap_voc"]["hi"]
    assert m["match"] == {"rule": "iou", "iou": 0.5, "radius_mm": None}
    rows = list(csv.DictReader((out.parent / "pr.csv").read_text().splitlines()))
    assert len(rows) == 5 and rows[0]["score"] == "0.9" and rows[-1]["tp"] == "3"
    rows = list(csv.DictReader((out.parent / "froc.csv").read_text().splitlines()))
    assert float(rows[-1]["fp_per_scan"]) == 1.0 and float(rows[-1]["fp_per_slice"]) == pytest.approx(2 / 6)
    assert "AP" in capsys.readouterr().out


def test_cli_centre_rule_and_null_for_undefined(tmp_path):
    gt = gt_obj()
    gt["annotations"] = []
    gp, dp = write(tmp_path, gt=gt)
    out = tmp_path / "m.json"
    assert E.main(["--gt", str(gp), "--dets", str(dp), "--out", str(out), "--match", "centre",
                   "--radius-mm", "3", "--bootstrap", "0"]) == 0
    m = json.loads(out.read_text())
    assert m["ap_voc"] is None and m["sensitivity"] is None and m["fp"] == 5
    assert m["match"] == {"rule": "centre", "iou": None, "radius_mm": 3.0}


def test_centre_rule_needs_spacing(tmp_path):
    gt = gt_obj()
    for im in gt["images"]:
        del im["pixel_spacing_mm"]
    gp, dp = write(tmp_path, gt=gt)
    with pytest.raises(InputError, match="pixel_spacing_mm"):
        E.main(["--gt", str(gp), "--dets", str(dp), "--out", str(tmp_path / "m.json"), "--match", "centre"])


def _dets_with(**change):
    d = [dict(x) for x in DETS]
    d[2].update(change)
    return d


@pytest.mark.parametrize("gt, dets, msg", [
    ("{not json", None, "gt.json: not valid JSON"),
    (None, "[{]", "dets.json: not valid JSON"),
    ({"images": []}, None, "missing key 'annotations'"),
    ({**gt_obj(), "images": [{"id": 1, "slice_index": 0}]}, None, r"images\[0\] is missing key 'patient_id'"),
    ({**gt_obj(), "annotations": [{"id": 1, "image_id": 99, "bbox": [0, 0, 1, 1]}]}, None, "99 is not an image"),
    ({**gt_obj(), "annotations": [{"id": 1, "image_id": 1, "bbox": [0, 0, -1, 1]}]}, None, "negative width"),
    (None, _dets_with(image_id=77), r"detections\[2\].image_id 77 is not an image id"),
    (None, _dets_with(bbox=[1, 1, -3, 2]), r"detections\[2\].bbox has a negative width"),
    (None, _dets_with(bbox=[1, 1, 3]), r"detections\[2\].bbox must be 4 numbers"),
    (None, _dets_with(bbox=[1, 1, "3", 3]), r"detections\[2\].bbox must be 4 numbers"),
    (None, _dets_with(bbox=[1, float("nan"), 3, 3]), r"detections\[2\].bbox has NaN"),
    (None, _dets_with(score=float("nan")), r"detections\[2\].score is NaN"),
    (None, _dets_with(score="high"), r"detections\[2\].score must be a number"),
    (None, _dets_with(category_id=5), r"detections\[2\].category_id 5"),
    (None, [{"image_id": 1, "bbox": [0, 0, 1, 1]}], r"detections\[0\] is missing key 'score'"),
    (None, {"x": 1}, "must be a JSON list"),
])
def test_bad_input(tmp_path, capsys, gt, dets, msg):
    gp, dp = write(tmp_path, gt=gt, dets=dets)
    with pytest.raises(InputError, match=msg):
        E.main(["--gt", str(gp), "--dets", str(dp), "--out", str(tmp_path / "m.json")])
    rc = cli.main(["evaluate", "--gt", str(gp), "--dets", str(dp), "--out", str(tmp_path / "m.json")])
    assert rc == 2 and "error" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def test_missing_file_and_bad_objects(tmp_path):
    gp, dp = write(tmp_path)
    with pytest.raises(InputError, match="file not found"):
        E.main(["--gt", str(tmp_path / "nope.json"), "--dets", str(dp), "--out", str(tmp_path / "m.json")])
    objs = tmp_path / "o.csv"
    objs.write_text("patient_id,slice_index,kind\nP0,0,vein\n")
    with pytest.raises(InputError, match="missing columns"):
        E.main(["--gt", str(gp), "--dets", str(dp), "--out", str(tmp_path / "m.json"), "--objects", str(objs)])


def test_python_api(tmp_path):
    gp, dp = write(tmp_path)
    gt = E.load_gt(gp)
    res = E.evaluate(gt, E.load_detections(dp, gt), match="iou", iou=0.5)
    assert res["metrics"]["tp"] == 3 and len(res["curve"].tp) == 5
    paths = E.write_outputs(res, tmp_path / "x" / "metrics.json")
    assert all(p.exists() for p in paths)

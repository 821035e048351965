from __future__ import annotations

import json
import os

import pytest

from cmbfe.datadir import SPLITS, DataDir, Geometry
from cmbfe.errors import InputError


def _coco(n: int = 1) -> dict:
    ims = [{"id": i + 1, "file_name": f"P1/z{i:04d}.png", "width": 64, "height": 48, "patient_id": "P1",
            "slice_index": i, "pixel_spacing_mm": [0.5, 0.25], "slice_mm": 2.0} for i in range(n)]
    return {"images": ims, "annotations": [], "categories": [{"id": 1, "name": "cmb"}]}


def test_paths_follow_the_layout(tmp_path):
    d = DataDir(tmp_path / "pre")
    assert d.root == tmp_path / "pre" and os.fspath(d) == str(tmp_path / "pre") and str(d) == os.fspath(d)
    assert d.images == tmp_path / "pre" / "images"
    assert d.split_path("val") == tmp_path / "pre" / "annotations" / "val.json"
    assert d.split_path("test", geometric=True) == tmp_path / "pre" / "annotations" / "test_geometric.json"
    assert d.image_path("P1/z0003.png") == tmp_path / "pre" / "images" / "P1" / "z0003.png"
    assert d.slice_objects.name == "slice_objects.csv" and d.splits_csv.name == "splits.csv"
    assert d.manifest.name == "preprocess.json"
    assert SPLITS == ("train", "val", "test")
    assert DataDir(str(tmp_path)) == DataDir(tmp_path)


def test_write_then_read_a_split(tmp_path):
    d = DataDir(tmp_path)
    obj = _coco(2)
    del obj["annotations"]
    path = d.write_split("train", obj)
    assert path == d.split_path("train") and d.has_split("train") and not d.has_split("val")
    assert path.read_text() == json.dumps(obj)  # compact, as preprocess has always written it
    got = d.coco("train")
    assert got["images"] == obj["images"] and got["annotations"] == []
    d.write_split("val", _coco(1), geometric=True)
    assert d.has_split("val", geometric=True) and not d.has_split("val")
    assert len(d.coco("val", geometric=True)["images"]) == 1


@pytest.mark.parametrize("text, match", [(None, "not found"), ("{", "not valid JSON"),
                                         ('{"annotations": []}', "not a COCO file"),
                                         ("[1]", "not a COCO file")])
def test_bad_split_file_names_the_file(tmp_path, text, match):
    d = DataDir(tmp_path)
    if text is not None:
        d.annotations.mkdir()
        d.split_path("test").write_text(text)
    with pytest.raises(InputError, match=rf"annotations/test\.json: .*{match}"):
        d.coco("test")


def test_training_geometry(tmp_path):
    d = DataDir(tmp_path)
    d.write_split("train", _coco(1))
    assert d.training_geometry() == Geometry((0.5, 0.25), 64, 2.0)
    bad = _coco(1)
    del bad["images"][0]["pixel_spacing_mm"]
    d.write_split("val", bad)
    with pytest.raises(InputError, match="val.json: no image with pixel_spacing_mm"):
        d.training_geometry("val")
    d.write_split("test", {"images": []})
    with pytest.raises(InputError, match="test.json"):
        d.training_geometry("test")
    with pytest.raises(InputError, match="all.json: COCO annotation file not found"):
        d.training_geometry("all")


def test_manifest(tmp_path):
    d = DataDir(tmp_path)
    with pytest.raises(InputError, match="preprocess.json: not found"):
        d.manifest_dict()
    d.manifest.write_text("{oops")
    with pytest.raises(InputError, match="preprocess.json: cannot read"):
        d.manifest_dict()
    d.manifest.write_text('{"summary": {"splits": {"train": 3}}}')
    assert d.manifest_dict()["summary"]["splits"] == {"train": 3}


def test_true_cmbs_are_every_cmb_of_the_split_boxed_or_not(tmp_path):
    import pandas as pd

    d = DataDir(tmp_path / "pre")
    with pytest.raises(InputError, match="splits.csv"):
        d.true_cmbs("test")
    d.root.mkdir()
    pd.DataFrame({"patient_id": ["P1", "P2", "P3"], "split": ["test", "test", "train"]}).to_csv(d.splits_csv,
                                                                                                index=False)
    with pytest.raises(InputError, match="lesions.csv"):
        d.true_cmbs("test")
    pd.DataFrame({"lesion_id": [1, 2, 1, 1], "patient_id": ["P1", "P1", "P2", "P3"],
                  "kind": ["cmb"] * 4}).to_csv(d.lesions_csv, index=False)
    coco = _coco(2)
    coco["images"][1]["patient_id"] = "P2"
    coco["annotations"] = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3], "lesion_id": 2},
                           {"id": 2, "image_id": 2, "category_id": 1, "bbox": [1, 1, 3, 3], "lesion_id": 1}]
    d.write_split("test", coco)
    t = d.true_cmbs("test")  # P3 is in train; P1's lesion 1 has no box (too faint for the label model)
    assert list(zip(t["patient_id"], t["lesion_id"], t["boxed"])) == [("P1", 1, False), ("P1", 2, True),
                                                                      ("P2", 1, True)]
    assert d.lesions_csv == tmp_path / "pre" / "lesions.csv"

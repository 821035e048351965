"""Inference: COCO results (xywh, PNG pixel frame, within the image) from a run folder and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from pycocotools.coco import COCO
from test_data import SIZE, make_pre
from torch import nn

from cmbfe import cli
from cmbfe import config as C
from cmbfe.cocoresults import coco_results
from cmbfe.io import InputError
from cmbfe.modelfolder import load, load_model
from cmbfe.predict import detections_to_coco, predict
from cmbfe.train import fit


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    pre = make_pre(root)
    cfg = C.load(
        None,
        [
            "model.size=128",
            "model.width=0.125",
            "model.priors=cmb",
            "train.iterations=2",
            "train.batch_size=2",
            "train.checkpoint_every=0",
            "model.input=2.5d",
        ],
    )
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(cfg, root / "run", data=pre, progress=False)
    finally:
        torch.set_num_threads(before)
    return root / "run", pre


class Fixed(nn.Module):
    """Stand-in detector returning the same boxes (xyxy px) for every image."""

    def forward(self, images):
        b = torch.tensor([[-5.0, 10.0, 20.0, 30.0], [60.0, 60.0, 80.0, 70.0], [5.0, 5.0, 5.0, 9.0]])
        return [
            {"boxes": b, "scores": torch.tensor([0.9, 0.5, 0.3]), "labels": torch.ones(3)} for _ in images
        ]


def test_conversion_clips_to_image_and_is_xywh():
    out = detections_to_coco(Fixed()([0])[0], image_id=7, width=64, height=64)
    assert [d["bbox"] for d in out] == [[0.0, 10.0, 20.0, 20.0], [60.0, 60.0, 4.0, 4.0]]
    assert all(d["image_id"] == 7 and d["category_id"] == 1 for d in out)
    assert [d["score"] for d in out] == [0.9, 0.5]


def test_coco_results_keep_extra_fields_with_their_boxes():
    boxes = [[1.0, 2.0, 4.0, 6.0], [5.0, 5.0, 5.0, 9.0], [0.25, 0.5, 1.0, 1.75]]  # the second has no area
    out = coco_results(boxes, [0.5, 0.4, 0.3], [3, 4, 5], extra={"lesion_id": [1, 2, 0]})
    assert out == [{"image_id": 3, "category_id": 1, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.5,
                    "lesion_id": 1},
                   {"image_id": 5, "category_id": 1, "bbox": [0.25, 0.5, 0.75, 1.25], "score": 0.3,
                    "lesion_id": 0}]
    with pytest.raises(ValueError, match="lesion_id"):
        coco_results(boxes, [0.5, 0.4, 0.3], 1, extra={"lesion_id": [1]})


def test_predict_covers_every_image(run):
    _, pre = run
    dets = predict(Fixed(), pre, "test", input="gray3", batch_size=4)
    coco = json.loads((pre / "annotations" / "test.json").read_text())
    assert sorted({d["image_id"] for d in dets}) == sorted(im["id"] for im in coco["images"])


def test_predict_takes_its_threads_from_cmbfe_threads(run, monkeypatch):
    _, pre = run
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("CMBFE_THREADS", "1")  # as `cmbfe reproduce` sets it for side-by-side kernels
        predict(Fixed(), pre, "test", input="gray3", batch_size=4)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_load_model_and_cli_write_valid_coco(run, tmp_path, monkeypatch):
    run_dir, pre = run
    monkeypatch.setenv("CMBFE_THREADS", "1")
    model = load_model(run_dir)
    assert not model.training
    out = tmp_path / "dets.json"
    before = torch.get_num_threads()
    try:
        assert (
            cli.main(
                [
                    "predict",
                    "--run",
                    str(run_dir),
                    "--split",
                    "test",
                    "--data",
                    str(pre),
                    "--out",
                    str(out),
                    "--device",
                    "cpu",
                    "--batch-size",
                    "3",
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(before)
    dets = json.loads(out.read_text())
    assert isinstance(dets, list) and dets
    for d in dets:
        x, y, w, h = d["bbox"]
        assert d["category_id"] == 1 and 0.0 <= d["score"] <= 1.0
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= SIZE + 1e-6 and y + h <= SIZE + 1e-6
    gt = COCO(str(pre / "annotations" / "test.json"))
    res = gt.loadRes(str(out))
    assert len(res.getAnnIds()) == len(dets)
    # same weights, same detections as the in-process call
    again = predict(model, pre, "test", input="2.5d", batch_size=2)
    assert len(again) == len(dets) and again[0]["image_id"] == dets[0]["image_id"]


def test_model_folder_loads_from_its_weights_file(run):
    run_dir, _ = run
    mf = load(run_dir / "model.pt")
    assert mf.path == run_dir and mf.meta == {} and mf.card == "" and mf.training_geometry() is None
    assert mf.cfg.model.input == "2.5d" and not mf.model.training
    with pytest.raises(InputError, match="not a model"):
        load(run_dir / "config.yaml")


def test_missing_run_named(tmp_path):
    with pytest.raises(InputError, match="config.yaml"):
        load_model(tmp_path)
    assert cli.main(["predict", "--run", str(tmp_path), "--out", str(tmp_path / "d.json")]) == 2

"""Patient-level CV folds and the paper's numbers in the study tables (no training)."""

import json

import numpy as np
import pandas as pd
import pytest
from test_data import make_pre

from cmbfe import config, experiments, paper, report


def test_folds_are_patient_disjoint_and_cover_everyone(tmp_path, monkeypatch):
    pre = make_pre(tmp_path, {"train": ["P01", "P02", "P03"], "val": ["P04"], "test": ["P05", "P06"]})
    cfg = config.load("smoke", ["study.folds=3", f"data_dir={tmp_path}/d"])
    dirs = experiments._fold_dirs(cfg, pre)
    assert len(dirs) == 3
    tested = []
    for d in dirs:
        splits = {s: json.loads((d / "annotations" / f"{s}.json").read_text()) for s in ("train", "val", "test")}
        pats = {s: {im["patient_id"] for im in c["images"]} for s, c in splits.items()}
        assert not (pats["train"] & pats["test"]) and not (pats["val"] & pats["test"])
        assert not (pats["train"] & pats["val"])
        test = splits["test"]
        n_pos = sum(bool(im["has_cmb"]) for im in test["images"])
        assert len(test["images"]) - n_pos <= n_pos  # as many CMB-free slices as CMB slices, at most
        ids = {im["id"] for im in test["images"]}
        assert all(a["image_id"] in ids for a in test["annotations"])
        assert (d / "images").is_symlink()
        tested += sorted(pats["test"])
    assert sorted(tested) == [f"P0{i}" for i in range(1, 7)]


def test_cv_summary_sets_paper_beside_this_run():
    cfg = config.load("smoke")
    folds = pd.DataFrame({"fold": [0, 1], "AP SSD": [0.5, 0.7], "AP SSD-FE": [0.6, 0.7],
                          "AP difference (FE - SSD)": [0.1, 0.0]})
    s = experiments.cv_summary(cfg, folds)
    assert np.isclose(s.loc[0, f"mean AP {report.RUN}"], 0.6)
    assert s.loc[1, f"mean AP, 10 folds {report.PAPER}"] == paper.CV_MEAN_AP[True]
    assert all("(this run)" in c or "(paper, private data)" in c or c in ("model", "folds") for c in s.columns)


def test_unknown_ablation_is_named_at_load():
    with pytest.raises(config.ConfigError, match=r"study\.ablations\[0\]: 'nope' is not one of"):
        config.load("smoke", ["study.ablations=[nope]"])
    assert set(experiments.ABLATIONS) == set(config.load("smoke").study.ablations)


def test_profile_without_secondary_runs_trains_nothing(tmp_path, monkeypatch):
    """study.folds 0, study.ablations [] and study.timing_precision false: CV and ablations are empty and
    Table 3 only times steps (no model is trained: ensure_run must not be called)."""
    pre = make_pre(tmp_path, {"train": ["P01", "P02"], "val": ["P03"], "test": ["P04"]})
    cfg = config.load("smoke", ["study.folds=0", "study.ablations=[]", "study.timing_precision=false",
                                "study.timing_backbones=[vgg16:128]", "study.timing_repeats=1",
                                "study.timing_batch=2", f"data_dir={tmp_path}/d"])

    def no_training(*a, **k):
        raise AssertionError("a model was trained")

    monkeypatch.setattr(experiments.study, "ensure_run", no_training)
    assert experiments.cross_validate(cfg, pre).empty and experiments.ablations(cfg, pre).empty
    t3 = experiments.table3(cfg, pre)
    assert len(t3) == 1 and t3.loc[0, f"FE time ratio {report.RUN}"] > 0
    assert not any("precision@90% SSD" in c and report.RUN in c for c in t3.columns)
    with pytest.raises(config.ConfigError, match="study.folds"):
        config.load("smoke", ["study.folds=1"])

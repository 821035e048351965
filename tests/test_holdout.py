"""The hold-out cohort (issue #17): its own seed and patients, the study's generator and label model, one
split ``holdout`` built as the test split is; ``preprocess_cohort(split=...)`` underneath."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_preprocess import make_raw, tiny_cfg

from cmbfe import config as C
from cmbfe.datadir import DataDir
from cmbfe.holdout import HOLDOUT_SPLIT, holdout_pre, holdout_raw, holdout_synth, main, make_holdout
from cmbfe.preprocess import preprocess_cohort
from cmbfe.synth import synthesize_patient

SMALL = ["synth.matrix=64", "synth.workers=1", "preprocess.workers=1", "preprocess.n4_iterations=[5]",
         "holdout.patients=2", "holdout.seed=11"]


@pytest.fixture(scope="module")
def holdout(tmp_path_factory):
    cfg = C.load("smoke", [*SMALL, f"data_dir={tmp_path_factory.mktemp('ho')}/{{profile}}"])
    return cfg, make_holdout(cfg, progress=False)


def test_holdout_is_its_own_cohort_in_one_split(holdout):
    cfg, pre = holdout
    assert pre == holdout_pre(cfg) == cfg.holdout_path() / "pre" and holdout_raw(cfg).is_dir()
    d = DataDir(pre)
    assert sorted(p.name for p in d.annotations.iterdir()) == ["holdout.json", "holdout_geometric.json"]
    splits = pd.read_csv(d.splits_csv)
    assert splits.to_dict("list") == {"patient_id": ["HOLD-0001", "HOLD-0002"], "split": ["holdout"] * 2}
    cohort = pd.read_csv(holdout_raw(cfg) / "cohort.csv")
    assert (cohort["seed"] == 11).all() and len(cohort) == 2
    # the study's generator at the hold-out seed: patient 1 is synthesize_patient(0) of that seed, and not the
    # study's patient SYN-0001 (seed 0)
    sc = holdout_synth(cfg)
    assert (sc.seed, sc.patients, sc.matrix) == (11, 2, 64)
    les = pd.read_csv(pre / "lesions.csv")
    vol = synthesize_patient(0, sc, "HOLD")
    assert (les["patient_id"] == "HOLD-0001").sum() == len(vol.lesions)
    study = synthesize_patient(0, cfg.synth)
    assert not np.array_equal(vol.data, study.data)
    # built as the test split is: every CMB slice, then mimic-only negatives; the annotator label model
    coco = d.coco(HOLDOUT_SPLIT)
    pos = [im for im in coco["images"] if im["has_cmb"]]
    neg = [im for im in coco["images"] if not im["has_cmb"]]
    assert pos and all(im["mimic_kinds"] for im in neg)
    assert len(neg) <= round(cfg.preprocess.test_negatives_ratio * len(pos))
    assert {a["image_id"] for a in coco["annotations"]} == {im["id"] for im in pos}
    manifest = json.loads(d.manifest.read_text())
    assert manifest["summary"]["splits"] == {"holdout": 2} and manifest["config"]["preprocess"]["labels"] == \
        "annotator"


def test_no_holdout_and_bad_requests_are_clear_errors(tmp_path, capsys):
    cfg = C.load("smoke", ["holdout.patients=0", f"data_dir={tmp_path}"])
    with pytest.raises(C.ConfigError, match="holdout.patients"):
        make_holdout(cfg, progress=False)
    assert not cfg.holdout_path().exists()
    with pytest.raises(C.ConfigError, match="holdout.seed"):
        main(["--params", "smoke", "--set", "holdout.seed=0"])


def test_preprocess_into_one_named_split(tmp_path):
    raw = make_raw(tmp_path / "RAW", n_patients=3)
    out = tmp_path / "PRE"
    s = preprocess_cohort(raw, out, tiny_cfg(), progress=False, split="external")
    assert s["splits"] == {"external": 3}
    d = DataDir(out)
    assert d.has_split("external") and not d.has_split("train") and not d.has_split("test")
    coco = d.coco("external")
    assert {im["patient_id"] for im in coco["images"]} == {"SYN-0001", "SYN-0002", "SYN-0003"}
    with pytest.raises(ValueError, match="split"):
        preprocess_cohort(raw, tmp_path / "PRE2", tiny_cfg(), progress=False, split="all")
    assert not (tmp_path / "PRE2").exists()

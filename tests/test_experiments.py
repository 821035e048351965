"""Patient-level CV folds and the paper's numbers in the study tables (no training)."""


import numpy as np
import pandas as pd
import pytest
from test_data import make_pre

from cmbfe import config
from cmbfe.datadir import SPLITS, DataDir
from cmbfe.study import experiments, paper, report


def test_folds_are_patient_disjoint_and_cover_everyone(tmp_path, monkeypatch):
    pre = make_pre(tmp_path, {"train": ["P01", "P02", "P03"], "val": ["P04"], "test": ["P05", "P06"]})
    cfg = config.load("smoke", ["study.folds=3", f"data_dir={tmp_path}/d"])
    dirs = experiments._fold_dirs(cfg, pre)
    assert len(dirs) == 3
    tested = []
    for d in dirs:
        splits = {s: DataDir(d).coco(s) for s in SPLITS}
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
    assert all("(this run)" in c or "(paper, private data)" in c or c in ("model", "folds")
               for c in s.columns)


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

    monkeypatch.setattr(experiments.runs, "ensure_run", no_training)
    assert experiments.cross_validate(cfg, pre).empty and experiments.ablations(cfg, pre).empty
    t3 = experiments.table3(cfg, pre)
    assert len(t3) == 1 and t3.loc[0, f"FE time ratio {report.RUN}"] > 0
    assert not any("precision@90% SSD" in c and report.RUN in c for c in t3.columns)
    with pytest.raises(config.ConfigError, match="study.folds"):
        config.load("smoke", ["study.folds=1"])


def test_fe_readings_pair_every_arm_with_no_fe_of_the_same_seed(monkeypatch):
    import zlib

    from test_stats import cohort

    from cmbfe import metrics as M
    from cmbfe import stats
    from cmbfe.evaluate import dets_from_coco

    _, dets, g, _ = cohort(12, seed=0)
    trained = []

    def fake_run(c):
        trained.append((c.fe.enabled, c.fe.placement, c.fe.variant, c.fe.schedule, c.train.seed))
        return c

    def fake_eval(c, run, pre, **kw):  # the same test set, scores perturbed per arm and seed
        key = repr((c.fe.enabled, c.fe.placement, c.fe.variant, c.fe.schedule, c.train.seed)).encode()
        rng = np.random.default_rng(zlib.crc32(key))
        dd = dets_from_coco([{**x, "score": float(np.clip(x["score"] + rng.normal(0, 0.2), 0, 1))}
                             for x in dets], g)
        m = M.match(g, dd)
        return {"metrics": {"ap_voc": M.ap_voc(m.tp[m.order], g.n_gt)}, "boot": stats.prepare(g, dd, m)}

    monkeypatch.setattr(experiments.runs, "ensure_run", fake_run)
    monkeypatch.setattr(experiments, "evaluate_run", fake_eval)
    cfg = config.load("smoke", ["study.fe_arms=[R1, R2 cosine]", "study.seeds=[0, 1]", "eval.bootstrap=50"])
    per_seed, summary = experiments.fe_readings(cfg, None)
    assert list(per_seed["arm"]) == ["no FE", "no FE", "R1", "R1", "R2 cosine", "R2 cosine"]
    assert (False, "pre_l2norm", "fe", "constant", 1) in trained  # no FE (placement is the default, unused)
    assert (True, "post_l2norm", "fe", "cosine", 0) in trained
    assert (True, "pre_l2norm", "fe", "constant", 1) in trained
    ap = per_seed.set_index(["arm", "seed"])[f"AP {report.RUN}"]
    r1 = per_seed[per_seed["arm"] == "R1"].set_index("seed")["AP - no FE"]
    assert r1[1] == pytest.approx(ap[("R1", 1)] - ap[("no FE", 1)])
    s = summary.set_index("arm")
    sd = np.std([ap[("no FE", 0)], ap[("no FE", 1)]], ddof=1)
    assert s.loc["no FE", f"no-FE seed SD {report.RUN}"] == pytest.approx(sd)
    assert s.loc["R1", f"SSD-FE - SSD {report.PAPER}"] == pytest.approx(0.023)
    assert np.isnan(s.loc["R2 cosine", f"SSD-FE - SSD {report.PAPER}"])
    fig = experiments.fe_readings_figure(per_seed)
    assert len(fig.axes[0].get_xticklabels()) == 2
    empty = experiments.fe_readings(config.load("smoke"), None)
    assert empty[0].empty and empty[1].empty

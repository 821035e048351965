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


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04, 0.5 (m = 4): 0.04, 0.09, max(0.09, 0.08) = 0.09, 0.5; NaN not counted
    got = experiments.holm([0.01, 0.04, 0.03, np.nan, 0.5])
    np.testing.assert_allclose(got, [0.04, 0.09, 0.09, np.nan, 0.5])
    assert experiments.holm([0.6, 0.7])[1] == pytest.approx(1.0) and np.isnan(experiments.holm([np.nan])[0])


def test_readings_summary_on_synthetic_numbers():
    """Per-arm seeds (5 for no FE/R1/sham/mask, 3 for the others), the t-interval, the t-test p, Holm's
    column computed by hand, the no-FE seed SD beside every arm and the paper's +0.023 beside R1."""
    from scipy import stats as st

    ap = f"AP {report.RUN}"
    base = [0.50, 0.52, 0.48, 0.51, 0.49]
    diffs = {"R1": [0.02, 0.03, 0.01, 0.04, 0.02], "R1 sham": [0.01, -0.02, 0.00, 0.02, -0.01],
             "mask loss": [0.05, 0.04, 0.06, 0.05, 0.03], "R2 cosine": [-0.02, -0.03, -0.01]}
    rows = [{"arm": "no FE", "seed": s, ap: v} for s, v in enumerate(base)]
    for a, d in diffs.items():
        rows += [{"arm": a, "seed": s, ap: base[s] + v, "AP - no FE": v, "p": 0.5} for s, v in enumerate(d)]
    t = experiments.readings_summary(pd.DataFrame(rows)).set_index("arm")
    assert list(t["seeds"]) == [5, 5, 5, 5, 3]
    p = {a: st.ttest_1samp(d, 0).pvalue for a, d in diffs.items()}
    order = sorted(p, key=p.get)  # Holm by hand: m = 4
    want, run = {}, 0.0
    for i, a in enumerate(order):
        run = max(run, min(1.0, p[a] * (4 - i)))
        want[a] = run
    for a, d in diffs.items():
        assert t.loc[a, experiments.P_ARM] == pytest.approx(p[a])
        assert t.loc[a, experiments.P_HOLM] == pytest.approx(want[a])
        assert t.loc[a, f"mean AP - no FE {report.RUN}"] == pytest.approx(np.mean(d))
    assert np.isnan(t.loc["no FE", experiments.P_HOLM])
    h = st.t.ppf(0.975, 4) * np.std(diffs["R1"], ddof=1) / np.sqrt(5)
    assert t.loc["R1", "95% t-interval over seeds"] == f"[{0.024 - h:+.3f}, {0.024 + h:+.3f}]"
    np.testing.assert_allclose(t[f"no-FE seed SD {report.RUN}"], np.std(base, ddof=1))
    assert t.loc["R1", f"SSD-FE - SSD {report.PAPER}"] == pytest.approx(0.023)
    assert "holm" in experiments.P_HOLM.lower()


def test_arm_seeds_pair_every_arm_with_no_fe():
    cfg = config.load("smoke", ["study.seeds=[0, 1, 2, 3, 4]", "study.fe_arms=[R1, R2 cosine, R1 sham]",
                                "study.fe_arm_seeds={R2 cosine: 3, R1: 2, R1 sham: 2}"])
    s = experiments.arm_seeds(cfg, ["no FE", *cfg.study.fe_arms])
    assert s == {"no FE": (0, 1, 2), "R1": (0, 1), "R2 cosine": (0, 1, 2), "R1 sham": (0, 1)}
    with pytest.raises(config.ConfigError, match="study.fe_arm_seeds"):
        config.load("smoke", ["study.fe_arm_seeds={R1: 9}"])
    with pytest.raises(config.ConfigError, match="study.fe_arm_seeds"):
        config.load("smoke", ["study.fe_arm_seeds={R9: 1}"])


def test_fe_readings_profile_has_the_seeds_of_issue_19():
    cfg = config.load("fe-readings")
    arms = list(cfg.study.fe_arms)
    assert len(arms) == 8 and any("sham" in a for a in arms) and any("mask" in a for a in arms)
    seeds = experiments.arm_seeds(cfg, arms)
    for a in arms:
        assert len(seeds[a]) >= (5 if a in ("no FE", "R1", "R1 sham", "mask loss") else 3)
    n_runs = sum(len(v) for v in seeds.values())
    assert n_runs * 6.5 / cfg.study.jobs <= 150  # ~6.5 min per default run, two at a time (README)

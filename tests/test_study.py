"""The study layer: configuration keys, grids, and the cached data / run / prediction steps (with the heavy
stages replaced by fakes, so nothing is trained here)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from cmbfe import config, study
from cmbfe.datadir import DataDir
from cmbfe.errors import InputError
from cmbfe.study import runs


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A stand-in repository root: results/, figures/, runs/ and data/ of the profile all go under it."""
    monkeypatch.setattr(config, "REPO_ROOT", tmp_path)
    return tmp_path


# run_key of configurations whose runs are cached, computed by the code before section.key overrides and the
# train keys of KEY_NEUTRAL existed (commit b32d4ab), each with the data key it had then: the same run
# configuration must keep its key, whatever the override syntax or the new keys at their neutral values.
# THEN: the values those runs had where a profile's default has changed since (a new default is a new run).
THEN = {"fe.placement": "post_l2norm"}
# and the default profile's training recipe of that commit (issue #9 changed the profile)
THEN_PROFILE = {"default": {"model.train_crop": 256, "train.iterations": 400, "train.schedule": "step",
                            "train.warmup": 0, "train.grad_clip": 0.0, "train.val_every": -1,
                            "train.cosine_end": 1.0, "train.lr_min": 0.0, "model.max_box_mm": 0.0,
                            "model.heads": 0, "train.val_subset": 0}}  # and issue #17's
PINNED = [
    ("smoke", "42dff1ecd035", {"size": 128, "fe": False, "seed": 0}, {}, "de2679faeb15"),
    ("smoke", "42dff1ecd035", {"size": 128, "fe": True, "seed": 0}, {}, "c133ec38ed29"),
    ("default", "6f882915081b", {"size": 512, "fe": False, "seed": 0}, {}, "655d58710cb3"),
    ("default", "6f882915081b", {"size": 512, "fe": False, "seed": 1}, {}, "2cd2dbfce1eb"),
    ("default", "6f882915081b", {}, {"fe.enabled": True, "train.iterations": 30, "train.val_every": 0,
                                     "study.secondary": None}, "9096dbe578e0"),
    ("paper", "614b542ff6b3", {"size": 300, "fe": False, "seed": 0}, {"model.pretrained": False},
     "070bee2cfef2"),
]


@pytest.mark.parametrize("profile, data_key, grid, over, key", PINNED)
def test_run_keys_of_cached_runs_do_not_change(profile, data_key, grid, over, key, monkeypatch):
    monkeypatch.setattr(runs, "data_key", lambda cfg: data_key)
    cfg = config.load(profile)
    over = {**THEN, **THEN_PROFILE.get(profile, {}), **over}
    if over.pop("study.secondary", 0) is None:
        over = {**over, **cfg.study.secondary}  # as experiments.cross_validate builds a CV run
    assert study.run_key(study.grid_config(cfg, **grid, overrides=over)) == key


def test_run_key_ignores_what_does_not_change_the_weights():
    cfg = study.grid_config(config.load("smoke"), fe=True, seed=0)
    same = study.with_overrides(cfg, {"train.workers": 2, "train.log_every": 1, "train.checkpoint_every": 3,
                                      "train.device": "cpu", "train.tensorboard": True, "study.jobs": 2,
                                      "train.ema": 0.0, "train.schedule": "step"})
    assert study.run_key(same) == study.run_key(cfg)
    for over in ({"train.seed": 1}, {"fe.enabled": False}, {"train.ema": 0.5}, {"train.schedule": "cosine"},
                 {"model.size": 256}, {"eval.match": "centre"}, {"train.channels_last_cpu": True}):
        assert study.run_key(study.with_overrides(cfg, over)) != study.run_key(cfg), over
    assert study.data_key(study.with_overrides(cfg, {"model.size": 256})) == study.data_key(cfg)
    assert study.data_key(study.with_overrides(cfg, {"synth.seed": 1})) != study.data_key(cfg)
    assert study.data_key(study.with_overrides(cfg, {"synth.workers": 7})) == study.data_key(cfg)


def test_grids_and_tags():
    cfg = config.load("default")
    grid = study.main_grid(cfg)
    assert len(grid) == len(cfg.study.sizes) * 2 * len(cfg.study.seeds)
    # Table 2: SSD-300 and SSD-512, each without and with FE, three seeds each
    assert grid[0] == {"size": 300, "fe": False, "seed": 0} and grid[-1] == {"size": 512, "fe": True, "seed": 2}
    assert len(grid) == 12 and {g["size"] for g in grid} == {300, 512}
    c = study.grid_config(cfg, size=256, fe=True, seed=2,
                          overrides={"model.priors": "paper", "model.train_crop": 0})
    assert (c.model.size, c.fe.enabled, c.train.seed, c.model.priors) == (256, True, 2, "paper")
    assert study.run_tag(c) == "vgg16-256-paper-h3-gray3-fe-pre_l2norm-constant-s2"  # heads 3: the default's
    assert study.grid_config(cfg) is cfg  # nothing to apply
    with pytest.raises(config.ConfigError, match="model.size"):
        study.grid_config(cfg, size=64)


def _fake_data(calls):
    def synth(raw, scfg, **kw):
        calls.append("synth")
        Path(raw).mkdir(parents=True, exist_ok=True)

    def pre(raw, out, cfg, **kw):
        calls.append("preprocess")
        DataDir(out).write_split("test", {"images": []})

    return synth, pre


def test_ensure_data_builds_once_per_data_key(repo, monkeypatch):
    calls: list[str] = []
    synth, pre = _fake_data(calls)
    monkeypatch.setattr(runs, "synthesize_cohort", synth)
    monkeypatch.setattr(runs, "preprocess_cohort", pre)
    cfg = config.load("smoke")
    assert study.ensure_data(cfg) == cfg.pre_path() == repo / "data" / "smoke" / "pre"
    assert calls == ["synth", "preprocess"]
    assert study.ensure_data(study.with_overrides(cfg, {"model.size": 256})) == cfg.pre_path()
    assert calls == ["synth", "preprocess"]  # same data key: reused
    study.ensure_data(study.with_overrides(cfg, {"synth.seed": 3}))
    assert calls == ["synth", "preprocess"] * 2
    assert json.loads((cfg.data_path() / "data_key.json").read_text())["profile"] == "smoke"


def test_ensure_run_trains_once_and_resumes(repo, monkeypatch):
    fits = []

    def fake_fit(cfg, run_dir, *, resume, progress, data):
        fits.append((Path(run_dir), resume, data))
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "model.pt").write_bytes(b"w")

    monkeypatch.setattr(runs, "fit", fake_fit)
    cfg = config.load("smoke")
    run = study.ensure_run(cfg, progress=False)
    assert run.parent == cfg.runs_path() == repo / "runs" / "smoke"
    assert run.name == f"{study.run_tag(cfg)}-{study.run_key(cfg)}" and fits == [(run, False, None)]
    assert study.ensure_run(cfg) == run and len(fits) == 1  # finished: not trained again
    other = study.ensure_run(cfg, data=repo / "elsewhere")  # other data: another run folder
    assert other != run and fits[-1][2] == repo / "elsewhere"
    seed5 = study.with_overrides(cfg, {"train.seed": 5})
    killed = study.ensure_run(seed5)
    (killed / "model.pt").unlink()
    (killed / "checkpoint.pt").write_bytes(b"c")
    study.ensure_run(seed5)
    assert fits[-1][:2] == (killed, True)  # a checkpoint without final weights is resumed


def test_ensure_predictions_are_cached_in_the_run(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    config.dump(config.load("smoke", ["model.input=2.5d"]), run / "config.yaml")
    seen = []
    monkeypatch.setattr(runs, "load_model", lambda r: "model")

    def fake_predict(model, pre, split, *, input, batch_size):
        seen.append((model, split, input))
        return [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]

    monkeypatch.setattr(runs, "predict", fake_predict)
    dets = study.ensure_predictions(run, tmp_path / "pre", "val")
    assert dets[0]["score"] == 0.5 and seen == [("model", "val", "2.5d")]
    assert study.ensure_predictions(run, tmp_path / "pre", "val") == dets and len(seen) == 1
    assert (run / "dets_val.json").is_file()


def test_tables_and_figures_go_to_the_profile_folders(repo):
    smoke, default = config.load("smoke"), config.load("default")
    df = pd.DataFrame({"a": [1.0]})
    assert study.save_table(df, smoke, "t", caption="cap") == repo / "results" / "smoke" / "t.csv"
    assert study.save_table(df, default, "t") == repo / "results" / "t.csv"
    assert (repo / "results" / "smoke" / "t.md").read_text().startswith("cap")
    fig, _ = plt.subplots()
    paths = study.save_figure(fig, smoke, "f")
    plt.close(fig)
    assert sorted(p.name for p in paths) == ["f.pdf", "f.png"]
    assert paths[0].parent == repo / "figures" / "smoke"


def test_the_package_is_the_notebook_api():
    for name in study.__all__:
        assert getattr(study, name) is getattr(runs, name), name


def test_evaluate_run_on_a_split_reads_the_split_and_the_cached_detections(tmp_path):
    from test_data import make_pre

    pre = make_pre(tmp_path, {"train": ["P01"], "val": ["P02"], "test": ["P03", "P04"]})
    run = tmp_path / "run"
    run.mkdir()
    cfg = config.load("smoke", ["eval.bootstrap=20"])
    config.dump(cfg, run / "config.yaml")
    coco = DataDir(pre).coco("test")
    hits = [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.9}
            for a in coco["annotations"]]
    (run / "dets_test.json").write_text(json.dumps(hits))  # cached predictions: nothing is predicted
    got, gt, dets = study.gt_and_detections(run, pre, "test")
    assert got == coco and gt.n_gt == len(coco["annotations"]) == len(dets.scores) > 0
    r = study.evaluate_run(cfg, run, pre)
    assert r["metrics"]["ap_voc"] == 1.0 and r["metrics"]["n_patients"] == 2 and r["run"] == run
    assert r["coco"] == coco and r["metrics"]["bootstrap"]["ap_voc"]["lo"] == 1.0
    (run / "dets_test.json").write_text(json.dumps(hits[:1]))
    assert study.evaluate_run(cfg, run, pre, bootstrap=0)["metrics"]["ap_voc"] < 1.0
    with pytest.raises(InputError, match="nope.json"):
        study.evaluate_run(cfg, run, pre, split="nope")


def test_issue17_keys_keep_cached_runs_and_new_values_make_new_runs():
    cfg = study.grid_config(config.load("smoke"), fe=True, seed=0)
    for key, neutral, other in (("model.heads", 0, 3), ("train.val_subset", 0, 40)):
        assert study.run_key(study.with_overrides(cfg, {key: neutral})) == study.run_key(cfg)
        assert study.run_key(study.with_overrides(cfg, {key: other})) != study.run_key(cfg), key
    assert study.run_tag(study.with_overrides(cfg, {"model.heads": 3})).startswith("vgg16-128-cmb-h3-")
    # the hold-out cohort: not part of the study's data key; its own key
    same = {"holdout.patients": 5, "holdout.seed": 7, "model.size": 256}
    assert study.data_key(study.with_overrides(cfg, same)) == study.data_key(cfg)
    hk = study.holdout_key(cfg)
    assert study.holdout_key(study.with_overrides(cfg, {"synth.seed": 3, "model.size": 256})) == hk
    for over in ({"holdout.patients": 5}, {"holdout.seed": 7}, {"synth.matrix": 64},
                 {"preprocess.labels": "geometric"}):
        assert study.holdout_key(study.with_overrides(cfg, over)) != hk, over


def test_ensure_holdout_builds_once_per_holdout_key(repo, monkeypatch):
    calls = []

    def fake_make(cfg, *, progress, overwrite):
        calls.append((cfg.holdout.patients, overwrite))
        DataDir(cfg.holdout_path() / "pre").write_split("holdout", {"images": []})

    monkeypatch.setattr(runs, "make_holdout", fake_make)
    cfg = config.load("smoke")
    pre = study.ensure_holdout(cfg)
    assert pre == repo / "data" / "smoke" / "holdout" / "pre" and calls == [(2, True)]
    assert study.ensure_holdout(study.with_overrides(cfg, {"model.size": 256})) == pre and len(calls) == 1
    study.ensure_holdout(study.with_overrides(cfg, {"holdout.patients": 3}))
    assert calls[-1] == (3, True)
    assert study.ensure_holdout(study.with_overrides(cfg, {"holdout.patients": 0})) is None


def test_cached_predictions_follow_their_split_file(tmp_path, monkeypatch):
    run, pre = tmp_path / "run", DataDir(tmp_path / "pre")
    run.mkdir()
    config.dump(config.load("smoke"), run / "config.yaml")
    monkeypatch.setattr(runs, "load_model", lambda r: "model")
    seen = []

    def fake_predict(model, pre_dir, split, *, input, batch_size):
        seen.append(split)
        return [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.1 * len(seen)}]

    monkeypatch.setattr(runs, "predict", fake_predict)
    pre.write_split("holdout", {"images": [{"id": 1}]})
    first = study.ensure_predictions(run, pre.root, "holdout")
    assert study.ensure_predictions(run, pre.root, "holdout") == first and len(seen) == 1
    pre.write_split("holdout", {"images": [{"id": 1}, {"id": 2}]})  # the cohort was rebuilt
    assert study.ensure_predictions(run, pre.root, "holdout") != first and len(seen) == 2
    (run / "dets_holdout.stamp").unlink()  # a cache from before stamps: reused
    assert study.ensure_predictions(run, pre.root, "holdout")[0]["score"] == pytest.approx(0.2)
    assert len(seen) == 2

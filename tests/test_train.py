"""Training: loss decreases on an easy task, exact resume, weights_only checkpoints, CLI errors, timing."""

from __future__ import annotations

import csv
import itertools
import json

import pytest
import torch
from test_data import make_pre

from cmbfe import cli
from cmbfe import config as C
from cmbfe.config import ConfigError
from cmbfe.data import SliceDataset, collate_fn
from cmbfe.io import InputError
from cmbfe.models import build_model
from cmbfe.train import build_optimizer, fit, main, step_time

TINY = [
    "model.size=128",
    "model.width=0.125",
    "model.priors=cmb",
    "model.backbone=vgg16",
    "train.workers=0",
    "train.seed=0",
]


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    return make_pre(tmp_path_factory.mktemp("pre"))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_smoke_training_loss_decreases(pre, tmp_path):
    cfg = C.load(
        None,
        TINY
        + [
            "train.iterations=30",
            "train.batch_size=4",
            "train.log_every=1",
            "train.lr=0.001",
            "train.lr_steps=[]",
            "train.checkpoint_every=0",
            "augment.enabled=false",
            "train.negatives_ratio=0.5",
        ],
    )
    run = tmp_path / "run"
    weights = fit(cfg, run, data=pre, progress=False)
    assert weights == run / "model.pt" and weights.is_file()
    rows = _rows(run / "log.csv")
    assert [int(r["iteration"]) for r in rows] == list(range(1, 31))
    losses = [float(r["loss"]) for r in rows]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, (first, last)
    r0 = rows[0]
    assert abs(float(r0["bbox_loss"]) + float(r0["cls_loss"]) - float(r0["loss"])) < 1e-3 * float(r0["loss"])
    assert float(r0["images_per_s"]) > 0 and float(rows[-1]["seconds"]) > 0
    val = _rows(run / "val.csv")
    assert len(val) == 1 and int(val[0]["iteration"]) == 30 and 0.0 <= float(val[0]["ap_voc"]) <= 1.0
    info = json.loads((run / "model.json").read_text())
    assert info["model"]["backbone"] == "vgg16" and info["timings"]["step_s_median"] > 0
    # the final validation's detections are cached where study.ensure_predictions looks for them
    from cmbfe.modelfolder import load_model
    from cmbfe.predict import predict

    cached = json.loads((run / "dets_val.json").read_text())
    assert cached == json.loads(json.dumps(predict(load_model(run), pre, "val", batch_size=4)))
    assert C.load(run / "config.yaml").to_dict() == cfg.to_dict() | {"profile": cfg.profile}
    state = torch.load(weights, weights_only=True)
    build_model(cfg.model, cfg.fe).load_state_dict(state)


def test_resume_is_bit_identical(pre, tmp_path):
    over = TINY + [
        "train.iterations=6",
        "train.batch_size=2",
        "train.log_every=1",
        "train.checkpoint_every=3",
        "train.lr_steps=[0.5]",
        "train.val_every=3",
        "fe.enabled=true",
        "augment.p_affine=1.0",
        "augment.p_blur=1.0",
    ]
    cfg = C.load(None, over)
    straight = fit(cfg, tmp_path / "a", data=pre, progress=False)
    ck = fit(cfg, tmp_path / "b", data=pre, progress=False, stop_after=3)
    assert ck == tmp_path / "b" / "checkpoint.pt" and not (tmp_path / "b" / "model.pt").exists()
    saved = torch.load(ck, weights_only=True)
    assert saved["iteration"] == 3 and {"model", "optimizer", "scheduler", "rng", "config"} <= set(saved)
    # a changed schedule-relevant key refuses to resume
    with pytest.raises(ConfigError, match="train.lr"):
        fit(C.load(None, over + ["train.lr=0.01"]), tmp_path / "b", data=pre, resume=True, progress=False)
    resumed = fit(cfg, tmp_path / "b", data=pre, resume=True, progress=False)
    a = torch.load(straight, weights_only=True)
    b = torch.load(resumed, weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = _rows(tmp_path / "b" / "log.csv")
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows == [
        r | {"images_per_s": rows[i]["images_per_s"], "seconds": rows[i]["seconds"]}
        for i, r in enumerate(_rows(tmp_path / "a" / "log.csv"))
    ]
    assert [int(r["iteration"]) for r in _rows(tmp_path / "b" / "val.csv")] == [3, 6]
    # FE runs log the train/test gap on a fixed batch at every validation, without touching the training
    gap_a, gap_b = _rows(tmp_path / "a" / "fe_gap.csv"), _rows(tmp_path / "b" / "fe_gap.csv")
    assert [int(r["iteration"]) for r in gap_b] == [3, 6] and gap_a == gap_b
    assert all(float(r["loss_fe_on"]) != float(r["loss_fe_off"]) for r in gap_a)
    final = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert final["iteration"] == 6 and final["scheduler"]["last_epoch"] == 6


def test_bad_set_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="train.iteratons"):
        main(["--params", "smoke", "--set", "train.iteratons=5", "--out", str(tmp_path / "r")])
    assert (
        cli.main(["train", "--params", "smoke", "--set", "model.sise=128", "--out", str(tmp_path / "r")]) == 2
    )
    assert not (tmp_path / "r").exists()


def test_cli_trains_and_missing_data_named(pre, tmp_path, capsys):
    rc = cli.main(
        [
            "train",
            "--params",
            "smoke",
            *[a for s in TINY for a in ("--set", s)],
            "--set",
            "train.iterations=2",
            "--set",
            "train.batch_size=2",
            "--out",
            str(tmp_path / "r"),
            "--data",
            str(pre),
            "--no-progress",
        ]
    )
    assert rc == 0 and (tmp_path / "r" / "model.pt").is_file()
    rc = cli.main(
        ["train", "--params", "smoke", "--out", str(tmp_path / "r2"), "--data", str(tmp_path / "none")]
    )
    assert rc == 2 and "annotations/train.json" in capsys.readouterr().err


def test_step_time_and_schedule(pre):
    cfg = C.load(None, TINY + ["train.iterations=12"])
    model = build_model(cfg.model, cfg.fe)
    opt, sched = build_optimizer(model, cfg.train)
    assert sched.milestones == {8: 1, 10: 1}
    images, targets = collate_fn([SliceDataset(pre, "val")[i] for i in range(2)])
    t = step_time(model, images, targets, opt, repeats=2)
    assert len(t["times_s"]) == 2 and t["median_s"] > 0 and t["batch"] == 2


def test_window_px_follows_pixel_scale(pre):
    from cmbfe.data import SliceDataset, window_px

    ds = SliceDataset(pre, "train")  # 64-px slices
    assert window_px(C.ModelConfig(size=256, train_crop=128), ds) == 32
    assert window_px(C.ModelConfig(size=256), ds) == 0
    ds.images = ds.images + [{**ds.images[0], "width": 80}]
    with pytest.raises(InputError, match="square slices of one size"):
        window_px(C.ModelConfig(size=256, train_crop=128), ds)


def test_never_validating_writes_no_val_csv(pre, tmp_path):
    cfg = C.load(None, TINY + ["train.iterations=2", "train.batch_size=2", "train.val_every=-1",
                               "train.checkpoint_every=0", "augment.enabled=false"])
    fit(cfg, tmp_path / "run", data=pre, progress=False)
    assert (tmp_path / "run" / "log.csv").is_file() and not (tmp_path / "run" / "val.csv").exists()
    assert (tmp_path / "run" / "config.yaml").stat().st_mode & 0o044  # readable by others, as open() gives


def test_lr_factor_warmup_cosine_and_step():
    from cmbfe.train import lr_factor

    tc = C.TrainConfig(iterations=101, schedule="cosine", warmup=10)
    f = [lr_factor(i, tc) for i in range(101)]
    assert f[0] == pytest.approx(0.01) and f[5] == pytest.approx(0.01 + 0.99 * 0.5)
    assert f[10] == pytest.approx(1.0) and f[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(f[10:]))  # monotone decay after the warm-up
    floor = C.TrainConfig(iterations=100, schedule="cosine", warmup=0, cosine_end=0.8, lr_min=0.01)
    g = [lr_factor(i, floor) for i in range(100)]
    assert g[0] == pytest.approx(1.0) and g[79] == pytest.approx(0.01) and g[80:] == [pytest.approx(0.01)] * 20
    assert all(a > b for a, b in itertools.pairwise(g[:80]))
    step = C.TrainConfig(iterations=12, lr_steps=(2 / 3, 5 / 6), lr_gamma=0.1)
    assert [lr_factor(i, step) for i in (7, 8, 10)] == pytest.approx([1.0, 0.1, 0.01])


def test_resume_bit_identical_with_ema_cosine_warmup_clip(pre, tmp_path):
    over = TINY + ["train.iterations=6", "train.batch_size=2", "train.checkpoint_every=3", "train.log_every=1",
                   "train.schedule=cosine", "train.warmup=2", "train.grad_clip=1.0", "train.ema=0.9",
                   "train.val_every=-1"]
    cfg = C.load(None, over)
    straight = fit(cfg, tmp_path / "a", data=pre, progress=False)
    fit(cfg, tmp_path / "b", data=pre, progress=False, stop_after=3)
    assert "ema" in torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    resumed = fit(cfg, tmp_path / "b", data=pre, resume=True, progress=False)
    a, b = torch.load(straight, weights_only=True), torch.load(resumed, weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # model.pt holds the averaged weights, loadable into the plain model, and they differ from the raw ones
    raw = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    build_model(cfg.model, cfg.fe).load_state_dict(a)
    assert any(not torch.equal(a[k], raw[k]) for k in raw if raw[k].is_floating_point())
    lrs = [float(r["lr"]) for r in _rows(tmp_path / "a" / "log.csv")]
    assert lrs[0] < lrs[1] and lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_recipe_values_checked_at_load():
    for bad in ("train.schedule=linear", "train.warmup=-1", "train.ema=1.0", "train.grad_clip=-2",
                "train.cosine_end=0", "train.lr_min=1.0"):
        with pytest.raises(ConfigError, match="train"):
            C.load(None, [bad])


def test_training_session_sets_and_restores_threads_and_determinism(monkeypatch):
    from cmbfe.train import training_session

    monkeypatch.setenv("CMBFE_THREADS", "1")
    torch.set_num_threads(2)
    det = torch.are_deterministic_algorithms_enabled()
    with pytest.raises(RuntimeError, match="boom"), training_session(C.load("smoke", ["train.device=cpu"]).train) as s:
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
        assert (s.rank, s.world, s.main, s.amp, s.device.type) == (0, 1, True, False, "cpu")
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2 and torch.are_deterministic_algorithms_enabled() == det


def test_fit_is_a_few_named_parts():
    import inspect

    from cmbfe import train

    src = inspect.getsource(train.fit)
    assert src.count("\n") <= 60
    for part in ("training_session(", "build_parts(", "train_loop(", "checkpointer.save(", "save_final("):
        assert part in src, part


def test_channels_last_cpu_resumes_bit_identically_and_survives_validation(pre, tmp_path):
    """train.channels_last_cpu (off by default): the model trains in channels_last on CPU, an in-loop validation
    (predict switches formats) hands it back in channels_last, and a resumed run is bit-identical."""
    from cmbfe import predict as P

    over = TINY + ["train.iterations=4", "train.batch_size=2", "train.log_every=1", "train.checkpoint_every=2",
                   "train.val_every=2", "train.channels_last_cpu=true"]
    cfg = C.load(None, over)
    assert C.load(None, TINY).train.channels_last_cpu is False
    straight = fit(cfg, tmp_path / "a", data=pre, progress=False)
    fit(cfg, tmp_path / "b", data=pre, progress=False, stop_after=2)
    resumed = fit(cfg, tmp_path / "b", data=pre, resume=True, progress=False)
    a, b = torch.load(straight, weights_only=True), torch.load(resumed, weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    plain = torch.load(fit(C.load(None, over[:-1]), tmp_path / "c", data=pre, progress=False), weights_only=True)
    assert any(not torch.equal(a[k], plain[k]) for k in a if a[k].is_floating_point())  # the switch acts
    # predict restores the memory format it found, either one
    for fmt, want in ((torch.channels_last, True), (torch.contiguous_format, False)):
        model = build_model(cfg.model, cfg.fe).to(memory_format=fmt)
        assert P.is_channels_last(model) is want
        P.predict(model, pre, "val", batch_size=2)
        assert P.is_channels_last(model) is want


def test_val_subset_changes_what_is_logged_not_the_weights(pre, tmp_path):
    from cmbfe.checkpoint import save_torch
    from cmbfe.data import SliceDataset, val_subset
    from cmbfe.validation import split_metrics

    over = TINY + ["train.iterations=4", "train.batch_size=2", "train.log_every=1", "train.checkpoint_every=2",
                   "train.val_every=2", "train.lr_steps=[]"]
    cfg_full, cfg_sub = C.load(None, over), C.load(None, over + ["train.val_subset=3"])
    a = torch.load(fit(cfg_full, tmp_path / "full", data=pre, progress=False), weights_only=True)
    b = torch.load(fit(cfg_sub, tmp_path / "sub", data=pre, progress=False), weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full, sub = _rows(tmp_path / "full" / "val.csv"), _rows(tmp_path / "sub" / "val.csv")
    assert [(r["iteration"], r["subset"], r["slices"]) for r in full] == [("2", "0", "6"), ("4", "0", "6")]
    # in the loop the fixed 3-slice subset; at the end its row, then the whole split's (the final one)
    assert [(r["iteration"], r["subset"], r["slices"]) for r in sub] == [("2", "1", "3"), ("4", "1", "3"),
                                                                      ("4", "0", "6")]
    assert {k: v for k, v in sub[-1].items() if k != "seconds"} == \
        {k: v for k, v in full[-1].items() if k != "seconds"}
    dets = json.loads((tmp_path / "sub" / "dets_val.json").read_text())
    assert dets == json.loads((tmp_path / "full" / "dets_val.json").read_text())
    ds = val_subset(SliceDataset(pre, "val"), 3)
    assert float(sub[1]["ap_voc"]) == pytest.approx(split_metrics(dets, ds, cfg_sub)["ap_voc"])
    # the logged quantity must not change mid-run: a resume with another val_subset is refused ...
    ck = fit(cfg_full, tmp_path / "c", data=pre, progress=False, stop_after=2)
    with pytest.raises(ConfigError, match="train.val_subset"):
        fit(cfg_sub, tmp_path / "c", data=pre, resume=True, progress=False)
    # ... while a checkpoint written before the issue-17 keys existed resumes (missing keys = defaults)
    state = torch.load(ck, weights_only=True)
    del state["config"]["model"]["heads"], state["config"]["train"]["val_subset"], state["config"]["holdout"]
    save_torch(state, ck)
    old = [{k: v for k, v in r.items() if k not in ("subset", "slices")} for r in _rows(tmp_path / "c" / "val.csv")]
    with open(tmp_path / "c" / "val.csv", "w", newline="") as f:  # val.csv as such a run wrote it
        w = csv.DictWriter(f, fieldnames=list(old[0]))
        w.writeheader()
        w.writerows(old)
    c = torch.load(fit(cfg_full, tmp_path / "c", data=pre, resume=True, progress=False), weights_only=True)
    assert all(torch.equal(a[k], c[k]) for k in a)
    rows = _rows(tmp_path / "c" / "val.csv")  # appended in the file's own columns
    assert [r["iteration"] for r in rows] == ["2", "4"] and all(None not in r and "subset" not in r for r in rows)


def test_a_run_killed_after_its_checkpoint_logs_each_iteration_once(pre, tmp_path):
    """Killed between checkpoints, a run resumes from the last one: the rows it logged after that checkpoint
    before the kill are dropped, so log.csv and val.csv hold each iteration once, as an uninterrupted run."""
    over = TINY + ["train.iterations=4", "train.batch_size=2", "train.log_every=1", "train.checkpoint_every=2",
                   "train.val_every=2"]
    cfg = C.load(None, over)
    fit(cfg, tmp_path / "a", data=pre, progress=False)
    fit(cfg, tmp_path / "b", data=pre, progress=False, stop_after=2)
    log, val = tmp_path / "b" / "log.csv", tmp_path / "b" / "val.csv"
    # what the killed process wrote after its checkpoint at 2: iteration 3's log row and a stray val row
    with open(log, "a") as f:
        f.write(",".join(["3"] + ["0"] * (len(_rows(log)[0]) - 1)) + "\n")
    with open(val, "a") as f:
        f.write(",".join(["3"] + ["0"] * (len(_rows(val)[0]) - 1)) + "\n")
    fit(cfg, tmp_path / "b", data=pre, resume=True, progress=False)
    assert [int(r["iteration"]) for r in _rows(log)] == [1, 2, 3, 4]
    assert [r["loss"] for r in _rows(log)] == [r["loss"] for r in _rows(tmp_path / "a" / "log.csv")]
    assert [int(r["iteration"]) for r in _rows(val)] == [int(r["iteration"]) for r in _rows(tmp_path / "a" / "val.csv")]

"""FE mechanism diagnostics on tiny trained runs: the head input under each reading, the loss gap."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from test_data import make_pre

from cmbfe import config as C
from cmbfe.modelfolder import load_model
from cmbfe.study import mechanism
from cmbfe.train import fit

TINY = ["model.size=128", "model.width=0.125", "model.priors=cmb", "train.iterations=4", "train.batch_size=2",
        "train.val_every=2", "train.checkpoint_every=0", "augment.enabled=false", "fe.enabled=true"]


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    return make_pre(tmp_path_factory.mktemp("pre"))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("placement, variant, cancelled",
                         [("pre_l2norm", "fe", True), ("post_l2norm", "fe", False),
                          ("pre_l2norm", "mean", False)])
def test_head_input_diagnostics_tell_the_readings_apart(pre, tmp_path, placement, variant, cancelled):
    cfg = C.load(None, TINY + [f"fe.placement={placement}", f"fe.variant={variant}"])
    run = tmp_path / "run"
    fit(cfg, run, data=pre, progress=False)
    t = mechanism.mechanism_table(cfg, {"r": run, "plain": run}, pre)
    row = t.iloc[0]
    assert row["alpha at the end"] == pytest.approx(1.0)
    assert row["train/test norm outside"] == pytest.approx(1.0, abs=1e-5)  # no FE outside the boxes
    if cancelled:  # R1: L2Norm((1 + M) X) = L2Norm(X)
        assert row["train/test norm inside"] == pytest.approx(1.0, abs=1e-4)
        assert row["cosine inside (train vs test)"] == pytest.approx(1.0, abs=1e-5)
    elif variant == "fe":  # R2: the head input is scaled up inside the boxes, same direction
        assert row["train/test norm inside"] > 1.01
        assert row["cosine inside (train vs test)"] == pytest.approx(1.0, abs=1e-4)
    else:  # R4: the direction turns
        assert row["cosine inside (train vs test)"] < 0.9999
    assert row["loss FE on (end)"] != row["loss FE off (end)"]
    assert 0 < row["positives on the first map"] <= 1
    if cancelled:  # R1 changes the deeper maps (pre-L2Norm, inline), not the head input
        assert row["relative change, source 0"] < 1e-4 < row["relative change, source 1"]
    fig = mechanism.plot_fe_gap({"r": run})
    assert fig is not None and len(fig.axes[0].get_lines()) == 2


def test_runs_without_fe_are_skipped(pre, tmp_path):
    cfg = C.load(None, [s for s in TINY if s != "fe.enabled=true"])
    fit(cfg, tmp_path / "run", data=pre, progress=False)
    assert mechanism.mechanism_table(cfg, {"plain": tmp_path / "run"}, pre).empty
    assert mechanism.plot_fe_gap({"plain": tmp_path / "run"}) is None


def test_diagnostics_run_at_the_training_input_scale(pre, tmp_path):
    """Training windows of ``train_crop`` network px are measured at ``train_crop`` (as training resizes them),
    not upsampled to the whole-slice ``size`` (an eval-mode call: 2x the magnification here); the head input
    they report is the one a training forward with FE off computes."""
    cfg = C.load(None, [s for s in TINY if s != "model.size=128"] + ["model.size=256", "model.train_crop=128"])
    run = tmp_path / "run"
    fit(cfg, run, data=pre, progress=False)
    model = load_model(run)
    batch = mechanism.fixed_batch(cfg, pre, n=2)
    src = mechanism.training_sources(model, batch)
    assert src["side"] == 128 and src["test"][0].shape[-1] == 128 // 8  # not 256 // 8
    seen = {}
    hook = model.backbone.register_forward_hook(lambda mod, i, o: seen.update(head=o["0"].detach()) or None)
    model.train()
    model.fe.enabled = False
    with torch.no_grad():
        model([b[0] for b in batch], [b[1] for b in batch])
    hook.remove()
    torch.testing.assert_close(src["test"][0], seen["head"])
    row = mechanism.head_input_norms(load_model(run), batch)
    assert row["input side (px)"] == 128
    maps = load_model(run).fe_maps([b[0] for b in batch], [b[1] for b in batch], windows=True)
    assert maps["image"].shape[-1] == 128 and maps["before"].shape[-1] == 16
    assert load_model(run).fe_maps([b[0] for b in batch], [b[1] for b in batch])["image"].shape[-1] == 256

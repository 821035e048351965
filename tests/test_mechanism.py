"""FE mechanism diagnostics on tiny trained runs: the head input under each reading, the loss gap."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from test_data import make_pre

from cmbfe import config as C
from cmbfe.study import mechanism
from cmbfe.train import fit

TINY = ["model.size=128", "model.width=0.125", "model.priors=cmb", "train.iterations=4", "train.batch_size=2",
        "train.val_every=2", "train.checkpoint_every=0", "augment.enabled=false", "fe.enabled=true"]


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    return make_pre(tmp_path_factory.mktemp("pre"))


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    fig = mechanism.plot_fe_gap({"r": run})
    assert fig is not None and len(fig.axes[0].get_lines()) == 2


def test_runs_without_fe_are_skipped(pre, tmp_path):
    cfg = C.load(None, [s for s in TINY if s != "fe.enabled=true"])
    fit(cfg, tmp_path / "run", data=pre, progress=False)
    assert mechanism.mechanism_table(cfg, {"plain": tmp_path / "run"}, pre).empty
    assert mechanism.plot_fe_gap({"plain": tmp_path / "run"}) is None

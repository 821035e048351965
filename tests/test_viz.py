"""Plots: PR/FROC curves with bands, image tiles; files are reproducible byte for byte."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest

from cmbfe import metrics as M
from cmbfe import stats, viz


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _curves():
    rng = np.random.default_rng(0)
    out = {}
    for name, q in (("SSD", 0.6), ("SSD-FE", 0.8)):
        tp = rng.random(200) < q
        s = np.sort(rng.random(200))[::-1]
        c = M.curve(s, tp, n_gt=int(tp.sum()) + 10, n_scans=5, n_slices=50)
        out[name] = c
    return out


def test_pr_and_froc_files_deterministic(tmp_path):
    curves = _curves()
    band = stats.bootstrap_bands(stats.BootData(scores=np.linspace(1, 0, 50), tp=np.arange(50) % 3 == 0,
                                                patient=np.arange(50) % 5, n_gt_patient=np.full(5, 5),
                                                n_img_patient=np.full(5, 10), ends=np.arange(50)), n=20, seed=0)
    runs = {"SSD": curves["SSD"],
            "SSD-FE": {"recall": curves["SSD-FE"].sensitivity, "precision": curves["SSD-FE"].precision,
                       "fp_per_scan": np.r_[0, curves["SSD-FE"].fp_per_scan],
                       "sensitivity": np.r_[0, curves["SSD-FE"].sensitivity], "band": band}}
    for fn, name in ((viz.plot_pr, "pr"), (viz.plot_froc, "froc")):
        fig = fn(runs, out=tmp_path / f"{name}_a", title=name)
        assert len(fig.axes[0].get_lines()) >= 2
        fn(runs, out=tmp_path / f"{name}_b", title=name)
        for ext in ("png", "pdf"):
            a, b = (tmp_path / f"{name}_a.{ext}").read_bytes(), (tmp_path / f"{name}_b.{ext}").read_bytes()
            assert len(a) > 1000 and a == b
        assert b"CreationDate" not in (tmp_path / f"{name}_a.pdf").read_bytes()
    viz.plot_froc(curves, per="slice", out=tmp_path / "froc_slice")
    fig = viz.plot_pr({"SSD": {"curve": curves["SSD"], "bands": band}})  # report.py's form
    assert len(fig.axes[0].collections) == 1  # the band
    assert (tmp_path / "froc_slice.png").exists()
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_empty_runs():
    empty = M.curve(np.zeros(0), np.zeros(0, bool), 3, 1, 1)
    viz.plot_pr({"none": empty})
    viz.plot_froc({"none": empty})
    viz.plot_pr({})


def test_image_tiles(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [rng.random((64, 64)) for _ in range(5)]
    gt = [np.array([[10, 10, 16, 16]]), np.zeros((0, 4)), np.array([[30, 30, 34, 36]]), [], [[0, 0, 4, 4]]]
    det = [np.array([[11, 10, 17, 16], [40, 40, 44, 44]]), np.array([[5, 5, 9, 9]]), np.zeros((0, 4)), [],
           [[1, 1, 5, 5]]]
    scores = [[0.9, 0.3], [0.5], [], [], [0.7]]
    crops = [viz.crop_around(g[0], 24, (64, 64)) if len(g) else None for g in gt]
    assert crops[0] == (1, 1, 25, 25) and crops[4] == (0, 0, 24, 24)
    fig = viz.image_tiles(imgs, gt, det, det_scores=scores, titles=[f"t{k}" for k in range(5)], crops=crops,
                          ncols=3, out=tmp_path / "tiles")
    axes = fig.axes
    assert len(axes) == 6
    assert len(axes[0].patches) == 3 and axes[0].get_xlim() == (1.0, 25.0)
    assert axes[0].patches[0].get_edgecolor()[:3] == (0.0, 224 / 255, 0.0)
    assert (tmp_path / "tiles.png").stat().st_size > 1000 and (tmp_path / "tiles.pdf").exists()
    rgb = [np.zeros((20, 30, 3))]
    viz.image_tiles(rgb, [[]], [[[1, 1, 5, 5]]])

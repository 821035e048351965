"""Fig. 3 for students (issue #19): the FE change on a diverging colormap whose zero is white, beside the mask
and the features before and after."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from cmbfe import viz


def _maps(change: float):
    rng = np.random.default_rng(0)
    before = rng.random((1, 4, 8, 8)).astype(np.float32)
    mask = np.zeros((1, 1, 8, 8), np.float32)
    mask[0, 0, 2:4, 3:5] = 0.8
    after = before * (1 + change * mask)
    return {"image": rng.random((1, 1, 64, 64)), "before": before, "after": after, "mask": mask,
            "boxes": [np.array([[24.0, 16.0, 40.0, 32.0]])], "titles": ["P1 z3"]}


@pytest.mark.parametrize("change", [1.0, 0.0])
def test_fe_difference_is_diverging_and_centred_on_white(change):
    fig = viz.fe_figure(_maps(change))
    panels = [ax for ax in fig.axes if ax.get_images() and ax.get_title()]
    assert [ax.get_title().split(" ")[0] for ax in panels] == ["P1", "FE", "features", "features", "after"]
    diff = panels[-1].get_images()[0]
    assert diff.get_cmap().name == "RdBu_r"
    lo, hi = diff.norm.vmin, diff.norm.vmax
    assert lo == pytest.approx(-hi) and hi > 0 and diff.norm(0.0) == pytest.approx(0.5)
    white = diff.get_cmap()(0.5)
    assert min(white[:3]) > 0.9  # zero is (near) white, not a saturated colour
    arr = diff.get_array()
    if change:  # the change sits where the mask is
        assert np.abs(arr).max() == pytest.approx(hi) and np.abs(arr[0:2]).max() == 0
    else:  # no change: white everywhere, the scale does not blow float noise up
        assert np.abs(arr).max() == 0 and hi > 0

"""Label models: annotator boxes follow the rendered signal drop; geometric boxes follow the sphere."""

from __future__ import annotations

import numpy as np
import pytest

from cmbfe.labels import AnnotatorRule, annotator_boxes, lesion_boxes, slice_signal
from cmbfe.volume import Lesion

SP = (2.0, 0.9375, 0.9375)  # (dz, dy, dx) mm: the default profile's 256^2 geometry


def _volume(depths: dict[int, float], sigma_px: float = 1.5, centre=(30.0, 20.0), noise=2.0, seed=0):
    """A 5-slice 48x64 volume, background 120, a Gaussian dip of the given depth on each listed slice."""
    rng = np.random.default_rng(seed)
    v = 120.0 + rng.normal(0, noise, (5, 48, 64))
    jj, ii = np.mgrid[0:48, 0:64]
    g = np.exp(-((ii - centre[0]) ** 2 + (jj - centre[1]) ** 2) / (2 * sigma_px**2))
    for k, d in depths.items():
        v[k] -= d * g
    return np.clip(v, 0, 255)


def test_visible_slices_only_and_box_encloses_half_depth():
    vol = _volume({1: 25.0, 2: 80.0, 3: 55.0})  # slice 1 faint (~17 %), 2 and 3 clear, 0 and 4 nothing
    les = Lesion(1, (30.0, 20.0, 2.0), diameter_mm=6.0)
    boxes = annotator_boxes(vol, les, SP)
    assert sorted(boxes) == [2, 3]
    x0, y0, x1, y1 = boxes[2]
    # FWHM of a sigma-1.5 px Gaussian is 3.5 px: the half-depth region spans about 4 px around pixel 30
    assert x0 <= 29 and x1 >= 32 and 3 <= x1 - x0 <= 6 and 3 <= y1 - y0 <= 6
    assert x0 < 30.5 < x1 and y0 < 20.5 < y1


def test_min_side_is_two_mm_and_boxes_stay_in_image():
    vol = _volume({2: 150.0}, sigma_px=0.4)  # a one-pixel focus
    (b,) = annotator_boxes(vol, Lesion(1, (30.0, 20.0, 2.0), diameter_mm=1.0), SP).values()
    assert b[2] - b[0] == pytest.approx(2.0 / SP[2]) and b[3] - b[1] == pytest.approx(2.0 / SP[1])
    edge = _volume({2: 150.0}, sigma_px=0.4, centre=(0.0, 20.0))
    (e,) = annotator_boxes(edge, Lesion(1, (0.0, 20.0, 2.0), diameter_mm=1.0), SP).values()
    assert e[0] == 0.0 and e[2] == pytest.approx(2.0 / SP[2])  # shifted inside, not shrunk


def test_noise_sized_dip_is_not_visible():
    vol = _volume({2: 10.0}, noise=6.0)  # 8 % contrast, below 3 x noise
    assert annotator_boxes(vol, Lesion(1, (30.0, 20.0, 2.0), diameter_mm=4.0), SP) == {}
    rule = AnnotatorRule(min_contrast=0.0, min_snr=0.0)
    assert 2 in annotator_boxes(vol, Lesion(1, (30.0, 20.0, 2.0), diameter_mm=4.0), SP, rule)


def test_mask_boxes_are_kept_and_geometric_model_ignores_the_image():
    vol = _volume({})
    masked = Lesion(3, (30.0, 20.0, 2.0), 4.0, slice_boxes={2: (28.0, 18.0, 33.0, 23.0)})
    assert annotator_boxes(vol, masked, SP) == {2: (28.0, 18.0, 33.0, 23.0)}
    sphere = Lesion(4, (30.0, 20.0, 2.0), diameter_mm=6.0)
    geo = lesion_boxes(vol, [sphere], SP, "geometric")
    assert sorted(geo) == [1, 2, 3] and lesion_boxes(vol, [sphere], SP, "annotator") == {}
    with pytest.raises(ValueError, match="label model"):
        lesion_boxes(vol, [sphere], SP, "drawn")


def test_slice_signal_off_image_is_nan():
    m = slice_signal(np.zeros((10, 10)), (-50.0, -50.0), 2.0)
    assert np.isnan(m["depth"])

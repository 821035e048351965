"""Tests of cmbfe.volume: geometry helpers and lesion -> per-slice boxes."""

from __future__ import annotations

import numpy as np
import pytest

from cmbfe.volume import Lesion, Volume, slice_boxes, volume_slice_boxes

SPACING = (2.0, 0.5, 0.5)  # (dz, dy, dx) mm
SHAPE = (10, 40, 48)  # (nz, ny, nx)


def test_spacing_shape_and_mm_roundtrip():
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # rotated in-plane axes
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.5, 0.6, 2.0])
    aff[:3, 3] = (10.0, -5.0, 3.0)
    vol = Volume(np.zeros((4, 5, 6), np.float32), aff, "P")
    assert vol.spacing_mm == pytest.approx((2.0, 0.6, 0.5))
    assert vol.shape == (4, 5, 6)
    ijk = np.array([[1.5, 2.0, 3.0], [0.0, 0.0, 0.0]])
    assert np.allclose(vol.mm_to_vox(vol.vox_to_mm(ijk)), ijk)
    assert np.allclose(vol.vox_to_mm([0, 0, 0]), (10.0, -5.0, 3.0))


def test_sphere_cross_section_on_centre_slice():
    les = Lesion(1, (10.0, 12.0, 5.0), diameter_mm=4.0)  # r = 2 mm = 4 px in-plane, < 1 slice away
    boxes = slice_boxes(les, SPACING, SHAPE)
    assert list(boxes) == [5]  # neighbours are exactly r = 2 mm away: not crossed
    assert boxes[5] == pytest.approx((10.5 - 4, 12.5 - 4, 10.5 + 4, 12.5 + 4))


def test_sphere_between_slices_has_smaller_sections():
    les = Lesion(1, (10.0, 12.0, 5.5), diameter_mm=4.0)  # 1 mm from slices 5 and 6
    boxes = slice_boxes(les, SPACING, SHAPE)
    assert sorted(boxes) == [5, 6]
    rr = np.sqrt(2.0**2 - 1.0**2) / 0.5  # cross-section radius in px
    assert boxes[5] == pytest.approx((10.5 - rr, 12.5 - rr, 10.5 + rr, 12.5 + rr))
    assert boxes[5] == pytest.approx(boxes[6])


def test_anisotropic_pixels():
    les = Lesion(1, (10.0, 12.0, 5.0), diameter_mm=4.0)
    b = slice_boxes(les, (2.0, 1.0, 0.5), SHAPE)[5]
    assert b[2] - b[0] == pytest.approx(8.0) and b[3] - b[1] == pytest.approx(4.0)


def test_boxes_clipped_to_image():
    les = Lesion(1, (0.0, 39.0, 5.0), diameter_mm=4.0)
    x0, y0, x1, y1 = slice_boxes(les, SPACING, SHAPE)[5]
    assert x0 == 0.0 and y1 == 40.0 and x1 == pytest.approx(4.5) and y0 == pytest.approx(35.5)
    outside = Lesion(2, (-20.0, 5.0, 5.0), diameter_mm=4.0)
    assert slice_boxes(outside, SPACING, SHAPE) == {}
    above = Lesion(3, (10.0, 10.0, 9.8), diameter_mm=4.0)
    assert max(slice_boxes(above, SPACING, SHAPE)) == 9  # no slice index beyond the volume


def test_min_px_skips_grazing_sections():
    les = Lesion(1, (10.0, 12.0, 5.0), diameter_mm=0.8)  # 0.8 mm = 1.6 px wide on its slice
    assert list(slice_boxes(les, SPACING, SHAPE, min_px=1.0)) == [5]
    assert slice_boxes(les, SPACING, SHAPE, min_px=2.0) == {}


def test_explicit_slice_boxes_are_returned_clipped():
    les = Lesion(1, (5.0, 5.0, 1.0), 3.0, slice_boxes={1: (-2.0, 3.0, 6.0, 7.0), 2: (1.0, 1.0, 2.0, 2.0),
                                                        20: (1.0, 1.0, 2.0, 2.0)})
    assert slice_boxes(les, SPACING, SHAPE) == {1: (0.0, 3.0, 6.0, 7.0), 2: (1.0, 1.0, 2.0, 2.0)}


def test_volume_slice_boxes_selects_kinds():
    vol = Volume(np.zeros(SHAPE, np.float32), np.diag([0.5, 0.5, 2.0, 1.0]), "P",
                 lesions=[Lesion(1, (10.0, 12.0, 5.0), 4.0), Lesion(2, (30.0, 30.0, 5.0), 3.0)],
                 mimics=[Lesion(7, (20.0, 20.0, 2.0), 3.0, kind="vein"),
                         Lesion(8, (25.0, 20.0, 2.0), 3.0, kind="calcification")])
    cmb = volume_slice_boxes(vol)
    assert list(cmb) == [5] and [i for i, _ in cmb[5]] == [1, 2]
    assert [i for i, _ in volume_slice_boxes(vol, "vein")[2]] == [7]
    assert [i for i, _ in volume_slice_boxes(vol, "*")[2]] == [7, 8]

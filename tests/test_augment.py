"""Property tests of the box-aware augmentation (cmbfe.augment)."""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cmbfe.augment import blur_kernel_size, build_augment
from cmbfe.config import AugmentConfig

ALL_ON = AugmentConfig(hflip=0.5, vflip=0.5, p_intensity=1.0, p_blur=1.0, p_affine=1.0)
OFF = dataclasses.replace(ALL_ON, hflip=0.0, vflip=0.0, p_intensity=0.0, p_blur=0.0, p_affine=0.0)


@st.composite
def sample(draw):
    h = draw(st.integers(16, 72))
    w = draw(st.integers(16, 72))
    n = draw(st.integers(0, 5))
    boxes = []
    for _ in range(n):
        x0 = draw(st.floats(0, w - 2))
        y0 = draw(st.floats(0, h - 2))
        boxes.append([x0, y0, draw(st.floats(x0 + 1, w)), draw(st.floats(y0 + 1, h))])
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, h, w, generator=g)
    return image, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), seed


@settings(max_examples=25, deadline=None)
@given(sample())
def test_boxes_stay_inside_and_labels_follow(s):
    image, boxes, seed = s
    aug = build_augment(ALL_ON)
    labels = torch.arange(1, len(boxes) + 1)
    out, b, lab = aug.seeded_apply(image, boxes, labels, seed=seed)
    h, w = image.shape[-2:]
    assert out.shape == image.shape and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert b.shape == (len(lab), 4)
    assert torch.all(b[:, 0] >= 0) and torch.all(b[:, 1] >= 0)
    assert torch.all(b[:, 2] <= w) and torch.all(b[:, 3] <= h)
    assert torch.all(b[:, 2] - b[:, 0] >= 1) and torch.all(b[:, 3] - b[:, 1] >= 1)
    # labels are a subsequence of the input labels (kept boxes, original order)
    assert len(set(lab.tolist())) == len(lab) and lab.tolist() == sorted(lab.tolist())
    assert set(lab.tolist()) <= set(labels.tolist())
    # same seed, same result
    out2, b2, _ = aug.seeded_apply(image, boxes, labels, seed=seed)
    assert torch.equal(out, out2) and torch.equal(b, b2)


@settings(max_examples=30, deadline=None)
@given(sample(), st.sampled_from(["h", "v"]))
def test_flip_twice_is_identity(s, axis):
    image, boxes, _ = s
    cfg = dataclasses.replace(OFF, hflip=1.0 if axis == "h" else 0.0, vflip=1.0 if axis == "v" else 0.0)
    aug = build_augment(cfg)
    once, b1 = aug(image, boxes)
    twice, b2 = aug(once, b1)
    assert torch.equal(twice, image)
    torch.testing.assert_close(b2, boxes, atol=1e-4, rtol=0)
    if axis == "h" and len(boxes):
        torch.testing.assert_close(b1[:, 0], image.shape[-1] - boxes[:, 2], atol=1e-4, rtol=0)


@settings(max_examples=15, deadline=None)
@given(sample())
def test_zero_box_images_pass(s):
    image, _, seed = s
    out, b = build_augment(ALL_ON)(image, torch.zeros(0, 4), seed=seed)
    assert out.shape == image.shape and b.shape == (0, 4)


def test_disabled_and_off_are_identity():
    image = torch.rand(3, 32, 32)
    boxes = torch.tensor([[4.0, 5.0, 10.0, 12.0]])
    for cfg in (OFF, dataclasses.replace(ALL_ON, enabled=False)):
        out, b = build_augment(cfg)(image, boxes, seed=1)
        assert torch.equal(out, image) and torch.equal(b, boxes)


def test_intensity_scales_and_clamps():
    cfg = dataclasses.replace(OFF, p_intensity=1.0, intensity=(1.2, 1.5))
    image = torch.full((3, 8, 8), 0.5)
    image[:, 0, 0] = 0.9
    out, _ = build_augment(cfg)(image, torch.zeros(0, 4), seed=0)
    f = float(out[0, 4, 4] / 0.5)
    assert 1.2 <= f <= 1.5 and float(out[0, 0, 0]) == 1.0


def test_blur_kernel_and_identity_at_zero_sigma():
    assert blur_kernel_size(1.0) == 7 and blur_kernel_size(3.0) == 19
    image = torch.rand(3, 32, 32)
    same, _ = build_augment(dataclasses.replace(OFF, p_blur=1.0, blur_sigma=(0.0, 0.0)))(
        image, torch.zeros(0, 4)
    )
    assert torch.equal(same, image)
    blurred, _ = build_augment(dataclasses.replace(OFF, p_blur=1.0, blur_sigma=(2.0, 2.0)))(
        image, torch.zeros(0, 4)
    )
    assert blurred.std() < image.std()


def test_affine_moves_box_with_content():
    """A bright square stays inside its (rotated, scaled, translated) box."""
    cfg = dataclasses.replace(OFF, p_affine=1.0)
    image = torch.zeros(3, 64, 64)
    image[:, 28:36, 20:28] = 1.0
    boxes = torch.tensor([[20.0, 28.0, 28.0, 36.0]])
    for seed in range(10):
        out, b = build_augment(cfg)(image, boxes, seed=seed)
        dark = (out[0] > 0.5).nonzero().float() + 0.5  # (row, col) pixel centres
        x0, y0, x1, y1 = b[0].tolist()
        assert dark[:, 1].min() >= x0 - 1 and dark[:, 1].max() <= x1 + 1
        assert dark[:, 0].min() >= y0 - 1 and dark[:, 0].max() <= y1 + 1
        # box area shrinks by the scale factor squared at most (0.8^2) and grows by rotation at most 2x
        area = (x1 - x0) * (y1 - y0)
        assert 64 * 0.8**2 * 0.99 <= area <= 64 * 2 * 0.95**2 * 1.01


def test_affine_translation_bound_in_pixels():
    cfg = dataclasses.replace(OFF, p_affine=1.0, rotate_deg=0.0, scale=(1.0, 1.0), translate_px=15.0)
    aug = build_augment(cfg)
    boxes = torch.tensor([[60.0, 60.0, 70.0, 70.0]])
    shifts = []
    for seed in range(30):
        _, b = aug(torch.zeros(1, 128, 128), boxes, seed=seed)
        shifts.append((b[0, :2] - boxes[0, :2]).abs().max().item())
    assert max(shifts) <= 15.0 + 1e-4 and max(shifts) >= 5.0


def test_flip_keeps_one_pixel_edge_box():
    """Regression (CI, hypothesis): a 1-px box at the edge whose flipped width rounds to 0.99999 was dropped."""
    image = torch.rand(3, 16, 17)
    boxes = torch.tensor([[0.0, 31.1848 % 16, 1.0, 31.1848 % 16 + 1.0]])
    cfg = dataclasses.replace(OFF, hflip=1.0)
    once, b1 = build_augment(cfg)(image, boxes)
    _, b2 = build_augment(cfg)(once, b1)
    assert b1.shape == (1, 4) and b2.shape == (1, 4)
    torch.testing.assert_close(b2, boxes, atol=1e-4, rtol=0)


def test_random_window_holds_a_box_and_shifts_boxes():
    from cmbfe.augment import random_window

    image = torch.arange(100 * 120, dtype=torch.float32).reshape(1, 100, 120).expand(3, -1, -1)
    boxes = torch.tensor([[70.0, 10.0, 76.0, 15.0], [5.0, 80.0, 9.0, 84.0]])
    labels = torch.tensor([1, 2])
    seen = set()
    for s in range(40):
        g = torch.Generator().manual_seed(s)
        win, b, lab = random_window(image, boxes, labels, 32, g, p_positive=1.0)
        assert win.shape == (3, 32, 32) and len(b) >= 1 and len(b) == len(lab)
        # the window is the image content at its offset, and a kept box is inside it with its size
        x0, y0 = int(win[0, 0, 0].item()) % 120, int(win[0, 0, 0].item()) // 120
        for box, k in zip(b, lab):
            torch.testing.assert_close(box + torch.tensor([x0, y0, x0, y0], dtype=box.dtype), boxes[k - 1])
        seen.update(lab.tolist())
    assert seen == {1, 2}
    # same generator seed -> same window; fewer-than-side images pass through; no boxes is fine
    a = random_window(image, boxes, labels, 32, torch.Generator().manual_seed(3))
    b2 = random_window(image, boxes, labels, 32, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b2[0]) and torch.equal(a[1], b2[1])
    small = torch.rand(3, 20, 20)
    assert random_window(small, boxes[:0], labels[:0], 32, torch.Generator())[0] is small
    win, b, lab = random_window(image, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), 32,
                                torch.Generator().manual_seed(0))
    assert win.shape == (3, 32, 32) and b.shape == (0, 4) and lab.shape == (0,)


def test_random_window_clips_boxes_cut_by_the_border():
    from cmbfe.augment import random_window

    image = torch.rand(3, 64, 64)
    boxes = torch.tensor([[10.0, 10.0, 40.0, 40.0]])  # larger than the window: kept (centre inside), clipped
    for s in range(10):
        _, b, _ = random_window(image, boxes, torch.tensor([1]), 24, torch.Generator().manual_seed(s), 0.0)
        assert ((b >= 0) & (b <= 24)).all()

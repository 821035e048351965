"""cmbfe.fe against a plain per-pixel Python reference, plus properties of the mask, FE and schedules."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cmbfe import fe
from cmbfe.fe import alpha_at, apply_fe, box_pixel_ranges, enhancement_mask


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors; avoids OpenMP contention on a shared 2-core machine
    yield
    torch.set_num_threads(n)


def ref_mask(p: np.ndarray, boxes: list[tuple[float, float, float, float]], beta: float) -> np.ndarray:
    """Per-pixel loops: pixel (j, i) in a box iff its centre (i+.5, j+.5) is in [x0,x1) x [y0,y1)."""
    h, w = p.shape
    out = np.zeros((h, w))
    for x0, y0, x1, y1 in boxes:
        cols = [i for i in range(w) if x0 <= i + 0.5 < x1]
        rows = [j for j in range(h) if y0 <= j + 0.5 < y1]
        if not any(x0 <= i + 0.5 < x1 for i in range(-1000, 1000)):  # thinner than a pixel: centre pixel
            c = math.floor((x0 + x1) / 2)
            cols = [c] if 0 <= c < w else []
        if not any(y0 <= j + 0.5 < y1 for j in range(-1000, 1000)):
            r = math.floor((y0 + y1) / 2)
            rows = [r] if 0 <= r < h else []
        pix = [(j, i) for j in rows for i in cols]
        if not pix:
            continue
        b_mean = beta * sum(p[j, i] for j, i in pix) / len(pix)
        for j, i in pix:
            v = 1 - p[j, i] / b_mean if (b_mean > 0 and p[j, i] <= b_mean) else 0.0
            out[j, i] = max(out[j, i], v)
    return out


def ref_area(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area average: cell (r, c) = mean over rows floor(rH/h)..ceil((r+1)H/h)-1 (same for columns)."""
    h_in, w_in = m.shape
    h, w = size
    out = np.zeros(size)
    for r in range(h):
        for c in range(w):
            r0, r1 = (r * h_in) // h, -((-(r + 1) * h_in) // h)
            c0, c1 = (c * w_in) // w, -((-(c + 1) * w_in) // w)
            out[r, c] = m[r0:r1, c0:c1].mean()
    return out


coord = st.floats(min_value=-3.0, max_value=27.0, allow_nan=False).map(lambda v: round(v, 2))


@st.composite
def cases(draw):
    h, w = draw(st.integers(4, 20)), draw(st.integers(4, 20))
    n_img = draw(st.integers(1, 3))
    boxes = []
    for _ in range(n_img):
        bs = []
        for _ in range(draw(st.integers(0, 5))):
            x0, y0 = draw(coord), draw(coord)
            bw = draw(st.sampled_from([0.2, 0.6, 1.0, 2.5, 4.0, 7.3, 12.0, 30.0]))
            bh = draw(st.sampled_from([0.3, 0.9, 1.5, 3.0, 5.5, 10.0, 30.0]))
            bs.append((x0, y0, x0 + bw, y0 + bh))
        boxes.append(bs)
    seed = draw(st.integers(0, 2**16))
    beta = draw(st.sampled_from([1.0, 1.5, 2.0]))
    return h, w, boxes, seed, beta


@settings(max_examples=60, deadline=None)
@given(cases())
def test_matches_python_reference(case):
    h, w, boxes, seed, beta = case
    rng = np.random.default_rng(seed)
    imgs = rng.random((len(boxes), 1, h, w))
    imgs[:, :, : h // 3] = 0.0  # some exactly-zero pixels (and possibly all-zero boxes)
    tb = [torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes]
    got = enhancement_mask(torch.tensor(imgs, dtype=torch.float32), tb, beta=beta).numpy()
    for k, bs in enumerate(boxes):
        want = ref_mask(imgs[k, 0], [tuple(map(float, b.tolist())) for b in tb[k]], beta)
        np.testing.assert_allclose(got[k, 0], want, atol=1e-5)
        assert got[k, 0].min() >= 0 and got[k, 0].max() <= 1


def test_overlap_takes_max_and_zero_outside():
    p = torch.full((1, 1, 12, 12), 0.8)
    p[0, 0, 4:7, 4:7] = 0.1
    p[0, 0, 3, 3] = 5.0  # bright outlier above B_mean
    boxes = [torch.tensor([[3.0, 3.0, 8.0, 8.0], [4.0, 4.0, 7.0, 7.0]])]
    m = enhancement_mask(p, boxes)[0, 0]
    inside = torch.zeros(12, 12, dtype=torch.bool)
    inside[3:8, 3:8] = True
    assert torch.all(m[~inside] == 0)
    a = ref_mask(p[0, 0].double().numpy(), [(3, 3, 8, 8)], 1.5)
    b = ref_mask(p[0, 0].double().numpy(), [(4, 4, 7, 7)], 1.5)
    np.testing.assert_allclose(m.numpy(), np.maximum(a, b), atol=1e-6)
    assert m[5, 5] > m[3, 4] > 0 and m[3, 3] == 0  # darker -> stronger; above B_mean -> 0


def test_thin_box_covers_centre_pixel_and_outside_box_is_empty():
    p = torch.rand(1, 1, 8, 8) + 0.1
    r = box_pixel_ranges(torch.tensor([[2.1, 3.2, 2.4, 3.4], [-5.0, -5.0, -1.0, -1.0]]), 8, 8)
    assert r[0].tolist() == [2, 3, 3, 4]
    assert (r[1, 2] - r[1, 0]) * (r[1, 3] - r[1, 1]) == 0
    m = enhancement_mask(p, [torch.tensor([[2.1, 3.2, 2.4, 3.4]])])
    # a single pixel: mean = P, B_mean = 1.5 P, value = 1 - 1/1.5
    assert m[0, 0, 3, 2].item() == pytest.approx(1 / 3, abs=1e-6)
    assert int((m > 0).sum()) == 1
    assert torch.all(enhancement_mask(p, [torch.tensor([[-5.0, -5.0, -1.0, -1.0]])]) == 0)


def test_border_boxes_are_clipped():
    p = torch.rand(1, 1, 10, 10) + 0.05
    boxes = [(-2.0, -2.0, 3.0, 4.0), (7.5, 6.0, 12.0, 10.0)]
    got = enhancement_mask(p, [torch.tensor(boxes)])[0, 0].numpy()
    np.testing.assert_allclose(got, ref_mask(p[0, 0].double().numpy(), boxes, 1.5), atol=1e-6)


def test_beta_monotone():
    torch.manual_seed(0)
    p = torch.rand(2, 1, 32, 32)
    boxes = [
        torch.tensor([[2.0, 3.0, 15.0, 12.0], [10.0, 10.0, 30.0, 31.0]]),
        torch.tensor([[0.0, 0.0, 32.0, 32.0]]),
    ]
    prev, prev_n = None, -1
    for beta in (0.8, 1.0, 1.2, 1.5, 2.0, 3.0):
        m = enhancement_mask(p, boxes, beta=beta)
        n = int((m > 0).sum())
        assert n >= prev_n
        if prev is not None:
            assert torch.all(m >= prev - 1e-7)
        prev, prev_n = m, n
    assert prev_n > int((enhancement_mask(p, boxes, beta=0.8) > 0).sum())


@pytest.mark.parametrize(
    ("hw", "size"), [((24, 24), (8, 8)), ((25, 19), (7, 6)), ((30, 30), (30, 30)), ((16, 12), (5, 5))]
)
def test_area_resize_matches_reference(hw, size):
    torch.manual_seed(1)
    p = torch.rand(1, 1, *hw)
    boxes = [torch.tensor([[1.3, 2.2, 9.7, 11.1], [5.0, 0.0, 12.0, 6.0]])]
    full = enhancement_mask(p, boxes)[0, 0].double().numpy()
    small = enhancement_mask(p, boxes, size=size)[0, 0].numpy()
    assert small.shape == size
    np.testing.assert_allclose(small, ref_area(full, size), atol=1e-6)


def test_empty_boxes_give_zeros():
    p = torch.rand(3, 1, 16, 16)
    m = enhancement_mask(p, [torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 4)], size=(4, 4))
    assert m.shape == (3, 1, 4, 4) and torch.all(m == 0)
    with pytest.raises(ValueError):
        enhancement_mask(p, [torch.zeros(0, 4)])


def test_no_gradients_through_mask_but_through_features():
    p = torch.rand(1, 1, 16, 16, requires_grad=True)
    m = enhancement_mask(p, [torch.tensor([[2.0, 2.0, 9.0, 9.0]])], size=(4, 4))
    assert not m.requires_grad
    x = torch.randn(1, 5, 4, 4, requires_grad=True)
    for variant in ("fe", "ae"):
        x.grad = None
        apply_fe(x, m, 0.7, variant).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
    # fe: d/dx sum(x + a m x) = 1 + a m
    x.grad = None
    apply_fe(x, m, 0.7, "fe").sum().backward()
    torch.testing.assert_close(x.grad, (1 + 0.7 * m).expand_as(x))


def test_apply_fe_formulas():
    x = torch.randn(2, 4, 3, 3)
    m = torch.rand(2, 1, 3, 3) * (torch.rand(2, 1, 3, 3) > 0.5)
    torch.testing.assert_close(apply_fe(x, m, 0.5, "fe"), x + 0.5 * m * x)
    torch.testing.assert_close(apply_fe(x, m, 0.5, "ae"), x + 0.5 * (m > 0).float() * x.mean(1, keepdim=True))
    torch.testing.assert_close(apply_fe(x, m, 0.5, "l2n"), x + 0.5 * m * x / x.norm(dim=1, keepdim=True))
    torch.testing.assert_close(apply_fe(x, m, 0.5, "mean"), x + 0.5 * m * x.mean(1, keepdim=True))
    for v in ("fe", "ae", "l2n", "mean"):
        torch.testing.assert_close(apply_fe(x, torch.zeros_like(m), 2.0, v), x)
    with pytest.raises(ValueError):
        apply_fe(x, m, 1.0, "xx")
    with pytest.raises(ValueError):
        apply_fe(x, m[:, :, :2], 1.0, "fe")


def test_alpha_schedules():
    assert alpha_at(0.3, 0.8, "constant") == 0.8
    assert alpha_at(0.0, 0.8, "cosine") == pytest.approx(0.8)
    assert alpha_at(0.5, 0.8, "cosine") == pytest.approx(0.4)
    assert alpha_at(1.0, 0.8, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert alpha_at(2.0, 0.8, "cosine") == pytest.approx(0.0, abs=1e-12)  # clamped
    vals = [alpha_at(t / 10, 1.0, "cosine") for t in range(11)]
    assert all(a >= b for a, b in itertools.pairwise(vals))
    with pytest.raises(ValueError):
        alpha_at(0.1, 1.0, "linear")


def test_chunked_path_equals_single_chunk(monkeypatch):
    torch.manual_seed(2)
    p = torch.rand(2, 1, 40, 40)
    boxes = [
        torch.tensor([[0.0, 0.0, 40.0, 40.0], [3.0, 4.0, 9.0, 8.0]]),
        torch.tensor([[10.0, 10.0, 20.5, 30.2]]),
    ]
    one = enhancement_mask(p, boxes, size=(10, 10))
    monkeypatch.setattr(fe, "_PATCH_BUDGET", 50)
    torch.testing.assert_close(enhancement_mask(p, boxes, size=(10, 10)), one)


def test_fast_on_a_realistic_batch():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(8, 1, 512, 512, generator=g)
    boxes = []
    for _ in range(8):
        xy = torch.rand(20, 2, generator=g) * 480
        boxes.append(torch.cat([xy, xy + 4 + torch.rand(20, 2, generator=g) * 16], 1))
    enhancement_mask(p, boxes, size=(64, 64))
    t = time.perf_counter()
    m = enhancement_mask(p, boxes, size=(64, 64))
    assert time.perf_counter() - t < 1.0  # ~20 ms on one core
    assert m.shape == (8, 1, 64, 64) and m.max() > 0


def test_feature_enhancement_part():
    """The FE part: identity unless bound; bound, it is apply_fe with the mask at the feature size and the
    scheduled strength; progress is clamped; no state dict."""
    part = fe.FeatureEnhancement(enabled=True, variant="mean", alpha=2.0, schedule="cosine", beta=1.5)
    assert part.state_dict() == {} and part.context is None
    inp = torch.rand(2, 3, 32, 32)
    feat = torch.rand(2, 4, 8, 8)
    boxes = [torch.tensor([[4.0, 4.0, 12.0, 12.0]]), torch.zeros(0, 4)]
    assert torch.equal(part(feat, inp), feat)
    part.set_progress(1.5)
    assert part.progress == 1.0 and part.strength == pytest.approx(0.0, abs=1e-12)
    part.set_progress(0.5)
    with part.bound(boxes, 0.5, 0.25) as ctx:
        got = part(feat, inp)
    p = (inp[:, 1:2] * 0.25 + 0.5).clamp(min=0)
    mask = enhancement_mask(p, boxes, (8, 8), 1.5)
    torch.testing.assert_close(ctx.mask, mask)
    torch.testing.assert_close(got, apply_fe(feat, mask, 1.0, "mean"))
    assert part.context is None and torch.equal(part(feat, inp), feat)

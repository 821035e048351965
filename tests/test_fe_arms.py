"""The FE arms of issue #19 as proofs: the sham and mask arms do what they say, R1 leaves the conv4_3 head's input
and gradient unchanged, and inference never reads the ground truth (every arm)."""

from __future__ import annotations

import pytest
import torch

from cmbfe import config as C
from cmbfe.fe import box_pixel_ranges, enhancement_mask, sham_shifts
from cmbfe.models import build_model
from cmbfe.study import runs
from cmbfe.study.experiments import FE_ARMS

TINY = ["model.size=128", "model.width=0.125", "model.priors=cmb"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def arm_model(arm: str, *extra: str, seed: int = 0):
    cfg = C.with_overrides(C.load(None, [*TINY, *extra]), FE_ARMS[arm])
    torch.manual_seed(seed)
    return build_model(cfg.model, cfg.fe)


def scene(n: int = 2, size: int = 128, seed: int = 0):
    """``n`` gray3 images in [0, 1] (noisy background, 3 dark blobs each) and their targets."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    images, targets = [], []
    for _ in range(n):
        img = 0.6 + 0.05 * torch.rand(size, size, generator=g)
        boxes = []
        for _ in range(3):
            r = float(3 + 4 * torch.rand(1, generator=g))
            cx, cy = (float(v) for v in 15 + (size - 30) * torch.rand(2, generator=g))
            img = img - 0.45 * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (r / 2) ** 2))
            boxes.append([cx - r, cy - r, cx + r, cy + r])
        images.append(img.clamp(0, 1).expand(3, -1, -1).clone())
        targets.append({"boxes": torch.tensor(boxes), "labels": torch.ones(3, dtype=torch.int64)})
    return images, targets


# ------------------------------------------------------------------------------------------------ sham arm
def test_sham_moves_each_box_mask_unchanged_onto_no_gt_box():
    images, targets = scene(n=2, seed=1)
    p = torch.stack([im[1:2] for im in images])
    boxes = [t["boxes"] for t in targets]
    kept, shifts = sham_shifts(boxes, 128, 128)
    assert [len(k) for k in kept] == [3, 3]  # a 128-px image has room for every box
    true = enhancement_mask(p, boxes)
    sham = enhancement_mask(p, kept, shifts=shifts)
    for i, b in enumerate(boxes):
        gt = box_pixel_ranges(b, 128, 128)
        moved = box_pixel_ranges(b, 128, 128) + shifts[i].repeat(1, 2)
        for c0, r0, c1, r1 in moved.tolist():  # inside the image, overlapping no GT box of its image
            assert 0 <= c0 and 0 <= r0 and c1 <= 128 and r1 <= 128
            assert not ((c0 < gt[:, 2]) & (c1 > gt[:, 0]) & (r0 < gt[:, 3]) & (r1 > gt[:, 1])).any()
        inside = torch.zeros(128, 128, dtype=torch.bool)
        for c0, r0, c1, r1 in gt.tolist():
            inside[r0:r1, c0:c1] = True
        assert sham[i, 0][inside].abs().sum() == 0  # the sham puts nothing on a CMB
    # the same values (alpha and mask shapes), elsewhere: each box's patch is moved whole
    one = [boxes[0][:1], boxes[1][:0]]
    k1, s1 = sham_shifts(one, 128, 128)
    a, b = enhancement_mask(p, one), enhancement_mask(p, k1, shifts=s1)
    assert b.sum() > 0
    torch.testing.assert_close(torch.sort(a[a > 0]).values, torch.sort(b[b > 0]).values)
    assert not torch.equal(a, b) and true.shape == sham.shape


def test_sham_positions_come_from_the_batch_not_the_rng_state():
    _, targets = scene(n=2, seed=2)
    boxes = [t["boxes"] for t in targets]
    torch.manual_seed(0)
    first = sham_shifts(boxes, 128, 128)[1]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    again = sham_shifts(boxes, 128, 128)[1]
    assert torch.equal(torch.get_rng_state(), state)  # the training RNG stream is untouched
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    other = sham_shifts([boxes[0] + 1.0, boxes[1]], 128, 128)[1]
    assert not all(torch.equal(x, y) for x, y in zip(first, other))


def test_sham_drops_a_box_with_no_free_place():
    big = [torch.tensor([[0.0, 0.0, 100.0, 100.0]])]
    kept, shifts = sham_shifts(big, 128, 128)
    assert kept[0].shape == (0, 4) and shifts[0].shape == (0, 2)


def test_sham_arm_trains_with_masks_off_the_boxes():
    m = arm_model("R1 sham")
    images, targets = scene()
    m.train()
    seen = {}
    def keep(mod, inp, out):
        seen["mask"] = mod.context.mask.clone()

    hook = m.fe.register_forward_hook(keep)
    losses = m(images, targets)
    hook.remove()
    true = m.fe_maps(images, targets, windows=True)["mask_full"]  # true mask at the training input
    sham = seen["mask"]
    assert sham.sum() > 0 and set(losses) == {"bbox_regression", "classification"}
    up = torch.nn.functional.interpolate(sham, size=true.shape[-2:], mode="nearest")
    assert float((up * (true > 0)).sum()) < 0.05 * float(up.sum())  # off the CMBs (area-averaged edges)
    with pytest.raises(C.ConfigError, match="fe.sham"):
        C.load(None, ["fe.sham=true"])


# ------------------------------------------------------------------------------------------------ mask arm
def test_mask_arm_adds_a_bce_loss_that_trains_its_head_only_in_training():
    m = arm_model("mask loss")
    assert m.fe.mask_head is not None and not m.fe.enabled and m.fe.active
    images, targets = scene()
    m.train()
    losses = m(images, targets)
    assert set(losses) == {"bbox_regression", "classification", "mask_bce"}
    # zero-initialised head: logit 0 everywhere, BCE = log 2 per position whatever the mask (weight 1)
    assert float(losses["mask_bce"].detach()) == pytest.approx(0.6931472, abs=1e-6)
    sum(losses.values()).backward()
    assert m.fe.mask_head.weight.grad.abs().sum() > 0
    # the head's gradient reaches conv4_3: the trunk trains against M
    assert m.backbone.features[0].weight.grad.abs().sum() > 0


def test_mask_arm_starts_from_the_no_fe_weights_of_its_seed():
    plain, masked = arm_model("no FE", seed=3), arm_model("mask loss", seed=3)
    sp, sm = plain.state_dict(), masked.state_dict()
    assert set(sm) - set(sp) == {"backbone.fe.mask_head.weight", "backbone.fe.mask_head.bias"}
    assert all(torch.equal(sp[k], sm[k]) for k in sp)


def test_mask_arm_weights_load_into_the_plain_detector_for_inference():
    m = arm_model("mask loss")
    images, targets = scene()
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    m.train()
    sum(m(images, targets).values()).backward()
    opt.step()
    plain = arm_model("no FE", seed=9)
    plain.load_state_dict(m.state_dict())  # the head's keys are dropped: strict for everything else
    m.eval()
    plain.eval()
    with torch.no_grad():
        a, b = m(images), plain(images)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    with pytest.raises(RuntimeError, match="Missing key"):
        arm_model("mask loss").load_state_dict(plain.state_dict())


# ---------------------------------------------------------------------------------------- proof (a): R1
def _head_pass(m, images, targets):
    """Head input of the conv4_3 map (source "0") in a training forward, its gradient and the gradients of
    that head's parameters, for the detection loss."""
    feats = {}

    def keep(mod, inp, out):
        out["0"].retain_grad()
        feats["0"] = out["0"]

    hook = m.backbone.register_forward_hook(keep)
    m.zero_grad(set_to_none=True)
    losses = m(images, targets)
    hook.remove()
    sum(losses.values()).backward()
    heads = [m.head.classification_head.module_list[0], m.head.regression_head.module_list[0]]
    grads = [p.grad.clone() for h in heads for p in h.parameters()]
    return feats["0"].detach(), feats["0"].grad.clone(), grads


@pytest.mark.parametrize("batch_norm", [False, True])
def test_r1_leaves_the_conv4_3_head_input_and_its_gradient_unchanged(batch_norm):
    """R1 scales conv4_3 by (1 + alpha M) per position before the channel L2Norm, which is scale-invariant per
    position: the head's input is the same, and so is the gradient the loss sends into that head — its
    input gradient and its parameters' gradients (float tolerance). All negatives are kept
    (``neg_to_pos_ratio`` large): SSD's hard-negative mining ranks anchors of every map together, so R1's
    change of the deeper maps could otherwise change which conv4_3 anchors count as negatives."""
    m = arm_model("R1", f"model.batch_norm={str(batch_norm).lower()}")
    m.neg_to_pos_ratio = 10**6
    images, targets = scene()
    m.train()
    m.fe.enabled = True
    x_on, g_on, p_on = _head_pass(m, images, targets)
    m.fe.enabled = False
    x_off, g_off, p_off = _head_pass(m, images, targets)
    torch.testing.assert_close(x_on, x_off, atol=1e-5, rtol=1e-5)
    assert g_off.abs().sum() > 0
    torch.testing.assert_close(g_on, g_off, atol=1e-7, rtol=1e-4)
    for a, b in zip(p_on, p_off):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    # not a vacuous check: R2 (after the L2Norm) changes both
    m2 = arm_model("R2 constant", f"model.batch_norm={str(batch_norm).lower()}")
    m2.neg_to_pos_ratio = 10**6
    m2.train()
    x2_on, g2_on, _ = _head_pass(m2, images, targets)
    m2.fe.enabled = False
    x2_off, g2_off, _ = _head_pass(m2, images, targets)
    assert not torch.allclose(x2_on, x2_off, atol=1e-4)
    assert not torch.allclose(g2_on, g2_off, atol=1e-7, rtol=1e-3)


# ------------------------------------------------------------------------------------------ proof (b)
def _trained(arm: str):
    """A tiny detector of ``arm`` after two training steps with the true boxes (so FE, the sham or the mask
    head have acted on the weights)."""
    m = arm_model(arm, "model.score_thresh=0.0")
    images, targets = scene()
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    m.train()
    for _ in range(2):
        opt.zero_grad()
        sum(m(images, targets).values()).backward()
        opt.step()
    return m.eval()


@pytest.mark.parametrize("arm", list(FE_ARMS))
def test_inference_never_reads_the_ground_truth(arm):
    m = _trained(arm)
    images, targets = scene(seed=5)
    g = torch.Generator().manual_seed(7)
    rand = [{"boxes": torch.sort(torch.rand(4, 4, generator=g) * 127, dim=0).values[:, [0, 2, 1, 3]],
             "labels": torch.ones(4, dtype=torch.int64)} for _ in images]
    for t in rand:  # xyxy with x0 < x1, y0 < y1
        b = t["boxes"]
        t["boxes"] = torch.stack([torch.minimum(b[:, 0], b[:, 1]), torch.minimum(b[:, 2], b[:, 3]),
                                  torch.maximum(b[:, 0], b[:, 1]) + 1, torch.maximum(b[:, 2], b[:, 3]) + 1], 1)
    with torch.no_grad():
        outs = [m(images), m(images, targets), m(images, rand),
                m(images, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2)]
    assert sum(len(o["boxes"]) for o in outs[0]) > 0  # something to compare
    for out in outs[1:]:
        for a, b in zip(outs[0], out):
            assert set(b) == {"boxes", "scores", "labels"}  # no mask-head output at test
            assert all(torch.equal(a[k], b[k]) for k in a)
    assert m.fe.context is None


# ---------------------------------------------------------------------------------------- configuration
def test_new_fe_keys_at_their_defaults_keep_every_cached_run():
    cfg = C.load("smoke")
    plain = C.with_overrides(cfg, {"fe.enabled": True})
    assert runs.run_key(plain) == runs.run_key(C.with_overrides(plain, FE_ARMS["R1"]))
    keys = {runs.run_key(C.with_overrides(cfg, over)) for over in FE_ARMS.values()}
    assert len(keys) == len(FE_ARMS)  # every arm is its own run
    assert runs.run_tag(C.with_overrides(cfg, FE_ARMS["R1 sham"])).endswith("-sham-s0")
    assert "-mask-" in runs.run_tag(C.with_overrides(cfg, FE_ARMS["mask loss"]))
    with pytest.raises(C.ConfigError, match="fe.mask_loss_weight"):
        C.load(None, ["fe.mask_loss_weight=-1"])

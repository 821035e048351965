"""cmbfe.models (with its parts in cmbfe.backbones and cmbfe.priors): pinned feature maps, anchors, FE placement
and switch, eval identity, training, pretrained loading, the shipped weights."""

from __future__ import annotations

import contextlib
import math
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision.models._api
from torchvision.models import mobilenet_v3_large, resnet34, vgg

from cmbfe import config as C
from cmbfe.backbones import BACKBONES, pretrained_path
from cmbfe.config import FEConfig, ModelConfig
from cmbfe.models import build_model, load_checkpoint_weights
from cmbfe.priors import FOV_MM, PixelBoxGenerator, prior_spec

SMALL = {"size": 128, "width": 0.125}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; avoids OpenMP contention on a shared 2-core machine
    yield
    torch.set_num_threads(n)


def small(backbone: str = "vgg16", fe: bool = False, placement: str = "post_l2norm", **kw):
    cfg = ModelConfig(backbone=backbone, **{**SMALL, "priors": "cmb", **kw})
    return build_model(cfg, FEConfig(enabled=fe, placement=placement))


def blob(size: int = 128, cx: float = 60.0, cy: float = 70.0, r: float = 5.0):
    """Gray3 image in [0, 1] with one dark Gaussian blob and its xyxy box."""
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    img = 0.7 - 0.5 * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (r / 2) ** 2))
    return img.expand(3, -1, -1).clone(), torch.tensor([[cx - r, cy - r, cx + r, cy + r]])


def target(boxes: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "boxes": boxes.float().reshape(-1, 4),
        "labels": torch.ones(len(boxes.reshape(-1, 4)), dtype=torch.int64),
    }


EMPTY = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}


@pytest.mark.parametrize(
    ("backbone", "size", "maps"),
    [
        ("vgg16", 300, [38, 19, 10, 5, 3, 1]),
        ("vgg16", 512, [64, 32, 16, 8, 4, 2, 1]),  # SSD paper's SSD-512, not torchvision's 64..6, 4, 1
        ("resnet34", 300, [38, 19, 10, 5, 3, 1]),
        ("mobilenet_v3", 320, [20, 10, 5, 3, 2, 1]),
        ("vgg16", 128, [16, 8, 4, 2, 1]),
    ],
)
def test_feature_map_sizes_pinned(backbone, size, maps):
    bb = BACKBONES[backbone](size, 0.125, False).eval()
    with torch.no_grad():
        feats = bb(torch.zeros(1, 3, size, size))  # a real forward, not the meta dry run
    assert [v.shape[-1] for v in feats.values()] == maps
    assert [v.shape[-2] for v in feats.values()] == maps


def test_anchor_count_and_describe():
    m = small("vgg16", size=160)
    d = m.describe()
    sizes = [f["size"][0] for f in d["feature_maps"]]
    assert sizes == [20, 10, 5, 3, 1]
    per_loc = m.anchor_generator.num_anchors_per_location()
    assert d["num_anchors"] == sum(n * s * s for n, s in zip(per_loc, sizes))
    m.eval()
    batch, _ = m.transform([torch.rand(3, 160, 160)])
    feats = list(m.backbone(batch.tensors).values())
    anchors = m.anchor_generator(batch, feats)
    assert anchors[0].shape == (d["num_anchors"], 4)
    assert math.isclose(d["mm_per_px"], FOV_MM / 160)
    first = d["feature_maps"][0]["anchor_wh_mm"]
    stride_mm = FOV_MM / d["feature_maps"][0]["size"][0]
    assert first[0][0] >= stride_mm - 1e-6 and d["params"] > 0 and d["backbone"] == "vgg16"


def test_prior_specs():
    ratios, scales = prior_spec("paper", 6)
    assert ratios == [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
    assert scales[0] == 0.1 and scales[1] == 0.2 and scales[5] == pytest.approx(0.9) and len(scales) == 7
    ratios, scales = prior_spec("cmb", 7)
    assert ratios == [[2], [2], [], [], [], [], []]
    assert 2.5 <= scales[0] * FOV_MM <= 4.0 and len(scales) == 8
    with pytest.raises(ValueError):
        prior_spec("huge", 6)


@pytest.mark.parametrize("backbone", ["vgg16", "resnet34", "mobilenet_v3"])
def test_eval_identical_with_and_without_fe(backbone):
    torch.manual_seed(0)
    with_fe = small(backbone, fe=True)
    plain = small(backbone, fe=False)
    plain.load_state_dict(with_fe.state_dict())
    img, box = blob(150)
    images = [img, torch.rand(3, 140, 150)]
    with_fe.eval()
    plain.eval()
    with torch.no_grad():
        a, b = with_fe(images, [target(box), EMPTY]), plain(images)
    for x, y in zip(a, b):
        for k in ("boxes", "scores", "labels"):
            assert torch.equal(x[k], y[k])
    for o, im in zip(a, images):  # boxes in the original (not the resized) pixel frame
        assert (o["boxes"][:, 2:] <= torch.tensor([im.shape[2], im.shape[1]])).all() and (
            o["boxes"] >= 0
        ).all()


def test_fe_changes_training_losses_only_when_enabled():
    torch.manual_seed(0)
    img, box = blob(size=128, r=6.0)  # 12 px: matched by first-map 'paper' priors (12.8 px), where FE acts
    with_fe, plain = small(fe=True, priors="paper"), small(fe=False, priors="paper")
    plain.load_state_dict(with_fe.state_dict())
    with_fe.train()
    plain.train()
    la = with_fe([img], [target(box)])
    lb = plain([img], [target(box)])
    assert not torch.allclose(la["classification"], lb["classification"])
    assert not torch.allclose(la["bbox_regression"], lb["bbox_regression"])
    with_fe.fe.enabled = False  # the switch: the same network trains without FE
    lc = with_fe([img], [target(box)])
    assert torch.equal(lc["classification"], lb["classification"])
    assert torch.equal(lc["bbox_regression"], lb["bbox_regression"])


def _sources(model, img, box, enhanced: bool, variant: str = "fe"):
    """The backbone's sources for one image, with FE bound to its box (alpha 1, beta 1.5) or not."""
    model.eval()
    batch, tgts = model.transform([img], [target(box)])
    model.fe.variant = variant
    with torch.no_grad(), contextlib.ExitStack() as stack:
        if enhanced:
            stack.enter_context(model.fe.bound([tgts[0]["boxes"]], 0.5, 0.25))
        return list(model.backbone(batch.tensors).values())


@pytest.mark.parametrize("backbone", ["vgg16", "resnet34"])
def test_pre_l2norm_is_cancelled_at_head_but_changes_deeper_layers(backbone):
    torch.manual_seed(0)
    m = small(backbone, fe=True, placement="pre_l2norm")
    img, box = blob(size=128, r=10.0)
    plain, enh = _sources(m, img, box, False), _sources(m, img, box, True)
    torch.testing.assert_close(enh[0], plain[0], atol=1e-4, rtol=1e-4)  # L2Norm cancels the per-pixel scale
    assert not torch.allclose(enh[1], plain[1], atol=1e-4)


@pytest.mark.parametrize("backbone", ["vgg16", "resnet34", "mobilenet_v3"])
def test_post_l2norm_changes_head_input_only(backbone):
    torch.manual_seed(0)
    m = small(backbone, fe=True, placement="post_l2norm")
    img, box = blob(size=128, r=10.0)
    plain, enh = _sources(m, img, box, False), _sources(m, img, box, True)
    diff = (enh[0] - plain[0]).abs().amax()
    assert diff > 1e-3 * plain[0].abs().amax()  # not a no-op
    for a, b in zip(enh[1:], plain[1:]):
        assert torch.equal(a, b)


def test_fe_maps_uses_resized_centre_channel():
    m = small(fe=True)
    img, box = blob(size=200, cx=90, cy=100, r=9)
    img[0] = 0.0  # channels differ: FE must read the centre channel (index 1)
    d = m.fe_maps([img], [target(box)])
    want = F.interpolate(img[None], size=(128, 128), mode="bilinear", align_corners=False)[:, 1:2]
    torch.testing.assert_close(d["image"], want, atol=1e-5, rtol=1e-5)
    assert d["mask"].shape[-2:] == d["before"].shape[-2:] == (16, 16)
    assert d["mask_full"].max() > 0 and d["mask"].max() > 0
    assert m.training  # mode restored


@pytest.mark.parametrize("backbone", ["vgg16", "resnet34", "mobilenet_v3"])
def test_zero_box_images_train_cleanly(backbone):
    torch.manual_seed(0)
    m = small(backbone, fe=True)
    m.train()
    losses = m([torch.rand(3, 128, 128), torch.rand(3, 100, 120)], [EMPTY, EMPTY])
    assert set(losses) == {"bbox_regression", "classification"}
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_losses_decrease_on_a_dark_blob():
    torch.manual_seed(0)
    m = small("vgg16", fe=True)
    m.train()
    m.fe.set_progress(0.25)
    img, box = blob()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    history = []
    for _ in range(20):
        losses = m(
            [img, img.flip(-1)],
            [
                target(box),
                target(box[:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor([128, 0, 128, 0])),
            ],
        )
        loss = sum(losses.values())
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert sum(history[-3:]) / 3 < 0.5 * sum(history[:3]) / 3


def test_set_progress_drives_alpha():
    m = build_model(ModelConfig(**SMALL), FEConfig(enabled=True, schedule="cosine", alpha=2.0))
    m.fe.set_progress(0.0)
    assert m.fe.strength == pytest.approx(2.0)
    m.fe.set_progress(0.5)
    assert m.fe.strength == pytest.approx(1.0)
    m.fe.set_progress(3.0)
    assert m.fe.strength == pytest.approx(0.0, abs=1e-12)
    assert m.describe()["fe"]["alpha"] == 2.0  # the configured strength


def test_invalid_configs():
    with pytest.raises(ValueError, match="backbone"):
        build_model(ModelConfig(backbone="alexnet", **SMALL), FEConfig())
    with pytest.raises(ValueError, match="size"):
        build_model(ModelConfig(size=96, width=0.125), FEConfig())
    with pytest.raises(ValueError, match="width"):
        build_model(ModelConfig(pretrained=True, **SMALL), FEConfig())


@pytest.mark.parametrize("backbone", ["vgg16", "resnet34", "mobilenet_v3"])
def test_pretrained_without_cache_is_a_clear_error(backbone, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def no_network(*a, **k):  # what urllib raises on a machine without network access
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(FileNotFoundError) as err:
        build_model(ModelConfig(backbone=backbone, size=128, width=1.0, pretrained=True), FEConfig())
    assert str(tmp_path / "checkpoints") in str(err.value)
    assert str(pretrained_path(backbone)) in str(err.value) and "could not be downloaded" in str(err.value)


def test_pretrained_is_fetched_by_torchvision_when_not_cached(tmp_path, monkeypatch):
    """With network access torchvision downloads the weights into the hub cache, as it normally does."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    trunk = vgg.make_layers(vgg.cfgs["D"])
    calls = []

    def fake_fetch(url, *a, **k):
        calls.append(url)
        return {f"features.{k}": v for k, v in trunk.state_dict().items()}

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", fake_fetch)
    m = build_model(ModelConfig(backbone="vgg16", size=128, width=1.0, pretrained=True), FEConfig())
    assert calls and calls[0].endswith(pretrained_path("vgg16").name)
    first = next(p for n, p in m.backbone.named_parameters() if p.dim() == 4)
    torch.testing.assert_close(first, trunk[0].weight)


@pytest.mark.parametrize("backbone", ["vgg16", "resnet34", "mobilenet_v3"])
def test_pretrained_loads_from_local_cache(backbone, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    torch.manual_seed(3)
    if backbone == "vgg16":
        trunk = vgg.make_layers(vgg.cfgs["D"])
        state, ref = {f"features.{k}": v for k, v in trunk.state_dict().items()}, trunk[0].weight
    elif backbone == "resnet34":
        net = resnet34()
        state, ref = net.state_dict(), net.conv1.weight
    else:
        net = mobilenet_v3_large()
        state, ref = net.state_dict(), net.features[0][0].weight
    torch.save(state, pretrained_path(backbone))
    m = build_model(ModelConfig(backbone=backbone, size=128, width=1.0, pretrained=True), FEConfig())
    first = next(p for n, p in m.backbone.named_parameters() if p.dim() == 4)
    torch.testing.assert_close(first, ref)
    assert m.transform.image_std[0] == pytest.approx(1 / 255 if backbone == "vgg16" else 0.229)


def test_checkpoint_round_trip(tmp_path):
    a, b = small(), small()
    torch.save(a.state_dict(), tmp_path / "model.pt")
    torch.save({"model": a.state_dict(), "step": 3}, tmp_path / "checkpoint.pt")
    for name in ("model.pt", "checkpoint.pt"):
        load_checkpoint_weights(b, tmp_path / name)
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(v, w), k


def test_cmb_priors_never_smaller_than_their_stride():
    # a CMB must overlap some anchor, otherwise SSD's best-anchor match is an arbitrary zero-IoU anchor
    _, scales = prior_spec("cmb", 6, [32, 16, 8, 4, 2, 1])
    assert all(s >= 1 / f - 1e-12 for s, f in zip(scales, [32, 16, 8, 4, 2, 1]))
    assert scales == sorted(scales)
    _, unfloored = prior_spec("cmb", 7)
    _, floored = prior_spec("cmb", 7, [64, 32, 16, 8, 4, 2, 1])
    assert floored[0] == 1 / 64 > unfloored[0]  # at 512 px the 3 mm prior (6.4 px) is below the 8 px stride


def test_pixel_box_generator_is_torchvision_at_ref_size_and_fixed_in_pixels():
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.image_list import ImageList

    ratios, scales = prior_spec("cmb", 3, [32, 16, 8])
    ours, tv = PixelBoxGenerator(ratios, scales, 256), DefaultBoxGenerator(ratios, scales=scales)

    def boxes(gen, side, grids):
        feats = [torch.zeros(1, 1, g, g) for g in grids]
        return gen(ImageList(torch.zeros(1, 3, side, side), [(side, side)]), feats)[0]

    assert torch.equal(boxes(ours, 256, [32, 16, 8]), boxes(tv, 256, [32, 16, 8]))
    full, half = boxes(ours, 256, [32, 16, 8]), boxes(ours, 128, [16, 8, 4])
    wh_full, wh_half = full[:, 2:] - full[:, :2], half[:, 2:] - half[:, :2]
    # the first map's 4 prior shapes are the same pixel sizes on the 128-px window as on the 256-px slice
    torch.testing.assert_close(wh_half[:4], wh_full[:4])
    # and centres sit on the window's own 8-px grid
    centres = (half[:4][:, :2] + half[:4][:, 2:]) / 2
    torch.testing.assert_close(centres, torch.full((4, 2), 4.0))
    # torchvision's generator would halve them
    tvh = boxes(tv, 128, [16, 8, 4])
    torch.testing.assert_close((tvh[:4, 2:] - tvh[:4, :2]) * 2, wh_full[:4])


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_train_crop_windows_in_training_whole_slices_in_eval(backbone):
    cfg = ModelConfig(backbone=backbone, size=256, train_crop=128, width=0.125, priors="cmb")
    m = build_model(cfg, FEConfig(enabled=True))
    assert m.training and m.input_side == 128
    box = {"boxes": torch.tensor([[20.0, 20.0, 25.0, 26.0]]), "labels": torch.tensor([1])}
    losses = m([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], [box, box])  # 64-px windows of 128-px slices
    assert all(torch.isfinite(v) for v in losses.values())
    m.eval()
    assert m.input_side == 256
    out = m([torch.rand(3, 128, 128)])[0]
    assert out["boxes"].shape[-1] == 4 and (out["boxes"] <= 128).all()
    m.train()
    assert m.input_side == 128 and m.describe()["train_crop"] == 128


def test_train_crop_validated():
    with pytest.raises(ValueError, match="train_crop"):
        build_model(ModelConfig(size=256, train_crop=256, width=0.125), FEConfig())
    with pytest.raises(ValueError, match="train_crop"):
        build_model(ModelConfig(size=256, train_crop=64, width=0.125), FEConfig())


def test_vgg_batch_norm_option():
    plain = build_model(ModelConfig(size=128, width=0.125), FEConfig())
    bn = build_model(ModelConfig(size=128, width=0.125, batch_norm=True), FEConfig())
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in bn.backbone.modules())
    assert n_bn == 13 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.backbone.modules())
    assert bn.feature_shapes == plain.feature_shapes and bn.describe()["batch_norm"] is True
    # ResNet-34 ignores the flag (it always has BN); pretrained BN-VGG is refused
    build_model(ModelConfig(backbone="resnet34", size=128, width=0.125, batch_norm=True), FEConfig())
    with pytest.raises(ValueError, match="batch_norm"):
        build_model(ModelConfig(size=128, width=1.0, batch_norm=True, pretrained=True), FEConfig())


@pytest.mark.parametrize("variant", ["fe", "l2n", "mean", "ae"])
def test_every_reading_is_the_identity_in_eval(variant):
    torch.manual_seed(0)
    with_fe, plain = small(fe=True, placement="pre_l2norm"), small(fe=False)
    with_fe.fe.variant = variant
    plain.load_state_dict(with_fe.state_dict())
    img, box = blob(150)
    with_fe.eval()
    plain.eval()
    with torch.no_grad():
        a, b = with_fe([img], [target(box)]), plain([img])
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in ("boxes", "scores", "labels"))


@pytest.mark.parametrize("variant", ["l2n", "fe"])
def test_rescaling_readings_are_cancelled_by_l2norm_at_the_head(variant):
    """R1 (fe) and R3 (l2n) inline before the L2Norm multiply each position by a positive scalar: the conv4_3
    head input is unchanged, the deeper maps are not."""
    torch.manual_seed(0)
    m = small("vgg16", fe=True, placement="pre_l2norm")
    img, box = blob(size=128, r=10.0)
    plain, enh = _sources(m, img, box, False), _sources(m, img, box, True, variant)
    torch.testing.assert_close(enh[0], plain[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(enh[1], plain[1], atol=1e-4)


@pytest.mark.parametrize("placement", ["pre_l2norm", "post_l2norm"])
def test_mean_reading_changes_the_head_input_inside_boxes_only(placement):
    """R4 changes the feature direction, so it survives the L2Norm; outside the boxes the head input is
    unchanged (the mask is 0 there)."""
    torch.manual_seed(0)
    m = small("vgg16", fe=True, placement=placement)
    img, box = blob(size=128, r=10.0)
    plain, enh = _sources(m, img, box, False), _sources(m, img, box, True, "mean")
    changed = (enh[0] - plain[0]).abs().amax(dim=1)[0] > 1e-5  # [h, w] positions of the first source
    assert changed.any()
    stride = 128 / changed.shape[-1]  # box in network px -> first-source cells
    b = box[0] / stride  # the 128-px image is the 128-px network input
    rows, cols = torch.nonzero(changed, as_tuple=True)
    assert (cols >= math.floor(b[0]) - 1).all() and (cols <= math.ceil(b[2]) + 1).all()
    assert (rows >= math.floor(b[1]) - 1).all() and (rows <= math.ceil(b[3]) + 1).all()


def test_max_box_mm_drops_oversized_detections():
    torch.manual_seed(0)
    m = small()
    m.eval()
    img, _ = blob(128)
    with torch.no_grad():
        all_dets = m([img])[0]
        m.max_box_mm = 8.0  # 240 / 128 = 1.875 mm per network (= image) px here: <= 4.27 px
        kept = m([img])[0]
    side = lambda b: torch.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
    assert len(all_dets["boxes"]) > len(kept["boxes"]) and (side(all_dets["boxes"]) > 8.0 / 1.875).any()
    assert (side(kept["boxes"]) <= 8.0 / 1.875 + 1e-4).all()
    big = side(all_dets["boxes"]) <= 8.0 / 1.875 + 1e-4
    torch.testing.assert_close(kept["scores"], all_dets["scores"][big])  # the rest untouched, same order


@pytest.mark.parametrize(("backbone", "size", "crop"), [("vgg16", 512, 128), ("resnet34", 300, 0),
                                                      ("mobilenet_v3", 320, 0)])
def test_heads_keep_only_the_finest_maps_and_build_no_deeper_block(backbone, size, crop):
    kw = {"backbone": backbone, "size": size, "train_crop": crop, "width": 0.125, "priors": "cmb"}
    full = build_model(ModelConfig(**kw), FEConfig())
    cut = build_model(ModelConfig(**kw, heads=3), FEConfig())
    d_full, d_cut = full.describe(), cut.describe()
    assert [f["size"] for f in d_cut["feature_maps"]] == [f["size"] for f in d_full["feature_maps"]][:3]
    assert len(cut.backbone.extra) == len(full.backbone.extra) - (len(d_full["feature_maps"]) - 3)
    assert d_cut["params"] < d_full["params"] and d_cut["heads"] == 3 and d_full["heads"] == 0
    assert len(cut.head.classification_head.module_list) == 3
    cut.eval()
    with torch.no_grad():  # whole slices through the cut network, 3 maps' anchors only
        out = cut([torch.rand(3, 96, 96)])[0]
    assert out["boxes"].shape[-1] == 4
    cut.train()
    side = crop or size
    losses = cut([torch.rand(3, side, side), torch.rand(3, side, side)],
                 [target(torch.tensor([[20.0, 20.0, 26.0, 27.0]]))] * 2)
    assert all(torch.isfinite(v) for v in losses.values())


def test_heads_3_on_the_default_profile_fits_cmbs():
    """SSD-512 built for 128-px windows with 'cmb' priors: maps 64/32/16 px, priors 3.75/7.5/15/15 mm; without
    heads the deeper two maps (14 and 13 px on a whole slice) carry 17-31 mm priors."""
    cfg = C.load("default")  # heads 3 since issue #17
    full = build_model(C.with_overrides(cfg, {"model.heads": 0}).model, cfg.fe).describe()
    cut = build_model(C.with_overrides(cfg, {"model.heads": 3}).model, cfg.fe).describe()
    assert cfg.model.heads == 3
    assert [f["size"][0] for f in cut["feature_maps"]] == [64, 32, 16]
    assert [round(s * FOV_MM, 2) for s in cut["scales"]] == [3.75, 7.5, 15.0, 15.0]
    assert [f["size"][0] for f in full["feature_maps"]][:3] == [64, 32, 16] and len(full["feature_maps"]) == 5
    assert max(max(wh) for wh in cut["feature_maps"][-1]["anchor_wh_mm"]) <= 15.0


def test_heads_equal_to_all_maps_builds_the_same_network_as_0():
    """``maps`` changes nothing but the number of blocks built: same RNG draws, same weights."""
    torch.manual_seed(0)
    a = small("vgg16")
    n = len(a.describe()["feature_maps"])
    torch.manual_seed(0)
    b = small("vgg16", heads=n)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_heads_validated():
    with pytest.raises(C.ConfigError, match="model.heads"):
        small("vgg16", heads=2)  # priors need 3 maps
    with pytest.raises(C.ConfigError, match="model.heads.*only 5 source maps"):
        small("vgg16", heads=6)  # VGG-16 at 128 px has 5
    with pytest.raises(C.ConfigError, match="model.heads"):
        C.load("smoke", ["model.heads=1"])
    assert C.load("smoke", ["model.heads=3"]).model.heads == 3


def test_fe_part_has_no_state_and_the_model_reads_no_config():
    m = small(fe=True)
    assert not list(m.fe.parameters()) and not list(m.fe.buffers())
    assert not any(".fe." in k or k.startswith("fe.") for k in m.state_dict())
    assert not any(isinstance(v, (ModelConfig, FEConfig)) for mod in m.modules() for v in vars(mod).values())
    assert m.fe is m.backbone.fe and m.fe.context is None


def test_fe_is_the_identity_unless_bound():
    torch.manual_seed(0)
    m = small(fe=True, placement="post_l2norm")
    img, box = blob(size=128, r=10.0)
    m.eval()
    batch, tgts = m.transform([img], [target(box)])
    with torch.no_grad():
        plain = m.backbone(batch.tensors)["0"]
        with m.fe.bound([tgts[0]["boxes"]], 0.5, 0.25) as ctx:
            enh = m.backbone(batch.tensors)["0"]
        again = m.backbone(batch.tensors)["0"]
    assert ctx.mask is not None and not torch.equal(plain, enh) and torch.equal(plain, again)


@pytest.mark.parametrize("width", [0.25, 1.0])
def test_mobilenet_c4_is_torchvisions(width):
    """The vendored C4 rule (last depthwise stride-2 block) picks torchvision's own ``_is_cn`` block."""
    from cmbfe.backbones import _last_stride2_block

    for reduced in (True, False):
        feats = mobilenet_v3_large(width_mult=width, reduced_tail=reduced).features
        want = [i for i, b in enumerate(feats) if getattr(b, "_is_cn", False)][-1]
        assert _last_stride2_block(feats) == want


def test_cmbfe_imports_no_private_torchvision_name():
    import ast
    from pathlib import Path

    import cmbfe

    bad = []
    for path in Path(cmbfe.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torchvision"):
                bad += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert not bad, bad


SHIPPED = C.REPO_ROOT / "models"


@pytest.mark.skipif(not (SHIPPED / "model.pt").is_file(), reason="no shipped model in models/")
def test_shipped_weights_load_into_the_built_model():
    """The committed model's state dict matches build_model's keys and shapes exactly (strict load)."""
    cfg = C.load(SHIPPED / "config.yaml")
    m = build_model(cfg.model, cfg.fe)
    load_checkpoint_weights(m, SHIPPED / "model.pt")  # strict: a renamed or missing key fails here

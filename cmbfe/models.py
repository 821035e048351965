"""SSD detectors for cerebral microbleeds built from torchvision parts, with training-only FE.

``build_model(model_cfg, fe_cfg)`` assembles torchvision's ``SSD`` from a backbone (``BACKBONES``:
name -> builder), a ``DefaultBoxGenerator`` and an ``SSDHead`` (``SSDLiteHead`` for MobileNet).

Conventions: the model receives 3-channel float images in [0, 1] (``gray3``: one slice replicated;
``2.5d``: slices z-1, z, z+1), of any size; SSD's transform normalises them with ``image_mean/std``
and resizes them to ``size x size``. Targets and detections are ``xyxy`` boxes in pixels of the
image passed in (detections are mapped back to that frame by torchvision's postprocess). Two classes:
0 background, 1 cmb. The network input is assumed to span the 240 mm FOV (``FOV_MM``), so a pixel
of the resized input is ``240 / size`` mm and prior scales in mm are size independent.

Training windows (``model.train_crop`` > 0): the data pipeline cuts square windows of
``train_crop * W / size`` slice pixels, the transform resizes them to ``train_crop`` px in training mode
(same pixel scale as a whole slice at ``size``) and default boxes are fixed in network pixels
(:class:`PixelBoxGenerator`), so a prior is the same box on a window and on a whole slice. The extras are
built for the window side and also accept the whole slice; ``eval()`` switches back to ``size``. This
is how the CPU profile trains SSD-512 at the cost of SSD-256 per image.

Feature maps always come from a dry run (``meta`` device; CPU for MobileNet), never from a table. Extras
(VGG-16 and ResNet-34) follow one rule reproducing the SSD paper: 3x3 stride-2 convs while the map
is larger than 5, then 3x3 valid convs, and a final 4x4 pad-1 conv for a 2x2 map, down to 1x1:
VGG-16 gives 38, 19, 10, 5, 3, 1 at 300 and 64, 32, 16, 8, 4, 2, 1 at 512 (the SSD paper's SSD-512,
not torchvision's highres 64, 32, 16, 8, 6, 4, 1). Default-box centres are spread over the real map
sizes (``steps = size / f_k``, torchvision's ``steps=None``).

FE (``cmbfe.fe``) wraps the backbone's first source (conv4_3-like, stride 8; MobileNet: stride 16):
``post_l2norm`` enhances the source after its L2Norm (only the head sees FE); ``pre_l2norm`` enhances
inline before the L2Norm, so the enhanced map feeds the L2Norm *and* the deeper layers (as the paper's
inline layer would; the L2Norm then cancels the per-pixel FE scale for the conv4_3 head). FE runs only
when ``model.training and fe_cfg.enabled and targets is not None``; in eval the network is the plain SSD.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import MobileNet_V3_Large_Weights, ResNet34_Weights, VGG16_Weights, vgg
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD, SSDHead, _xavier_init
from torchvision.models.detection.ssdlite import SSDLiteHead, _extra_block, _normal_init
from torchvision.models.detection.transform import resize_boxes
from torchvision.models.mobilenetv3 import mobilenet_v3_large
from torchvision.models.resnet import BasicBlock, conv1x1

from cmbfe.config import Backbone, FEConfig, FEPlacement, ModelConfig, Priors, check
from cmbfe.fe import FEContext, alpha_at, enhancement_mask

FOV_MM = 240.0  # field of view spanned by the network input (paper: 512 px x 0.47 mm)
NUM_CLASSES = 2  # background, cmb
CMB_PRIOR_MIN_MM = 3.0  # smallest default box of the 'cmb' priors (first map)
CMB_PRIOR_RATIO = 1.6  # geometric step between consecutive 'cmb' prior scales
CMB_AR_MAPS = 2  # 'cmb' priors: aspect ratio 2 only on the first two (finest) maps
_IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
_VGG_CAFFE = ([0.48235, 0.45882, 0.40784], [1.0 / 255.0] * 3)  # torchvision ssd300_vgg16 (amdegroot weights)
_MRI = ([0.5] * 3, [0.25] * 3)  # [0, 1] MRI slices -> about [-2, 2]
_PRETRAINED = {
    "vgg16": VGG16_Weights.IMAGENET1K_FEATURES,
    "resnet34": ResNet34_Weights.IMAGENET1K_V1,
    "mobilenet_v3": MobileNet_V3_Large_Weights.IMAGENET1K_V1,
}


def _ch(channels: int, width: float) -> int:
    """Channel count scaled by the width multiplier (at least 8)."""
    return max(8, round(channels * width))


def pretrained_path(backbone: str) -> Path:
    """Where ImageNet weights for ``backbone`` must lie: ``torch.hub.get_dir()/checkpoints/<torchvision file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / _PRETRAINED[backbone].url.rsplit("/", 1)[-1]


def _imagenet_state(backbone: str) -> dict[str, Tensor]:
    """ImageNet state dict as torchvision gets it: from the torch hub cache (:func:`pretrained_path`), else
    downloaded there by torchvision. Without network access and without the cached file this is a
    ``FileNotFoundError`` naming the cache path (offline machines copy the file there)."""
    path = pretrained_path(backbone)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    try:
        return _PRETRAINED[backbone].get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a truncated download a RuntimeError
        raise FileNotFoundError(
            f"model.pretrained=true: ImageNet weights for {backbone} are not at {path} and could not be "
            f"downloaded ({type(e).__name__}: {e}); copy {_PRETRAINED[backbone].url} there, or set "
            "model.pretrained=false"
        ) from None


class SSDBackbone(nn.Module):
    """Base of the feature extractors: ``forward(x) -> OrderedDict[str, Tensor]`` of SSD sources.

    ``fe_context`` (set by ``CMBDetector`` for one forward pass) enhances the first source according
    to ``placement``; ``None`` means the plain network.
    """

    first_source = "first source"
    dry_run_device = "meta"

    def __init__(self, placement: str):
        super().__init__()
        if placement not in get_args(FEPlacement):
            raise ValueError(f"unknown FE placement {placement!r} (allowed: {', '.join(get_args(FEPlacement))})")
        self.placement = placement
        self.fe_context: FEContext | None = None

    def enhance(self, feat: Tensor, inp: Tensor) -> Tensor:
        """Apply the current FE context to ``feat`` (identity without one)."""
        return feat if self.fe_context is None else self.fe_context(feat, inp)

    def _first_source(self, x: Tensor, inp: Tensor, scale: Tensor | None) -> tuple[Tensor, Tensor]:
        """(head input, tensor continuing into deeper layers) for the conv4_3-like map ``x``."""
        if self.placement == "pre_l2norm":
            x = self.enhance(x, inp)
        src = x if scale is None else scale.view(1, -1, 1, 1) * F.normalize(x)
        if self.placement == "post_l2norm":
            src = self.enhance(src, inp)
        return src, x


def _ssd_extras(in_ch: int, fmap: int, width: float) -> nn.ModuleList:
    """SSD extra layers from a ``fmap x fmap`` map down to 1x1 (rule in the module docstring)."""
    blocks, i = nn.ModuleList(), 0
    while fmap > 1:
        mid, out = _ch(256 if i == 0 else 128, width), _ch(512 if i == 0 else 256, width)
        if fmap > 5:
            conv, fmap = nn.Conv2d(mid, out, 3, stride=2, padding=1), (fmap + 1) // 2
        elif fmap >= 3:
            conv, fmap = nn.Conv2d(mid, out, 3), fmap - 2
        else:
            conv, fmap = nn.Conv2d(mid, out, 4, padding=1), 1
        blocks.append(
            nn.Sequential(nn.Conv2d(in_ch, mid, 1), nn.ReLU(inplace=True), conv, nn.ReLU(inplace=True))
        )
        in_ch, i = out, i + 1
    _xavier_init(blocks)
    return blocks


@torch.no_grad()
def _meta_out(module: nn.Module, channels: int, size: int, device: str = "meta") -> Any:
    """Output of ``module`` (eval mode) for a ``[1, channels, size, size]`` input: a shape-only dry run.

    ``meta`` runs on a copy without touching data (fast for plain convs); ``cpu`` runs the module itself
    (faster for MobileNet, whose hardswish/SE layers are slow to trace on meta).
    """
    if device == "meta":
        m = copy.deepcopy(module).to("meta").eval()
        return m(torch.empty(1, channels, size, size, device="meta"))
    was_training = module.training
    module.eval()
    try:
        return module(torch.zeros(1, channels, size, size))
    finally:
        module.train(was_training)


class VGG16Backbone(SSDBackbone):
    """VGG-16 SSD extractor (torchvision layout): conv4_3 + L2Norm (scale 20), fc6/fc7 (dilated), extras."""

    first_source = "conv4_3 (stride 8) after L2Norm"

    def __init__(self, size: int, width: float, pretrained: bool, placement: str, batch_norm: bool = False):
        super().__init__(placement)
        cfg = [c if c == "M" else _ch(int(c), width) for c in vgg.cfgs["D"]]  # VGG-16 layout
        # without BN the indices are identical to torchvision's vgg16().features; BN (vgg16_bn layout)
        # is for training from scratch, where it converges several times faster
        trunk = vgg.make_layers(cfg, batch_norm=batch_norm)
        if pretrained:
            state = _imagenet_state("vgg16")
            trunk.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("features.")})
        else:
            for m in trunk.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.zeros_(m.bias)
        pools = [i for i, layer in enumerate(trunk) if isinstance(layer, nn.MaxPool2d)]
        trunk[pools[2]].ceil_mode = True  # 75 -> 38 at 300, as the SSD paper
        c4, c7 = _ch(512, width), _ch(1024, width)
        self.scale_weight = nn.Parameter(torch.full((c4,), 20.0))
        self.features = nn.Sequential(*trunk[: pools[3]])  # until conv4_3 + ReLU
        fc = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1),  # modified pool5
            nn.Conv2d(c4, c7, kernel_size=3, padding=6, dilation=6),  # fc6, atrous
            nn.ReLU(inplace=True),
            nn.Conv2d(c7, c7, kernel_size=1),  # fc7
            nn.ReLU(inplace=True),
        )
        _xavier_init(fc)
        fc7 = nn.Sequential(self.features, *trunk[pools[3] : -1], fc)
        self.extra = nn.ModuleList([nn.Sequential(*trunk[pools[3] : -1], fc)])
        self.extra.extend(_ssd_extras(c7, int(_meta_out(fc7, 3, size).shape[-1]), width))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        inp = x
        src, x = self._first_source(self.features(x), inp, self.scale_weight)
        out = [src]
        for block in self.extra:
            x = block(x)
            out.append(x)
        return OrderedDict((str(i), v) for i, v in enumerate(out))


class ResNet34Backbone(SSDBackbone):
    """ResNet-34 SSD extractor: layer2 (stride 8) + L2Norm as the conv4_3-like source, layer3, layer4, extras.

    Attribute names match torchvision's ``resnet34`` (``conv1``, ``bn1``, ``layer1`` ...) so ImageNet
    weights load directly; every width is scaled by ``width``.
    """

    first_source = "layer2 (stride 8) after L2Norm"

    def __init__(self, size: int, width: float, pretrained: bool, placement: str):
        super().__init__(placement)
        planes = [_ch(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, planes[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes, layers = planes[0], []
        for p, n, stride in zip(planes, (3, 4, 6, 3), (1, 2, 2, 2)):
            down = None
            if stride != 1 or inplanes != p:
                down = nn.Sequential(conv1x1(inplanes, p, stride), nn.BatchNorm2d(p))
            layers.append(
                nn.Sequential(
                    BasicBlock(inplanes, p, stride, down), *[BasicBlock(p, p) for _ in range(n - 1)]
                )
            )
            inplanes = p
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if pretrained:
            state = _imagenet_state("resnet34")
            self.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
        self.scale_weight = nn.Parameter(torch.full((planes[1],), 20.0))
        trunk = nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool, *layers)
        self.extra = _ssd_extras(planes[3], int(_meta_out(trunk, 3, size).shape[-1]), width)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        inp = x
        x = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        src, x = self._first_source(self.layer2(x), inp, self.scale_weight)
        out = [src]
        for block in (self.layer3, self.layer4, *self.extra):
            x = block(x)
            out.append(x)
        return OrderedDict((str(i), v) for i, v in enumerate(out))


class MobileNetV3Backbone(SSDBackbone):
    """SSDlite extractor on torchvision's MobileNetV3-Large (as ``ssdlite320_mobilenet_v3_large``).

    Sources: the C4 expansion layer (stride 16; 20x20 at 320; no L2Norm: ``post_l2norm`` enhances only
    the head branch, ``pre_l2norm`` inline), the last backbone conv (stride 32), then SSDlite extra blocks
    (stride 2) down to 1x1. Reduced tail when not pretrained, as torchvision does. As torchvision's SSDlite,
    training needs batches of >= 2 images (BatchNorm on the 1x1 extra map).
    """

    first_source = "C4 expansion (stride 16)"
    dry_run_device = "cpu"

    def __init__(self, size: int, width: float, pretrained: bool, placement: str):
        super().__init__(placement)
        norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
        net = mobilenet_v3_large(width_mult=width, reduced_tail=not pretrained, norm_layer=norm)
        if pretrained:
            net.load_state_dict(_imagenet_state("mobilenet_v3"))
        else:
            _normal_init(net)
        bb = net.features
        c4 = [i for i, b in enumerate(bb) if getattr(b, "_is_cn", False)][-1]
        self.features = nn.Sequential(
            nn.Sequential(*bb[:c4], bb[c4].block[0]),  # until the C4 expansion layer
            nn.Sequential(bb[c4].block[1:], *bb[c4 + 1 :]),  # C4 depthwise until the end
        )
        fmap = int(_meta_out(self.features, 3, size, "cpu").shape[-1])
        depth = [max(16, int(d * width)) for d in (512, 256, 256, 128)]
        in_ch, blocks = bb[-1].out_channels, nn.ModuleList()
        while fmap > 1:
            out = depth[min(len(blocks), len(depth) - 1)]
            blocks.append(_extra_block(in_ch, out, norm))
            in_ch, fmap = out, (fmap + 1) // 2
        _normal_init(blocks)
        self.extra = blocks

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        inp = x
        src, x = self._first_source(self.features[0](x), inp, None)
        out = [src]
        for block in (self.features[1], *self.extra):
            x = block(x)
            out.append(x)
        return OrderedDict((str(i), v) for i, v in enumerate(out))


BACKBONES: dict[Backbone, Callable[..., SSDBackbone]] = {  # keys: the values of config.Backbone
    "vgg16": VGG16Backbone,
    "resnet34": ResNet34Backbone,
    "mobilenet_v3": MobileNetV3Backbone,
}


def prior_spec(priors: str, n_maps: int, fmap_sizes: list[int] | None = None) -> tuple[list[list[int]], list[float]]:
    """(aspect ratios per map, ``n_maps + 1`` scales as fractions of the input side) for a prior set.

    ``paper``: SSD eq. 4 -- 0.1 on the first map, then 0.2 .. 0.9 linearly, 1.05 closing; aspect
    ratios [2] on the first and last two maps, [2, 3] between (SSD-300: 0.1, 0.2, 0.375, ..., 0.9).
    ``cmb``: 2-10 mm CMBs; scales in mm ``3.0 * 1.6**k`` (3, 4.8, 7.7, 12.3, 19.7, 31.5, 50, 80 mm)
    over the 240 mm FOV; aspect ratio 2 on the first two maps only, none on coarser ones (4 boxes per
    location on maps 1-2, 2 elsewhere). First-map boxes: 3.0 and 3.8 mm squares, 4.2 x 2.1 mm.
    With ``fmap_sizes`` given, no 'cmb' scale is smaller than its map's stride (``1 / fmap_size`` of the
    input): anchors narrower than the anchor spacing leave CMBs overlapping no anchor at all, and SSD's
    best-anchor matcher then assigns such a box to an arbitrary (zero-IoU) anchor with huge offsets.
    """
    if n_maps < 3:
        raise ValueError(f"need at least 3 feature maps, got {n_maps}")
    if priors == "paper":
        scales = [0.1] + [0.2 + 0.7 * k / (n_maps - 2) for k in range(n_maps - 1)] + [1.05]
        ratios = [[2] if k == 0 or k >= n_maps - 2 else [2, 3] for k in range(n_maps)]
    elif priors == "cmb":
        scales = [CMB_PRIOR_MIN_MM * CMB_PRIOR_RATIO**k / FOV_MM for k in range(n_maps + 1)]
        if fmap_sizes is not None:
            floor = [1.0 / f for f in fmap_sizes] + [1.0 / fmap_sizes[-1]]
            scales = [max(s, f) for s, f in zip(scales, floor)]
            scales = [max(scales[: k + 1]) for k in range(len(scales))]
        ratios = [[2] if k < CMB_AR_MAPS else [] for k in range(n_maps)]
    else:
        raise ValueError(f"unknown priors {priors!r} (allowed: {', '.join(get_args(Priors))})")
    return ratios, scales


class PixelBoxGenerator(DefaultBoxGenerator):
    """torchvision's ``DefaultBoxGenerator`` with box sizes fixed in network pixels.

    torchvision gives default-box sizes as fractions of the input side, so a 256-px training window would
    get boxes half the pixel size of those on a 512-px whole slice. Here ``scales`` are fractions of
    ``ref_size`` (the model's whole-slice input ``size``) and, for any other input side, the sizes are
    rescaled so that a prior covers the same number of pixels on windows and on whole slices. Centres stay
    at ``(j + 0.5) / f_k`` of each map. At ``ref_size`` the boxes equal ``DefaultBoxGenerator``'s exactly.
    """

    def __init__(self, aspect_ratios: list[list[int]], scales: list[float], ref_size: int) -> None:
        super().__init__(aspect_ratios, scales=scales, steps=None)
        self.ref_size = int(ref_size)

    def _grid_default_boxes(
        self, grid_sizes: list[list[int]], image_size: list[int], dtype: torch.dtype = torch.float32
    ) -> Tensor:
        boxes = super()._grid_default_boxes(grid_sizes, image_size, dtype=dtype)
        h, w = int(image_size[0]), int(image_size[1])
        if (h, w) == (self.ref_size, self.ref_size):
            return boxes
        f = torch.tensor([self.ref_size / w, self.ref_size / h], dtype=dtype)
        return torch.cat([boxes[:, :2], boxes[:, 2:] * f], dim=1)


class CMBDetector(SSD):
    """torchvision ``SSD`` (2 classes) whose backbone's first source is enhanced by FE during training.

    Train: ``model(images, targets) -> {"bbox_regression", "classification"}``; eval:
    ``model(images) -> [{"boxes", "scores", "labels"}]`` (xyxy px of the input images).
    """

    def __init__(self, backbone: SSDBackbone, model_cfg: ModelConfig, fe_cfg: FEConfig, **kwargs: Any):
        size = model_cfg.size
        try:
            out = _meta_out(backbone, 3, size, backbone.dry_run_device)
        except RuntimeError as e:  # a window-built tail that cannot take the whole slice
            raise ValueError(f"model.train_crop={model_cfg.train_crop}: the network built for that window "
                             f"does not accept a {size}-px whole slice ({e})") from e
        shapes = [tuple(v.shape[1:]) for v in out.values()]
        ratios, scales = prior_spec(model_cfg.priors, len(shapes), [int(s[-1]) for s in shapes])
        anchors = PixelBoxGenerator(ratios, scales, size)
        channels = [int(s[0]) for s in shapes]
        n_anchors = anchors.num_anchors_per_location()
        if isinstance(backbone, MobileNetV3Backbone):
            norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
            head: nn.Module = SSDLiteHead(channels, n_anchors, NUM_CLASSES, norm)
        else:
            head = SSDHead(channels, n_anchors, NUM_CLASSES)
        if model_cfg.pretrained:
            mean, std = _VGG_CAFFE if model_cfg.backbone == "vgg16" else _IMAGENET
        else:
            mean, std = _MRI
        super().__init__(
            backbone, anchors, (size, size), NUM_CLASSES, image_mean=mean, image_std=std, head=head,
            score_thresh=model_cfg.score_thresh, nms_thresh=model_cfg.nms_thresh,
            detections_per_img=model_cfg.detections_per_img, **kwargs,
        )  # fmt: skip
        self.model_cfg, self.fe_cfg, self.size = model_cfg, fe_cfg, size
        self.train_crop = int(model_cfg.train_crop)
        self.feature_shapes: list[tuple[int, int, int]] = [(int(c), int(h), int(w)) for c, h, w in shapes]
        self.progress = 0.0
        self.train(self.training)

    @property
    def input_side(self) -> int:
        """Side (px) the transform resizes inputs to now: ``train_crop`` in training with windows, else ``size``."""
        return int(self.transform.fixed_size[0])  # type: ignore[index]

    def train(self, mode: bool = True) -> CMBDetector:
        """``nn.Module.train``; also switches the input side (windows ``train_crop`` vs whole slice ``size``)."""
        super().train(mode)
        side = self.train_crop if (mode and self.train_crop) else self.size
        self.transform.min_size, self.transform.max_size, self.transform.fixed_size = (side,), side, (side, side)
        return self

    def postprocess_detections(self, head_outputs: dict[str, Tensor], image_anchors: list[Tensor],
                               image_shapes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """torchvision's SSD post-processing, then ``model.max_box_mm``: detections whose longer side is above
        it are dropped (boxes here are in network pixels of ``240 / size`` mm)."""
        dets = super().postprocess_detections(head_outputs, image_anchors, image_shapes)
        limit = self.model_cfg.max_box_mm
        if limit > 0:
            mm_px = FOV_MM / self.size
            for d in dets:
                side = torch.maximum(d["boxes"][:, 2] - d["boxes"][:, 0], d["boxes"][:, 3] - d["boxes"][:, 1])
                keep = side * mm_px <= limit
                for k in ("boxes", "scores", "labels"):
                    d[k] = d[k][keep]
        return dets

    def set_progress(self, t: float) -> None:
        """Set the training fraction ``t`` in [0, 1] that drives the FE alpha schedule."""
        self.progress = min(max(float(t), 0.0), 1.0)

    @property
    def alpha(self) -> float:
        """Current FE strength (``fe.alpha`` under ``fe.schedule`` at ``progress``)."""
        return alpha_at(self.progress, self.fe_cfg.alpha, self.fe_cfg.schedule)

    def _fe_context(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> FEContext:
        """FE context for a batch: target boxes mapped to the resized input (as the transform does)."""
        boxes = [
            resize_boxes(t["boxes"].float(), list(img.shape[-2:]), [self.input_side, self.input_side])
            for img, t in zip(images, targets)
        ]
        mean, std = self.transform.image_mean[1], self.transform.image_std[1]
        return FEContext(boxes, self.alpha, self.fe_cfg.beta, self.fe_cfg.variant, mean, std)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        """SSD forward; FE on the first source iff training, ``fe.enabled`` and targets are given."""
        if not (self.training and self.fe_cfg.enabled and targets is not None):
            return super().forward(images, targets)
        self.backbone.fe_context = self._fe_context(images, targets)
        try:
            return super().forward(images, targets)
        finally:
            self.backbone.fe_context = None

    @torch.no_grad()
    def fe_maps(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """What FE does to a batch (eval-mode weights, no grad), for figures.

        Returns ``image`` (P, ``[B,1,S,S]`` resized centre channel in [0, 1]), ``mask_full`` (FE mask at
        S x S), ``mask`` (area-averaged to the first source), ``before`` / ``after`` (first head input
        ``[B,C,h,w]`` without / with FE at the current alpha).
        """
        was_training = self.training
        self.eval()
        try:
            batch, resized = self.transform(images, [dict(t) for t in targets])
            ctx = self._fe_context(images, targets)
            before = self.backbone(batch.tensors)["0"]
            self.backbone.fe_context = ctx
            after = self.backbone(batch.tensors)["0"]
        finally:
            self.backbone.fe_context = None
            self.train(was_training)
        p = (batch.tensors[:, 1:2] * ctx.std + ctx.mean).clamp(min=0)
        full = enhancement_mask(p, [t["boxes"] for t in resized], None, self.fe_cfg.beta)
        assert ctx.mask is not None
        return {"image": p, "mask_full": full, "mask": ctx.mask, "before": before, "after": after}

    def describe(self) -> dict[str, Any]:
        """Architecture record: backbone, size, priors, feature maps, anchor sizes (px and mm), params."""
        gen = self.anchor_generator
        mm_px = FOV_MM / self.size
        maps = []
        for k, ((c, h, w), n) in enumerate(zip(self.feature_shapes, gen.num_anchors_per_location())):
            wh = gen._wh_pairs[k].clamp(0, 1) * self.size
            maps.append({
                "size": [h, w], "channels": c, "step_px": round(self.size / w, 3), "anchors_per_location": n,
                "aspect_ratios": gen.aspect_ratios[k],
                "anchor_wh_px": [[round(float(a), 2), round(float(b), 2)] for a, b in wh],
                "anchor_wh_mm": [[round(float(a) * mm_px, 2), round(float(b) * mm_px, 2)] for a, b in wh],
            })  # fmt: skip
        cfg = self.model_cfg
        return {
            "backbone": cfg.backbone, "batch_norm": cfg.batch_norm, "size": self.size, "train_crop": self.train_crop, "width": cfg.width, "pretrained": cfg.pretrained,
            "input": cfg.input, "priors": cfg.priors, "mm_per_px": mm_px, "fov_mm": FOV_MM,
            "scales": [round(s, 5) for s in gen.scales], "feature_maps": maps,
            "num_anchors": sum(n * h * w for (_, h, w), n in zip(self.feature_shapes, gen.num_anchors_per_location())),
            "first_source": type(self.backbone).first_source,
            "image_mean": list(self.transform.image_mean), "image_std": list(self.transform.image_std),
            "params": sum(p.numel() for p in self.parameters()),
            "fe": {"enabled": self.fe_cfg.enabled, "placement": self.fe_cfg.placement, "variant": self.fe_cfg.variant,
                   "alpha": self.fe_cfg.alpha, "schedule": self.fe_cfg.schedule, "beta": self.fe_cfg.beta},
        }  # fmt: skip


def build_model(model_cfg: ModelConfig, fe_cfg: FEConfig) -> CMBDetector:
    """Build the detector for ``model_cfg`` (backbone, size >= 128 px, priors, width) with FE per ``fe_cfg``.

    ``pretrained=True`` loads ImageNet weights only from the local torch hub cache (``pretrained_path``)
    and requires ``width == 1.0``; a missing file raises ``FileNotFoundError`` naming the path.
    """
    check(model_cfg, "model")  # as config.load checks a file: ConfigError naming the key
    check(fe_cfg, "fe")
    crop = model_cfg.train_crop
    extra = {"batch_norm": model_cfg.batch_norm} if model_cfg.backbone == "vgg16" else {}
    backbone = BACKBONES[model_cfg.backbone](
        crop or model_cfg.size, model_cfg.width, model_cfg.pretrained, fe_cfg.placement, **extra
    )
    return CMBDetector(backbone, model_cfg, fe_cfg)


def load_checkpoint_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights saved by ``torch.save`` (a state dict, or a dict holding one under ``model``/``state_dict``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()}
    model.load_state_dict(state)
    return model

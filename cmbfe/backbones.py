"""SSD feature extractors: VGG-16, ResNet-34, MobileNetV3-Large; ``forward(x) -> OrderedDict`` of source maps.

``BACKBONES`` maps a name (the values of :data:`cmbfe.config.Backbone`) to its builder
``(size, width, pretrained, *, fe=None, maps=0)`` (VGG-16 also takes ``batch_norm``): ``size`` is the side
(px) of the input the tail is built for, ``width`` scales every channel count, ``pretrained`` loads ImageNet
weights (:func:`pretrained_path`), ``fe`` is the FE part (a disabled one when not given), ``maps`` > 0 keeps
only the first ``maps`` source maps: the deeper extra blocks are not built (nor computed); more maps than the
backbone has at ``size`` is a :class:`MapsError`.

Extras (VGG-16 and ResNet-34) follow one rule reproducing the SSD paper: 3x3 stride-2 convs while the map
is larger than 5, then 3x3 valid convs, and a final 4x4 pad-1 conv for a 2x2 map, down to 1x1:
VGG-16 gives 38, 19, 10, 5, 3, 1 at 300 and 64, 32, 16, 8, 4, 2, 1 at 512 (the SSD paper's SSD-512,
not torchvision's highres 64, 32, 16, 8, 6, 4, 1). Map sizes come from a dry run (:func:`meta_out`).

FE (:class:`cmbfe.fe.FeatureEnhancement`, ``backbone.fe``) is called on the first source (conv4_3-like,
stride 8; MobileNet: stride 16): ``post_l2norm`` enhances the source after its L2Norm (only the head sees
FE); ``pre_l2norm`` enhances inline before the L2Norm, so the enhanced map feeds the L2Norm *and* the
deeper layers (as the paper's inline layer would; the L2Norm then cancels the per-pixel FE scale for the
conv4_3 head). Unbound, FE is the identity: the backbone is the plain network.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import MobileNet_V3_Large_Weights, ResNet34_Weights, VGG16_Weights, vgg
from torchvision.models.mobilenetv3 import mobilenet_v3_large
from torchvision.models.resnet import BasicBlock, conv1x1
from torchvision.ops import Conv2dNormActivation

from cmbfe.config import Backbone
from cmbfe.fe import FeatureEnhancement

_PRETRAINED = {
    "vgg16": VGG16_Weights.IMAGENET1K_FEATURES,
    "resnet34": ResNet34_Weights.IMAGENET1K_V1,
    "mobilenet_v3": MobileNet_V3_Large_Weights.IMAGENET1K_V1,
}


# ------------------------------------------------------------------------------------------------------
# Vendored from torchvision 0.29.1 (the release the Makefile installs): the private helpers ``_xavier_init``
# (models/detection/ssd.py), ``_normal_init`` and ``_extra_block`` (models/detection/ssdlite.py), so that
# cmbfe uses no private torchvision name whatever torchvision >= 0.19 is installed. Same initialisation
# calls in the same order (same RNG draws); tests/test_models.py pins the resulting feature maps.
def xavier_init(module: nn.Module) -> None:
    """Xavier-uniform weights, zero biases for each ``Conv2d`` (torchvision ``_xavier_init``)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            torch.nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                torch.nn.init.constant_(layer.bias, 0.0)


def normal_init(module: nn.Module) -> None:
    """N(0, 0.03) weights, zero biases for each ``Conv2d`` (torchvision ``_normal_init``)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            torch.nn.init.normal_(layer.weight, mean=0.0, std=0.03)
            if layer.bias is not None:
                torch.nn.init.constant_(layer.bias, 0.0)


def ssdlite_extra_block(in_channels: int, out_channels: int, norm_layer: Callable[..., nn.Module]
                        ) -> nn.Sequential:
    """SSDlite extra block (torchvision ``_extra_block``): 1x1 to half the channels, 3x3 depthwise stride 2,
    1x1 to ``out_channels``; each with ``norm_layer`` and ReLU6."""
    mid = out_channels // 2
    act = nn.ReLU6
    return nn.Sequential(
        Conv2dNormActivation(in_channels, mid, kernel_size=1, norm_layer=norm_layer, activation_layer=act),
        Conv2dNormActivation(mid, mid, kernel_size=3, stride=2, groups=mid, norm_layer=norm_layer,
                             activation_layer=act),
        Conv2dNormActivation(mid, out_channels, kernel_size=1, norm_layer=norm_layer, activation_layer=act),
    )
# ------------------------------------------------------------------------------------------------------


def _ch(channels: int, width: float) -> int:
    """Channel count scaled by the width multiplier (at least 8)."""
    return max(8, round(channels * width))


def pretrained_path(backbone: str) -> Path:
    """Where ImageNet weights for ``backbone`` must lie: ``torch.hub.get_dir()/checkpoints/<file name>``."""
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


@torch.no_grad()
def meta_out(module: nn.Module, channels: int, size: int, device: str = "meta") -> Any:
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


class SSDBackbone(nn.Module):
    """Base of the feature extractors: ``forward(x) -> OrderedDict[str, Tensor]`` of SSD sources.

    ``fe`` is the FE part called on the first source (where its ``placement`` says); a disabled one when
    not given. ``name`` is the key in :data:`BACKBONES`.
    """

    name = ""
    first_source = "first source"
    dry_run_device = "meta"

    def __init__(self, fe: FeatureEnhancement | None = None):
        super().__init__()
        self.fe = fe if fe is not None else FeatureEnhancement()

    def _first_source(self, x: Tensor, inp: Tensor, scale: Tensor | None) -> tuple[Tensor, Tensor]:
        """(head input, tensor continuing into deeper layers) for the conv4_3-like map ``x``."""
        if self.fe.placement == "pre_l2norm":
            x = self.fe(x, inp)
        src = x if scale is None else scale.view(1, -1, 1, 1) * F.normalize(x)
        if self.fe.placement == "post_l2norm":
            src = self.fe(src, inp)
        return src, x


class MapsError(ValueError):
    """A backbone was asked for more source maps than it has at its input side."""


def _limit(maps: int, fixed: int) -> int | None:
    """How many extra blocks ``maps`` source maps need beyond the ``fixed`` ones (None: all of them)."""
    if maps and maps < fixed:
        raise MapsError(f"maps={maps}: fewer than the {fixed} maps before the extra blocks")
    return maps - fixed if maps else None


def _check_maps(name: str, size: int, maps: int, fixed: int, extra: nn.ModuleList) -> None:
    """:class:`MapsError` when ``maps`` > 0 asks for more source maps than were built."""
    if maps and fixed + len(extra) < maps:
        raise MapsError(f"maps={maps}: {name} built for {size} px has only {fixed + len(extra)} source maps")


def _ssd_extras(in_ch: int, fmap: int, width: float, limit: int | None = None) -> nn.ModuleList:
    """SSD extra layers from a ``fmap x fmap`` map down to 1x1 (rule in the module docstring); at most
    ``limit`` blocks (None: all)."""
    blocks, i = nn.ModuleList(), 0
    while fmap > 1 and (limit is None or len(blocks) < limit):
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
    xavier_init(blocks)
    return blocks


class VGG16Backbone(SSDBackbone):
    """VGG-16 SSD extractor (torchvision layout): conv4_3 + L2Norm (scale 20), fc6/fc7 (dilated), extras."""

    name = "vgg16"
    first_source = "conv4_3 (stride 8) after L2Norm"

    def __init__(self, size: int, width: float, pretrained: bool, *, fe: FeatureEnhancement | None = None,
                 batch_norm: bool = False, maps: int = 0):
        super().__init__(fe)
        limit = _limit(maps, 2)  # conv4_3 and fc7 come before the extras
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
        xavier_init(fc)
        fc7 = nn.Sequential(self.features, *trunk[pools[3] : -1], fc)
        self.extra = nn.ModuleList([nn.Sequential(*trunk[pools[3] : -1], fc)])
        self.extra.extend(_ssd_extras(c7, int(meta_out(fc7, 3, size).shape[-1]), width, limit))
        _check_maps(self.name, size, maps, 1, self.extra)  # extra[0] is fc7

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

    name = "resnet34"
    first_source = "layer2 (stride 8) after L2Norm"

    def __init__(self, size: int, width: float, pretrained: bool, *, fe: FeatureEnhancement | None = None,
                 maps: int = 0):
        super().__init__(fe)
        limit = _limit(maps, 3)  # layer2, layer3 and layer4 come before the extras
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
        self.extra = _ssd_extras(planes[3], int(meta_out(trunk, 3, size).shape[-1]), width, limit)
        _check_maps(self.name, size, maps, 3, self.extra)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        inp = x
        x = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        src, x = self._first_source(self.layer2(x), inp, self.scale_weight)
        out = [src]
        for block in (self.layer3, self.layer4, *self.extra):
            x = block(x)
            out.append(x)
        return OrderedDict((str(i), v) for i, v in enumerate(out))


def _last_stride2_block(blocks: nn.Sequential) -> int:
    """Index of the last inverted-residual block whose depthwise conv has stride 2 (torchvision's SSDlite
    ``C4`` position, there found through the private flag ``_is_cn``; identical without dilation)."""
    def strided(b: nn.Module) -> bool:
        dw = [m for m in b.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
        return bool(dw) and dw[0].stride[0] > 1

    return [i for i, b in enumerate(blocks) if strided(b)][-1]


class MobileNetV3Backbone(SSDBackbone):
    """SSDlite extractor on torchvision's MobileNetV3-Large (as ``ssdlite320_mobilenet_v3_large``).

    Sources: the C4 expansion layer (stride 16; 20x20 at 320; no L2Norm: ``post_l2norm`` enhances only
    the head branch, ``pre_l2norm`` inline), the last backbone conv (stride 32), then SSDlite extra blocks
    (stride 2) down to 1x1. Reduced tail when not pretrained, as torchvision does. As torchvision's SSDlite,
    training needs batches of >= 2 images (BatchNorm on the 1x1 extra map).
    """

    name = "mobilenet_v3"
    first_source = "C4 expansion (stride 16)"
    dry_run_device = "cpu"

    def __init__(self, size: int, width: float, pretrained: bool, *, fe: FeatureEnhancement | None = None,
                 maps: int = 0):
        super().__init__(fe)
        limit = _limit(maps, 2)  # C4 expansion and the last backbone conv come before the extras
        norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
        net = mobilenet_v3_large(width_mult=width, reduced_tail=not pretrained, norm_layer=norm)
        if pretrained:
            net.load_state_dict(_imagenet_state("mobilenet_v3"))
        else:
            normal_init(net)
        bb = net.features
        c4 = _last_stride2_block(bb)
        self.features = nn.Sequential(
            nn.Sequential(*bb[:c4], bb[c4].block[0]),  # until the C4 expansion layer
            nn.Sequential(bb[c4].block[1:], *bb[c4 + 1 :]),  # C4 depthwise until the end
        )
        fmap = int(meta_out(self.features, 3, size, "cpu").shape[-1])
        depth = [max(16, int(d * width)) for d in (512, 256, 256, 128)]
        in_ch, blocks = bb[-1].out_channels, nn.ModuleList()
        while fmap > 1 and (limit is None or len(blocks) < limit):
            out = depth[min(len(blocks), len(depth) - 1)]
            blocks.append(ssdlite_extra_block(in_ch, out, norm))
            in_ch, fmap = out, (fmap + 1) // 2
        normal_init(blocks)
        self.extra = blocks
        _check_maps(self.name, size, maps, 2, self.extra)

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

"""The CMB detector: torchvision's ``SSD`` assembled from parts, as torchvision builds its own SSDs.

Parts: a backbone (:mod:`cmbfe.backbones`, ``BACKBONES``: name -> builder) whose first source calls the FE
part (:class:`cmbfe.fe.FeatureEnhancement`, ``model.fe``), the default boxes (:mod:`cmbfe.priors`) and an
``SSDHead`` (``SSDLiteHead`` for MobileNet). :class:`CMBDetector` takes them and documented keywords
(``score_thresh``, ``nms_thresh``, ``detections_per_img``, ``max_box_mm`` ...) and never reads a
configuration; :func:`build_model` is the one place where the ``model`` and ``fe`` config sections become
those parts and keywords.

Conventions: the model receives 3-channel float images in [0, 1] (``gray3``: one slice replicated;
``2.5d``: slices z-1, z, z+1), of any size; SSD's transform normalises them with ``image_mean/std``
and resizes them to ``size x size``. Targets and detections are ``xyxy`` boxes in pixels of the
image passed in (detections are mapped back to that frame by torchvision's postprocess). Two classes:
0 background, 1 cmb. The network input spans the 240 mm FOV (:data:`cmbfe.priors.FOV_MM`).

Training windows (``train_crop`` > 0): the data pipeline cuts square windows of ``train_crop * W / size``
slice pixels, the transform resizes them to ``train_crop`` px in training mode (same pixel scale as a whole
slice at ``size``) and default boxes are fixed in network pixels (:class:`cmbfe.priors.PixelBoxGenerator`),
so a prior is the same box on a window and on a whole slice. The extras are built for the window side and
also accept the whole slice; ``eval()`` switches back to ``size``. This is how the CPU profile trains
SSD-512 at the cost of SSD-256 per image.

FE runs only when ``model.training and model.fe.enabled and targets is not None``; in eval the network is
the plain SSD.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.ssd import SSD, SSDHead
from torchvision.models.detection.ssdlite import SSDLiteHead
from torchvision.models.detection.transform import resize_boxes

from cmbfe.backbones import BACKBONES, MapsError, MobileNetV3Backbone, SSDBackbone, meta_out
from cmbfe.config import FEConfig, ModelConfig, check
from cmbfe.errors import ConfigError
from cmbfe.fe import MASK_HEAD, FeatureEnhancement, enhancement_mask
from cmbfe.priors import FOV_MM, PixelBoxGenerator, prior_spec

NUM_CLASSES = 2  # background, cmb
_IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
_VGG_CAFFE = ([0.48235, 0.45882, 0.40784], [1.0 / 255.0] * 3)  # torchvision ssd300_vgg16 (amdegroot weights)
_MRI = ([0.5] * 3, [0.25] * 3)  # [0, 1] MRI slices -> about [-2, 2]
MASK_HEAD_KEYS = f"backbone.fe.{MASK_HEAD}."  # the mask arm's training-only weights in a state dict


def split_losses(losses: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``(total, bbox, cls)`` from the model's loss dict (keys containing bbox/reg/loc vs cls/class/conf)."""
    total = sum(losses.values())
    zero = total.detach() * 0
    bbox = sum((v.detach() for k, v in losses.items() if any(s in k for s in ("bbox", "reg", "loc"))), zero)
    cls = sum((v.detach() for k, v in losses.items() if any(s in k for s in ("cls", "class", "conf"))), zero)
    return total, bbox, cls


class CMBDetector(SSD):
    """torchvision ``SSD`` (2 classes) whose backbone's first source is enhanced by FE during training.

    Train: ``model(images, targets) -> {"bbox_regression", "classification"}``; eval:
    ``model(images) -> [{"boxes", "scores", "labels"}]`` (xyxy px of the input images).

    Arguments: ``backbone`` (its ``fe`` is the FE part), ``anchor_generator``, ``size`` (whole-slice input
    side, px), ``head``; ``image_mean``/``image_std`` (input normalisation); ``score_thresh``, ``nms_thresh``,
    ``detections_per_img`` (torchvision's post-processing) and ``max_box_mm`` (then drop detections whose
    longer side exceeds it, mm; 0: keep all); ``train_crop`` (training-window side in network px, 0: whole
    slices); ``feature_shapes`` (``(C, H, W)`` of each source at ``size``); ``spec`` (names and flags the
    parts were built from, reported by :meth:`describe`).
    """

    def __init__(
        self,
        backbone: SSDBackbone,
        anchor_generator: PixelBoxGenerator,
        size: int,
        head: nn.Module,
        *,
        image_mean: list[float],
        image_std: list[float],
        feature_shapes: list[tuple[int, int, int]],
        score_thresh: float = 0.01,
        nms_thresh: float = 0.45,
        detections_per_img: int = 100,
        max_box_mm: float = 0.0,
        train_crop: int = 0,
        spec: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        super().__init__(
            backbone, anchor_generator, (size, size), NUM_CLASSES, image_mean=image_mean, image_std=image_std,
            head=head, score_thresh=score_thresh, nms_thresh=nms_thresh,
            detections_per_img=detections_per_img, **kwargs,
        )  # fmt: skip
        self.size, self.train_crop, self.max_box_mm = int(size), int(train_crop), float(max_box_mm)
        self.feature_shapes = [(int(c), int(h), int(w)) for c, h, w in feature_shapes]
        self.spec = dict(spec or {})
        self.train(self.training)

    @property
    def fe(self) -> FeatureEnhancement:
        """The FE part (the backbone's): ``model.fe.enabled`` is the switch, ``model.fe.set_progress(t)``
        drives its alpha schedule."""
        return self.backbone.fe

    @property
    def input_side(self) -> int:
        """Side (px) the transform resizes inputs to now: ``train_crop`` when training on windows, else
        ``size``."""
        return int(self.transform.fixed_size[0])  # type: ignore[index]

    def train(self, mode: bool = True) -> CMBDetector:
        """``nn.Module.train``; also switches the input side (windows ``train_crop`` vs whole slices
        ``size``)."""
        super().train(mode)
        side = self.train_crop if (mode and self.train_crop) else self.size
        tf = self.transform
        tf.min_size, tf.max_size, tf.fixed_size = (side,), side, (side, side)
        return self

    def postprocess_detections(self, head_outputs: dict[str, Tensor], image_anchors: list[Tensor],
                               image_shapes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """torchvision's SSD post-processing, then ``max_box_mm``: detections whose longer side is above it
        are dropped (boxes here are in network pixels of ``240 / size`` mm)."""
        dets = super().postprocess_detections(head_outputs, image_anchors, image_shapes)
        if self.max_box_mm > 0:
            mm_px = FOV_MM / self.size
            for d in dets:
                side = torch.maximum(d["boxes"][:, 2] - d["boxes"][:, 0], d["boxes"][:, 3] - d["boxes"][:, 1])
                keep = side * mm_px <= self.max_box_mm
                for k in ("boxes", "scores", "labels"):
                    d[k] = d[k][keep]
        return dets

    def _fe_boxes(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> list[Tensor]:
        """Target boxes mapped to the resized network input (as the transform maps them)."""
        return [
            resize_boxes(t["boxes"].float(), list(img.shape[-2:]), [self.input_side, self.input_side])
            for img, t in zip(images, targets)
        ]

    def _centre_norm(self) -> tuple[float, float]:
        """(mean, std) of the input normalisation of the centre channel (FE de-normalises it)."""
        return self.transform.image_mean[1], self.transform.image_std[1]

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        """SSD forward; FE on the first source iff training, ``fe.active`` (FE on or the mask arm's head) and
        targets are given. The mask arm adds ``mask_bce`` (BCE x ``fe.mask_loss_weight``) to the losses; in
        eval neither FE nor the mask head runs and the targets are never read for the detections."""
        if not (self.training and self.fe.active and targets is not None):
            return super().forward(images, targets)
        with self.fe.bound(self._fe_boxes(images, targets), *self._centre_norm()) as ctx:
            losses = super().forward(images, targets)
        if ctx.aux_loss is not None:
            losses = {**losses, "mask_bce": self.fe.mask_loss_weight * ctx.aux_loss}
        return losses

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; a detector without the mask arm's head drops its weights
        (``backbone.fe.mask_head.*``, training-only), so a mask-arm state dict loads for inference into the
        plain detector of the same ``model`` section."""
        if self.fe.mask_head is None:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(MASK_HEAD_KEYS)}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.no_grad()
    def fe_maps(self, images: list[Tensor], targets: list[dict[str, Tensor]], *, windows: bool = False
                ) -> dict[str, Tensor]:
        """What FE does to a batch (eval-mode weights, no grad), for figures.

        ``windows``: the images are training windows (``model.train_crop`` > 0), resized to ``train_crop``
        as training resizes them; else whole slices, resized to ``size``. Both keep the training pixel scale
        (``size / W`` network px per slice px); a window resized to ``size`` would be magnified
        ``size / train_crop`` times more than in training.

        Returns ``image`` (P, ``[B,1,S,S]`` resized centre channel in [0, 1]), ``mask_full`` (FE mask at
        S x S), ``mask`` (area-averaged to the first source), ``before`` / ``after`` (first head input
        ``[B,C,h,w]`` without / with FE at the current alpha).
        """
        was_training = self.training
        self.eval()
        if windows and self.train_crop:
            tf = self.transform
            side = self.train_crop
            tf.min_size, tf.max_size, tf.fixed_size = (side,), side, (side, side)
        try:
            batch, resized = self.transform(images, [dict(t) for t in targets])
            mean, std = self._centre_norm()
            boxes = self._fe_boxes(images, targets)
            before = self.backbone(batch.tensors)["0"]
            enabled, self.fe.enabled = self.fe.enabled, True  # the maps of the reading, whatever the switch
            try:
                with self.fe.bound(boxes, mean, std) as ctx:
                    after = self.backbone(batch.tensors)["0"]
            finally:
                self.fe.enabled = enabled
        finally:
            self.train(was_training)
        p = (batch.tensors[:, 1:2] * std + mean).clamp(min=0)
        full = enhancement_mask(p, [t["boxes"] for t in resized], None, self.fe.beta)
        assert ctx.mask is not None
        return {"image": p, "mask_full": full, "mask": ctx.mask, "before": before, "after": after}

    def describe(self) -> dict[str, Any]:
        """Architecture record: backbone, size, priors, feature maps, anchor sizes (px and mm), params, FE."""
        gen, spec = self.anchor_generator, self.spec
        mm_px = FOV_MM / self.size
        per_loc = gen.num_anchors_per_location()
        maps = []
        for k, ((c, h, w), n) in enumerate(zip(self.feature_shapes, per_loc)):
            wh = gen.wh_pairs[k].clamp(0, 1) * self.size
            maps.append({
                "size": [h, w], "channels": c, "step_px": round(self.size / w, 3), "anchors_per_location": n,
                "aspect_ratios": gen.aspect_ratios[k],
                "anchor_wh_px": [[round(float(a), 2), round(float(b), 2)] for a, b in wh],
                "anchor_wh_mm": [[round(float(a) * mm_px, 2), round(float(b) * mm_px, 2)] for a, b in wh],
            })  # fmt: skip
        return {
            "backbone": spec.get("backbone", type(self.backbone).name), "batch_norm": spec.get("batch_norm"),
            "size": self.size, "train_crop": self.train_crop, "width": spec.get("width"),
            "pretrained": spec.get("pretrained"), "input": spec.get("input"), "priors": spec.get("priors"),
            "heads": spec.get("heads", 0), "mm_per_px": mm_px, "fov_mm": FOV_MM,
            "scales": [round(s, 5) for s in gen.scales],
            "feature_maps": maps,
            "num_anchors": sum(n * h * w for (_, h, w), n in zip(self.feature_shapes, per_loc)),
            "first_source": type(self.backbone).first_source,
            "image_mean": list(self.transform.image_mean), "image_std": list(self.transform.image_std),
            "params": sum(p.numel() for p in self.parameters()), "fe": self.fe.describe(),
        }  # fmt: skip


def build_model(model_cfg: ModelConfig, fe_cfg: FEConfig) -> CMBDetector:
    """Build the detector for ``model_cfg`` (backbone, size >= 128 px, priors, width, ``heads``: the number of
    source maps, 0 all) with FE per ``fe_cfg``: the one place where configuration becomes parts and keywords.

    Both sections are validated as :func:`cmbfe.config.load` validates a file (a ``ConfigError`` naming the
    key). ``pretrained=True`` loads ImageNet weights from the torch hub cache (``pretrained_path``) and
    requires ``width == 1.0``; a missing file that cannot be downloaded raises ``FileNotFoundError``.
    """
    check(model_cfg, "model")
    check(fe_cfg, "fe")
    mc, size = model_cfg, model_cfg.size
    fe = FeatureEnhancement(enabled=fe_cfg.enabled, placement=fe_cfg.placement, variant=fe_cfg.variant,
                            alpha=fe_cfg.alpha, schedule=fe_cfg.schedule, beta=fe_cfg.beta, sham=fe_cfg.sham,
                            mask_loss_weight=fe_cfg.mask_loss_weight)
    extra = {"batch_norm": mc.batch_norm} if mc.backbone == "vgg16" else {}
    try:
        backbone = BACKBONES[mc.backbone](mc.train_crop or size, mc.width, mc.pretrained, fe=fe,
                                          maps=mc.heads, **extra)
    except MapsError as e:
        raise ConfigError(f"model.heads: expected at most the backbone's source maps ({e})") from None
    try:
        out = meta_out(backbone, 3, size, backbone.dry_run_device)
    except RuntimeError as e:  # a window-built tail that cannot take the whole slice
        raise ValueError(f"model.train_crop={mc.train_crop}: the network built for that window "
                         f"does not accept a {size}-px whole slice ({e})") from e
    shapes = [(int(v.shape[1]), int(v.shape[2]), int(v.shape[3])) for v in out.values()]
    ratios, scales = prior_spec(mc.priors, len(shapes), [s[-1] for s in shapes])
    anchors = PixelBoxGenerator(ratios, scales, size)
    channels, n_anchors = [s[0] for s in shapes], anchors.num_anchors_per_location()
    if isinstance(backbone, MobileNetV3Backbone):
        norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
        head: nn.Module = SSDLiteHead(channels, n_anchors, NUM_CLASSES, norm)
    else:
        head = SSDHead(channels, n_anchors, NUM_CLASSES)
    if fe_cfg.mask_loss_weight > 0:  # the mask arm: zero-initialised, training-only (FeatureEnhancement)
        fe.attach_mask_head(channels[0])
    if mc.pretrained:
        mean, std = _VGG_CAFFE if mc.backbone == "vgg16" else _IMAGENET
    else:
        mean, std = _MRI
    spec = {"backbone": mc.backbone, "batch_norm": mc.batch_norm, "width": mc.width,
            "pretrained": mc.pretrained, "input": mc.input, "priors": mc.priors, "heads": mc.heads}
    return CMBDetector(
        backbone, anchors, size, head, image_mean=mean, image_std=std, feature_shapes=shapes,
        score_thresh=mc.score_thresh, nms_thresh=mc.nms_thresh, detections_per_img=mc.detections_per_img,
        max_box_mm=mc.max_box_mm, train_crop=mc.train_crop, spec=spec,
    )  # fmt: skip


def load_checkpoint_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights saved by ``torch.save`` (a state dict, or a dict holding one under ``model`` or
    ``state_dict``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()}
    model.load_state_dict(state)
    return model

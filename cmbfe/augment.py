"""Online box-aware augmentation of training slices (Li et al. 2021, section 2.2).

The policy, applied in this order, each step independently with its probability from
:class:`cmbfe.config.AugmentConfig`:

1. vertical flip (``vflip``), horizontal flip (``hflip``);
2. intensity: image x U[``intensity``] (paper: [1.2, 1.5]), clamped to [0, 1] (``p_intensity``);
3. Gaussian blur, sigma ~ U[``blur_sigma``] (paper: [0, 3]) px, kernel size ``2*ceil(3*sigma)+1``;
   sigma < 0.1 px is the identity (``p_blur``);
4. affine (``p_affine``): rotation U[-``rotate_deg``, +``rotate_deg``] degrees, translation up to
   ``translate_px`` pixels along each axis (passed to torchvision as that fraction of the image size),
   isotropic scale U[``scale``] (paper: [0.8, 0.95]), bilinear interpolation, zero fill.

Boxes are ``xyxy`` in continuous pixel coordinates (``tv_tensors.BoundingBoxes``, format XYXY). They follow
the geometry; a rotated box becomes the axis-aligned box of its rotated corners. After the affine step boxes
are clipped to the image (``ClampBoundingBoxes``) and boxes narrower/shorter than 1 px or with area < 1 px^2
are dropped together with their labels (``SanitizeBoundingBoxes``). Images with no boxes pass through.

Randomness: every step draws from torch's global CPU generator. Pass ``seed=`` to :meth:`Augment.__call__`
to make one call reproducible independently of any other state (the generator is forked, seeded, and
restored afterwards). :class:`cmbfe.data.SliceDataset` does this with a seed derived from
``(train.seed, position of the draw in the sampler stream)``, so the augmented training stream is the same
whatever the number of DataLoader workers, and it is reproduced exactly on ``--resume``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from cmbfe.config import AugmentConfig

Sample = dict[str, Tensor]


def blur_kernel_size(sigma: float) -> int:
    """Odd Gaussian kernel size covering +-3 sigma (sigma in pixels)."""
    return 2 * math.ceil(3.0 * sigma) + 1


def _uniform(lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * torch.rand(()).item())


class Augment:
    """Callable ``(image [C,H,W] float in [0,1], boxes [N,4] xyxy px) -> (image, boxes)``.

    ``apply(image, boxes, labels)`` also returns the labels of the boxes that were kept.
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg
        self._vflip = v2.RandomVerticalFlip(p=cfg.vflip)
        self._hflip = v2.RandomHorizontalFlip(p=cfg.hflip)
        self._clamp = v2.ClampBoundingBoxes()
        self._sanitize = v2.SanitizeBoundingBoxes(min_size=1.0, min_area=1.0, labels_getter="default")
        self._affines: dict[tuple[int, int], v2.RandomAffine] = {}

    # -- steps ------------------------------------------------------------------------------------------
    def _affine(self, h: int, w: int) -> v2.RandomAffine:
        """RandomAffine whose translation bound is ``translate_px`` pixels for an ``h x w`` image."""
        if (h, w) not in self._affines:
            c = self.cfg
            self._affines[(h, w)] = v2.RandomAffine(
                degrees=c.rotate_deg,
                translate=(min(c.translate_px / w, 1.0), min(c.translate_px / h, 1.0)),
                scale=c.scale,
                interpolation=InterpolationMode.BILINEAR,
                fill=0.0,
            )
        return self._affines[(h, w)]

    def _intensity(self, image: Tensor) -> Tensor:
        factor = _uniform(*self.cfg.intensity)
        return tv_tensors.wrap((image * factor).clamp_(0.0, 1.0), like=image)

    def _blur(self, image: Tensor) -> Tensor:
        sigma = _uniform(*self.cfg.blur_sigma)
        if sigma < 0.1:
            return image
        h, w = image.shape[-2:]
        k = blur_kernel_size(sigma)
        # reflect padding needs kernel//2 < image side; cap the kernel for tiny images
        k = min(k, 2 * ((min(h, w) - 1) // 2) + 1)
        if k < 3:
            return image
        return F.gaussian_blur(image, kernel_size=[k, k], sigma=[sigma, sigma])

    def _hit(self, p: float) -> bool:
        return p > 0 and bool(torch.rand(()).item() < p)

    # -- public -----------------------------------------------------------------------------------------
    def apply(self, image: Tensor, boxes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Augment one slice; returns ``(image, boxes, labels)`` with degenerate boxes removed.

        ``image``: [C,H,W] float in [0,1]; ``boxes``: [N,4] float xyxy pixels (N may be 0); ``labels``: [N].
        """
        if boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"boxes must have shape [N, 4], got {tuple(boxes.shape)}")
        if labels.shape[0] != boxes.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {boxes.shape[0]} boxes")
        if not self.cfg.enabled:
            return image, boxes, labels
        h, w = image.shape[-2:]
        s: Sample = {
            "image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(boxes.float(), format="XYXY", canvas_size=(h, w)),
            "labels": labels,
        }
        s = self._vflip(s)
        s = self._hflip(s)
        if self._hit(self.cfg.p_intensity):
            s["image"] = self._intensity(s["image"])
        if self._hit(self.cfg.p_blur):
            s["image"] = self._blur(s["image"])
        if self._hit(self.cfg.p_affine):
            # only the affine step changes box size; flips are exact up to float rounding, and a 1-px box
            # must not be dropped because w - x0 - (w - x2) rounded to 0.99999
            s = self._sanitize(self._clamp(self._affine(h, w)(s)))
        return (
            s["image"].as_subclass(Tensor),
            s["boxes"].as_subclass(Tensor).reshape(-1, 4),
            s["labels"],
        )

    def __call__(self, image: Tensor, boxes: Tensor, *, seed: int | None = None) -> tuple[Tensor, Tensor]:
        """Augment ``image`` [C,H,W] and ``boxes`` [N,4] xyxy px; ``seed`` makes the call reproducible."""
        labels = torch.ones(boxes.shape[0], dtype=torch.int64)
        image, boxes, _ = self.seeded_apply(image, boxes, labels, seed=seed)
        return image, boxes

    def seeded_apply(
        self, image: Tensor, boxes: Tensor, labels: Tensor, *, seed: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`apply` under ``torch.manual_seed(seed)`` in a forked CPU RNG (``None``: global RNG)."""
        if seed is None:
            return self.apply(image, boxes, labels)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return self.apply(image, boxes, labels)


def random_window(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    side: int,
    generator: torch.Generator,
    p_positive: float = 0.75,
) -> tuple[Tensor, Tensor, Tensor]:
    """A random ``side x side`` window of ``image`` [C,H,W] with the boxes (xyxy px) whose centre it holds.

    With probability ``p_positive`` (and at least one box) the window is placed uniformly among the
    positions that hold one randomly chosen box whole, so that most windows contain a CMB; otherwise it is
    placed uniformly over the image. Kept boxes are shifted into the window and clipped to it; labels
    follow. Images not larger than ``side`` are returned unchanged. Randomness comes from ``generator``.
    """
    h, w = image.shape[-2:]
    if side <= 0 or (h <= side and w <= side):
        return image, boxes, labels
    sh, sw = min(side, h), min(side, w)

    def pick(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=generator).item()) if hi > lo else lo

    if len(boxes) and float(torch.rand((), generator=generator)) < p_positive:
        b = boxes[int(torch.randint(len(boxes), (1,), generator=generator).item())]
        x0 = pick(max(0, math.ceil(float(b[2])) - sw), max(0, min(w - sw, math.floor(float(b[0])))))
        y0 = pick(max(0, math.ceil(float(b[3])) - sh), max(0, min(h - sh, math.floor(float(b[1])))))
    else:
        x0, y0 = pick(0, w - sw), pick(0, h - sh)
    x0, y0 = min(x0, w - sw), min(y0, h - sh)
    window = image[..., y0 : y0 + sh, x0 : x0 + sw]
    if not len(boxes):
        return window, boxes.reshape(-1, 4), labels
    shifted = boxes - torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
    cx, cy = (shifted[:, 0] + shifted[:, 2]) / 2, (shifted[:, 1] + shifted[:, 3]) / 2
    keep = (cx >= 0) & (cx < sw) & (cy >= 0) & (cy < sh)
    kept = shifted[keep]
    kept[:, 0::2] = kept[:, 0::2].clamp(0, sw)
    kept[:, 1::2] = kept[:, 1::2].clamp(0, sh)
    return window, kept.reshape(-1, 4), labels[keep]


def build_augment(cfg: AugmentConfig) -> Callable[..., tuple[Tensor, Tensor]]:
    """The paper's augmentation policy as a callable ``(image, boxes, *, seed=None) -> (image, boxes)``.

    ``image`` is a [C,H,W] float tensor in [0,1]; ``boxes`` a [N,4] float tensor, xyxy pixels. The returned
    object is an :class:`Augment`; its ``apply``/``seeded_apply`` methods also carry labels.
    """
    return Augment(cfg)

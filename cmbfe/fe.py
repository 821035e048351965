"""Feature enhancement (FE) by reusing ground truth (Li et al. 2021): pure tensor functions and the FE part.

The maths (:func:`enhancement_mask`, :func:`apply_fe`, :func:`alpha_at`) are pure functions; the detector's
part is :class:`FeatureEnhancement`, a parameter-free ``nn.Module`` with an on/off switch (``enabled``) that
the backbone calls on its first source (see :mod:`cmbfe.models`).

Conventions
-----------
* Images ``P`` are ``[B, 1, H, W]`` un-normalised intensities (>= 0), e.g. the centre channel of the
  resized network input in [0, 1]. FE is a ratio ``P / mean(P)``, so the intensity unit cancels.
* Boxes are ``xyxy`` in continuous pixel coordinates of ``P`` (pixel ``(row j, col i)`` covers
  ``[i, i+1) x [j, j+1)``). A pixel belongs to a box when its centre ``(i + 0.5, j + 0.5)`` lies in
  ``[x0, x1) x [y0, y1)``. A box that contains no pixel centre along an axis (narrower than a pixel)
  covers, along that axis, the one pixel containing the box centre. Boxes are clipped to the image.
* Mask, per box ``b``: ``B_mean(b) = beta * mean(P over b)``; inside ``b`` the value is
  ``1 - P / B_mean(b)`` where ``P <= B_mean(b)`` and 0 where ``P > B_mean(b)`` (i.e.
  ``max(0, 1 - P / B_mean)``, in [0, 1]; a box whose pixels are all 0 gives 0). Outside every box
  the mask is 0; overlapping boxes take the maximum. The mask never carries gradients.
* Resizing to a feature map is area averaging (``adaptive_avg_pool2d``, i.e. ``interpolate(mode="area")``):
  output cell ``(r, c)`` of an ``h x w`` map is the mean over input rows
  ``floor(r H / h) .. ceil((r + 1) H / h) - 1`` and the analogous columns.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmbfe.config import FESchedule, FEVariant

SCHEDULES: tuple[str, ...] = get_args(FESchedule)
VARIANTS: tuple[str, ...] = get_args(FEVariant)
_PATCH_BUDGET = 1 << 22  # elements gathered at once (boxes x padded box area)


def box_pixel_ranges(boxes: Tensor, height: int, width: int) -> Tensor:
    """Integer pixel ranges ``[c0, c1) x [r0, r1)`` covered by xyxy pixel boxes; ``[N, 4]`` int64.

    Rule: pixel centres inside ``[x0, x1) x [y0, y1)``; an axis with no centre inside falls back to
    the pixel containing the box centre; the result is clipped to the image (may become empty).
    """
    b = boxes.detach().to(torch.float64)
    lo = torch.ceil(b[:, :2] - 0.5)  # first pixel whose centre is >= x0
    hi = torch.ceil(b[:, 2:] - 0.5)  # one past the last pixel whose centre is < x1
    centre_px = torch.floor((b[:, :2] + b[:, 2:]) / 2)
    thin = hi <= lo
    lo = torch.where(thin, centre_px, lo)
    hi = torch.where(thin, centre_px + 1, hi)
    lim = torch.tensor([width, height], dtype=torch.float64, device=b.device)
    lo = torch.minimum(torch.clamp(lo, min=0), lim)
    hi = torch.minimum(torch.clamp(hi, min=0), lim)
    return torch.cat([lo, hi], dim=1).to(torch.int64)


def _mask_chunk(
    flat_p: Tensor, out: Tensor, img_idx: Tensor, rng: Tensor, hw: tuple[int, int], beta: float
) -> None:
    """Max-scatter the FE values of one chunk of boxes into ``out`` (flat ``[B*H*W]``), in place."""
    height, width = hw
    c0, r0, c1, r1 = rng.unbind(1)
    bh, bw = r1 - r0, c1 - c0
    hmax, wmax = int(bh.max()), int(bw.max())
    dev = flat_p.device
    rows = r0[:, None] + torch.arange(hmax, device=dev)[None]  # [N, hmax]
    cols = c0[:, None] + torch.arange(wmax, device=dev)[None]  # [N, wmax]
    valid = (torch.arange(hmax, device=dev)[None] < bh[:, None])[:, :, None] & (
        torch.arange(wmax, device=dev)[None] < bw[:, None]
    )[:, None, :]
    rows = rows.clamp(max=height - 1)
    cols = cols.clamp(max=width - 1)
    idx = img_idx[:, None, None] * (height * width) + rows[:, :, None] * width + cols[:, None, :]
    patch = flat_p[idx] * valid  # [N, hmax, wmax], zeros outside each box
    count = (bh * bw).to(patch.dtype)
    b_mean = (beta * patch.double().sum(dim=(1, 2)) / count).to(patch.dtype)  # [N]
    safe = torch.where(b_mean > 0, b_mean, torch.ones_like(b_mean))
    val = torch.clamp(1 - patch / safe[:, None, None], min=0) * valid * (b_mean > 0)[:, None, None]
    out.scatter_reduce_(0, idx.reshape(-1), val.reshape(-1).to(out.dtype), reduce="amax", include_self=True)


@torch.no_grad()
def enhancement_mask(
    images: Tensor,
    boxes: list[Tensor],
    size: tuple[int, int] | None = None,
    beta: float = 1.5,
) -> Tensor:
    """FE mask ``[B, 1, h, w]`` in [0, 1] for images ``[B, 1, H, W]`` (>= 0) and per-image xyxy pixel boxes.

    ``size=None`` keeps ``H x W``; otherwise the full-resolution mask is area-averaged to ``size``
    (``(h, w)``). Vectorised over all boxes of the batch (boxes are gathered as padded patches and
    max-scattered), so 8 images x 20 boxes at 512^2 take milliseconds. Detached (no gradients).
    """
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be [B, 1, H, W], got {tuple(images.shape)}")
    if len(boxes) != images.shape[0]:
        raise ValueError(f"{len(boxes)} box tensors for {images.shape[0]} images")
    bsz, _, height, width = images.shape
    p = images.detach().float()
    out = torch.zeros(bsz * height * width, dtype=torch.float32, device=p.device)
    nonempty = [(i, b) for i, b in enumerate(boxes) if b.numel() > 0]
    if nonempty:
        all_boxes = torch.cat([b.reshape(-1, 4).to(p.device) for _, b in nonempty])
        img_idx = torch.cat(
            [
                torch.full((b.reshape(-1, 4).shape[0],), i, dtype=torch.int64, device=p.device)
                for i, b in nonempty
            ]
        )
        rng = box_pixel_ranges(all_boxes, height, width)
        area = (rng[:, 2] - rng[:, 0]) * (rng[:, 3] - rng[:, 1])
        keep = area > 0
        rng, img_idx, area = rng[keep], img_idx[keep], area[keep]
        if rng.shape[0]:
            order = torch.argsort(area)
            rng, img_idx = rng[order], img_idx[order]
            flat_p = p.reshape(-1)
            bh, bw = rng[:, 3] - rng[:, 1], rng[:, 2] - rng[:, 0]
            start, n = 0, rng.shape[0]
            while start < n:  # chunks bounded by _PATCH_BUDGET padded elements (usually a single chunk)
                hcm = torch.cummax(bh[start:], 0).values
                wcm = torch.cummax(bw[start:], 0).values
                cost = torch.arange(1, n - start + 1, device=p.device) * hcm * wcm  # non-decreasing
                stop = start + max(1, int((cost <= _PATCH_BUDGET).sum()))
                _mask_chunk(flat_p, out, img_idx[start:stop], rng[start:stop], (height, width), beta)
                start = stop
    mask = out.reshape(bsz, 1, height, width)
    if size is not None and tuple(size) != (height, width):
        mask = F.adaptive_avg_pool2d(mask, tuple(size))
    return mask.to(images.dtype if images.is_floating_point() else torch.float32)


def alpha_at(t: float, alpha: float, schedule: str) -> float:
    """FE strength at training fraction ``t`` in [0, 1]: ``constant`` -> ``alpha``; ``cosine`` ->
    ``alpha * (1 + cos(pi t)) / 2``."""
    if schedule == "constant":
        return float(alpha)
    if schedule == "cosine":
        t = min(max(float(t), 0.0), 1.0)
        return float(alpha) * 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"unknown FE schedule {schedule!r} (allowed: {', '.join(SCHEDULES)})")


def apply_fe(x: Tensor, mask: Tensor, alpha: float, variant: str = "fe") -> Tensor:
    """Enhance features ``x`` ``[B, C, h, w]`` with mask ``[B, 1, h, w]``.

    The readings of the paper's FE (README, "Feature enhancement"):

    - ``fe`` (R1/R2, Li et al. section 2.3): ``x + alpha * mask * x``, a per-position rescaling of ``x``;
    - ``l2n`` (R3, the introduction's sentence): ``x + alpha * mask * x / ||x||_c`` (channel L2 norm, eps
      1e-10): again a per-position multiple of ``x``, but with a gain that does not grow with ``||x||``;
    - ``mean`` (R4): ``x + alpha * mask * mean_c(x)``, the graded mask times the channel mean: it changes the
      direction of the feature vector, so it survives a later L2Norm;
    - ``ae`` (Assisted Excitation, Derakhshani et al. 2019): ``x + alpha * (mask > 0) * mean_c(x)``, the
      binary box mask (as published with ``alpha`` decayed to 0 by the cosine schedule).

    Gradients flow to ``x``; the mask is treated as a constant.
    """
    if mask.shape[-2:] != x.shape[-2:] or mask.shape[0] != x.shape[0]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match features {tuple(x.shape)}")
    m = mask.detach().to(dtype=x.dtype, device=x.device)
    if variant == "fe":
        return x + alpha * m * x
    if variant == "ae":
        return x + alpha * (m > 0).to(x.dtype) * x.mean(dim=1, keepdim=True)
    if variant == "l2n":
        return x + alpha * m * x / x.norm(dim=1, keepdim=True).clamp(min=1e-10)
    if variant == "mean":
        return x + alpha * m * x.mean(dim=1, keepdim=True)
    raise ValueError(f"unknown FE variant {variant!r} (allowed: {', '.join(VARIANTS)})")


class FEContext:
    """Per-batch FE state for a model's forward pass: boxes (xyxy px of the resized network input),
    alpha, beta, variant and the input normalisation of the centre channel.

    ``ctx(feat, inp)`` enhances ``feat`` given the normalised network input ``inp`` ``[B, 3, S, S]``;
    ``P`` is its centre channel de-normalised (``inp[:, 1] * std + mean``: the resized image in [0, 1]
    before normalisation). The mask is computed once per feature resolution and kept in ``mask``.
    """

    def __init__(self, boxes: list[Tensor], alpha: float, beta: float, variant: str, mean: float, std: float):
        self.boxes, self.alpha, self.beta, self.variant = boxes, alpha, beta, variant
        self.mean, self.std = mean, std
        self.mask: Tensor | None = None

    def __call__(self, feat: Tensor, inp: Tensor) -> Tensor:
        if self.mask is None or self.mask.shape[-2:] != feat.shape[-2:]:
            p = (inp[:, 1:2].detach().float() * self.std + self.mean).clamp(min=0)
            self.mask = enhancement_mask(p, self.boxes, tuple(feat.shape[-2:]), self.beta)
        return apply_fe(feat, self.mask, self.alpha, self.variant)


class FeatureEnhancement(nn.Module):
    """FE as a part of the detector: the switch, the reading and the strength; no parameters, no buffers.

    ``enabled`` is the on/off switch (``fe.enabled = False`` makes training see the plain network, as test
    time always does); ``placement`` (``pre_l2norm`` | ``post_l2norm``, checked by the configuration) tells
    the backbone where to call it; ``variant``, ``beta`` and the strength ``alpha`` under ``schedule`` at the
    training fraction ``progress`` (:meth:`set_progress`) define what it does (:func:`apply_fe`).

    FE acts only inside :meth:`bound`, which the detector opens for one training forward pass with the
    batch's target boxes; outside it ``fe(feat, inp)`` is the identity.
    """

    def __init__(
        self,
        *,
        enabled: bool = False,
        placement: str = "pre_l2norm",
        variant: str = "fe",
        alpha: float = 1.0,
        schedule: str = "constant",
        beta: float = 1.5,
    ) -> None:
        super().__init__()
        self.enabled, self.placement, self.variant = bool(enabled), placement, variant
        self.alpha, self.schedule, self.beta = float(alpha), schedule, float(beta)
        self.progress = 0.0
        self.context: FEContext | None = None  # the bound batch (inside :meth:`bound` only)

    def set_progress(self, t: float) -> None:
        """Set the training fraction ``t`` (clamped to [0, 1]) that drives the alpha schedule."""
        self.progress = min(max(float(t), 0.0), 1.0)

    @property
    def strength(self) -> float:
        """The alpha FE applies now (``alpha`` under ``schedule`` at ``progress``)."""
        return alpha_at(self.progress, self.alpha, self.schedule)

    @contextlib.contextmanager
    def bound(self, boxes: list[Tensor], mean: float, std: float) -> Iterator[FEContext]:
        """Enhance with ``boxes`` (xyxy px of the resized network input, one tensor per image) until exit.

        ``mean``/``std`` de-normalise the network input's centre channel (``P = inp[:, 1] * std + mean``).
        Yields the batch's :class:`FEContext` (its ``mask`` holds the last mask used)."""
        self.context = FEContext(boxes, self.strength, self.beta, self.variant, mean, std)
        try:
            yield self.context
        finally:
            self.context = None

    def forward(self, feat: Tensor, inp: Tensor) -> Tensor:
        """``feat`` enhanced for the bound batch (``inp``: the normalised network input); else ``feat``."""
        return feat if self.context is None else self.context(feat, inp)

    def describe(self) -> dict[str, object]:
        """The settings, for the architecture record."""
        return {"enabled": self.enabled, "placement": self.placement, "variant": self.variant,
                "alpha": self.alpha, "schedule": self.schedule, "beta": self.beta}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.describe().items())

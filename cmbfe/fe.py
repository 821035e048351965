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
import hashlib
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
    flat_p: Tensor, out: Tensor, img_idx: Tensor, rng: Tensor, hw: tuple[int, int], beta: float,
    shift: Tensor | None = None,
) -> None:
    """Max-scatter the FE values of one chunk of boxes into ``out`` (flat ``[B*H*W]``), in place; with
    ``shift`` (``[N, 2]`` integer ``(dx, dy)`` px) each box's values land ``shift`` away from the box."""
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
    if shift is not None:  # the same values, moved (padding entries carry 0 and are clamped in)
        rows = (rows + shift[:, 1:2]).clamp(0, height - 1)
        cols = (cols + shift[:, 0:1]).clamp(0, width - 1)
        idx = img_idx[:, None, None] * (height * width) + rows[:, :, None] * width + cols[:, None, :]
    out.scatter_reduce_(0, idx.reshape(-1), val.reshape(-1).to(out.dtype), reduce="amax", include_self=True)


@torch.no_grad()
def enhancement_mask(
    images: Tensor,
    boxes: list[Tensor],
    size: tuple[int, int] | None = None,
    beta: float = 1.5,
    shifts: list[Tensor] | None = None,
) -> Tensor:
    """FE mask ``[B, 1, h, w]`` in [0, 1] for images ``[B, 1, H, W]`` (>= 0) and per-image xyxy pixel boxes.

    ``size=None`` keeps ``H x W``; otherwise the full-resolution mask is area-averaged to ``size``
    (``(h, w)``). Vectorised over all boxes of the batch (boxes are gathered as padded patches and
    max-scattered), so 8 images x 20 boxes at 512^2 take milliseconds. Detached (no gradients).
    ``shifts`` (one ``[n_i, 2]`` int64 ``(dx, dy)`` tensor per image, px; the sham arm,
    :func:`sham_shifts`): each box's mask values, computed at the box, are written ``shift`` away from it.
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
        all_shift = None if shifts is None else torch.cat(
            [shifts[i].reshape(-1, 2).to(device=p.device, dtype=torch.int64) for i, _ in nonempty])
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
        all_shift = None if all_shift is None else all_shift[keep]
        if rng.shape[0]:
            order = torch.argsort(area)
            rng, img_idx = rng[order], img_idx[order]
            all_shift = None if all_shift is None else all_shift[order]
            flat_p = p.reshape(-1)
            bh, bw = rng[:, 3] - rng[:, 1], rng[:, 2] - rng[:, 0]
            start, n = 0, rng.shape[0]
            while start < n:  # chunks bounded by _PATCH_BUDGET padded elements (usually a single chunk)
                hcm = torch.cummax(bh[start:], 0).values
                wcm = torch.cummax(bw[start:], 0).values
                cost = torch.arange(1, n - start + 1, device=p.device) * hcm * wcm  # non-decreasing
                stop = start + max(1, int((cost <= _PATCH_BUDGET).sum()))
                _mask_chunk(flat_p, out, img_idx[start:stop], rng[start:stop], (height, width), beta,
                            None if all_shift is None else all_shift[start:stop])
                start = stop
    mask = out.reshape(bsz, 1, height, width)
    if size is not None and tuple(size) != (height, width):
        mask = F.adaptive_avg_pool2d(mask, tuple(size))
    return mask.to(images.dtype if images.is_floating_point() else torch.float32)


def _batch_seed(boxes: list[Tensor], height: int, width: int) -> int:
    """A 63-bit seed from the batch's boxes and input side: the sham positions depend only on the data stream
    (which boxes this batch holds), not on any RNG state, so a run is bit-reproducible and resumable."""
    h = hashlib.sha256(f"{height}x{width}:{[int(b.numel()) for b in boxes]}".encode())
    for b in boxes:
        h.update(b.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


def sham_shifts(boxes: list[Tensor], height: int, width: int, tries: int = 64
                ) -> tuple[list[Tensor], list[Tensor]]:
    """The sham arm's placements: per image, the boxes kept and their integer shifts ``(dx, dy)`` px.

    Each box's pixel range (:func:`box_pixel_ranges`) is moved, whole, to a uniformly drawn position of the
    ``height x width`` input where it overlaps the pixel range of no box of the same image (no GT box); the
    first of ``tries`` draws that does is kept, a box with none is dropped. Draws come from a generator seeded
    by :func:`_batch_seed`. Returns ``(kept_boxes, shifts)``: lists of ``[k_i, 4]`` boxes (on their device)
    and ``[k_i, 2]`` int64 shifts (same device), for :func:`enhancement_mask`'s ``shifts``."""
    gen = torch.Generator().manual_seed(_batch_seed(boxes, height, width))
    kept, shifts = [], []
    for b in boxes:
        b = b.reshape(-1, 4)
        rng = box_pixel_ranges(b, height, width).cpu()  # c0, r0, c1, r1
        w, h = rng[:, 2] - rng[:, 0], rng[:, 3] - rng[:, 1]
        u = torch.rand(len(rng), tries, 2, generator=gen, dtype=torch.float64)
        x0 = torch.floor(u[..., 0] * (width - w + 1)[:, None]).to(torch.int64)  # [n, tries]
        y0 = torch.floor(u[..., 1] * (height - h + 1)[:, None]).to(torch.int64)
        ox = (x0[..., None] < rng[:, 2]) & (x0[..., None] + w[:, None, None] > rng[:, 0])  # [n, tries, n]
        oy = (y0[..., None] < rng[:, 3]) & (y0[..., None] + h[:, None, None] > rng[:, 1])
        free = ~(ox & oy).any(-1)  # [n, tries]
        first = free.to(torch.int64).argmax(1)
        ok = free.any(1)
        n = torch.arange(len(rng))
        shift = torch.stack([x0[n, first] - rng[:, 0], y0[n, first] - rng[:, 1]], dim=1)[ok]
        kept.append(b[ok.to(b.device)])
        shifts.append(shift.to(b.device))
    return kept, shifts


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


MASK_HEAD = "mask_head"  # FeatureEnhancement attribute of the mask arm's auxiliary head


class FEContext:
    """Per-batch FE state for a model's forward pass: boxes (xyxy px of the resized network input),
    alpha, beta, variant, the input normalisation of the centre channel and what the arm does with them.

    ``ctx(feat, inp)`` returns ``feat`` enhanced given the normalised network input ``inp`` ``[B, 3, S, S]``;
    ``P`` is its centre channel de-normalised (``inp[:, 1] * std + mean``: the resized image in [0, 1]
    before normalisation). ``enhance`` applies FE (:func:`apply_fe`) with the mask of the boxes, or with
    ``sham`` the same per-box masks moved off every box (:func:`sham_shifts`); ``mask_head`` (the mask
    arm) predicts the true mask from ``feat`` and leaves the BCE in ``aux_loss``. ``mask`` keeps the mask
    FE used (the BCE target when FE is off).
    """

    def __init__(self, boxes: list[Tensor], alpha: float, beta: float, variant: str, mean: float, std: float,
                 *, enhance: bool = True, sham: bool = False, mask_head: nn.Module | None = None):
        self.boxes, self.alpha, self.beta, self.variant = boxes, alpha, beta, variant
        self.mean, self.std = mean, std
        self.enhance, self.sham, self.mask_head = enhance, sham, mask_head
        self.mask: Tensor | None = None
        self.aux_loss: Tensor | None = None

    def _mask(self, p: Tensor, size: tuple[int, int], sham: bool) -> Tensor:
        if not sham:
            return enhancement_mask(p, self.boxes, size, self.beta)
        kept, shifts = sham_shifts(self.boxes, p.shape[-2], p.shape[-1])
        return enhancement_mask(p, kept, size, self.beta, shifts=shifts)

    def __call__(self, feat: Tensor, inp: Tensor) -> Tensor:
        size = tuple(feat.shape[-2:])
        p = (inp[:, 1:2].detach().float() * self.std + self.mean).clamp(min=0)
        if self.mask_head is not None:  # the mask arm: BCE against the true mask, features untouched
            target = enhancement_mask(p, self.boxes, size, self.beta)
            logits = self.mask_head(feat)
            self.aux_loss = F.binary_cross_entropy_with_logits(logits.float(), target.float())
            if not self.enhance:
                self.mask = target
        if not self.enhance:
            return feat
        if self.mask is None or self.mask.shape[-2:] != feat.shape[-2:]:
            self.mask = self._mask(p, size, self.sham)
        return apply_fe(feat, self.mask, self.alpha, self.variant)


class FeatureEnhancement(nn.Module):
    """FE as a part of the detector: the switch, the reading and the strength (parameters: mask arm only).

    ``enabled`` is the on/off switch (``fe.enabled = False`` makes training see the plain network, as test
    time always does); ``placement`` (``pre_l2norm`` | ``post_l2norm``, checked by the configuration) tells
    the backbone where to call it; ``variant``, ``beta`` and the strength ``alpha`` under ``schedule`` at the
    training fraction ``progress`` (:meth:`set_progress`) define what it does (:func:`apply_fe`); ``sham``
    moves every box's mask off the boxes (the sham arm, :func:`sham_shifts`).

    The mask arm (``mask_loss_weight`` > 0, :meth:`attach_mask_head`): a 1x1 conv ``mask_head`` on the
    first source predicts the FE mask, trained with BCE x ``mask_loss_weight`` beside the detection loss
    (:class:`cmbfe.models.CMBDetector` adds it as ``mask_bce``). It is called only inside :meth:`bound`, so
    inference never runs it; its weights are ``backbone.fe.mask_head.*`` in the state dict, which a detector
    without the head drops on load (:meth:`cmbfe.models.CMBDetector.load_state_dict`).

    FE acts only inside :meth:`bound`, which the detector opens for one training forward pass with the
    batch's target boxes (when :attr:`active`); outside it ``fe(feat, inp)`` is the identity.
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
        sham: bool = False,
        mask_loss_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.enabled, self.placement, self.variant = bool(enabled), placement, variant
        self.alpha, self.schedule, self.beta = float(alpha), schedule, float(beta)
        self.sham, self.mask_loss_weight = bool(sham), float(mask_loss_weight)
        self.mask_head: nn.Conv2d | None = None
        self.progress = 0.0
        self.context: FEContext | None = None  # the bound batch (inside :meth:`bound` only)

    def attach_mask_head(self, channels: int) -> None:
        """Add the mask arm's head: a 1x1 conv ``channels -> 1`` initialised to zero (logit 0 everywhere),
        so it draws nothing from the global RNG and the detector's initial weights equal the no-FE arm's of
        the same seed."""
        head = nn.Conv2d(int(channels), 1, kernel_size=1)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        self.mask_head = head

    @property
    def active(self) -> bool:
        """Whether training forwards bind the batch's boxes: FE on, or the mask arm's head present."""
        return self.enabled or self.mask_head is not None

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
        Yields the batch's :class:`FEContext` (its ``mask`` holds the last mask used, ``aux_loss`` the mask
        arm's BCE)."""
        self.context = FEContext(boxes, self.strength, self.beta, self.variant, mean, std,
                                 enhance=self.enabled, sham=self.sham, mask_head=self.mask_head)
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
                "alpha": self.alpha, "schedule": self.schedule, "beta": self.beta, "sham": self.sham,
                "mask_loss_weight": self.mask_loss_weight}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.describe().items())

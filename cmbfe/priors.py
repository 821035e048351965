"""SSD default boxes ("priors"): the prior sets (:func:`prior_spec`) and their generator
(:class:`PixelBoxGenerator`).

The network input is assumed to span the 240 mm FOV (:data:`FOV_MM`), so a pixel of the resized input is
``240 / size`` mm and prior scales in mm are size independent. Scales are fractions of the whole-slice
input side ``size``; default-box centres are spread over the real feature-map sizes (``(j + 0.5) / f_k``,
torchvision's ``steps=None``). Boxes are xyxy in pixels of the (resized) network input.
"""

from __future__ import annotations

import math
from typing import get_args

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from cmbfe.config import Priors

FOV_MM = 240.0  # field of view spanned by the network input (paper: 512 px x 0.47 mm)
CMB_PRIOR_MIN_MM = 3.0  # smallest default box of the 'cmb' priors (first map)
CMB_PRIOR_RATIO = 1.6  # geometric step between consecutive 'cmb' prior scales
CMB_AR_MAPS = 2  # 'cmb' priors: aspect ratio 2 only on the first two (finest) maps


def prior_spec(priors: str, n_maps: int, fmap_sizes: list[int] | None = None
               ) -> tuple[list[list[int]], list[float]]:
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


class PixelBoxGenerator(nn.Module):
    """SSD default boxes with sizes fixed in network pixels (torchvision's ``DefaultBoxGenerator`` at
    ``ref_size``).

    torchvision gives default-box sizes as fractions of the input side, so a 256-px training window would
    get boxes half the pixel size of those on a 512-px whole slice. Here ``scales`` are fractions of
    ``ref_size`` (the model's whole-slice input ``size``) and, for any other input side, the sizes are
    rescaled so that a prior covers the same number of pixels on windows and on whole slices. Centres are
    at ``(j + 0.5) / f_k`` of each map.

    Per map ``k``: squares of side ``s_k`` and ``sqrt(s_k s_{k+1})``, then ``s_k sqrt(ar) x s_k / sqrt(ar)``
    and its transpose for each aspect ratio (sizes clipped to [0, 1] of the input side). The arithmetic is
    torchvision 0.29.1's ``DefaultBoxGenerator`` with ``steps=None, clip=True`` (vendored: it is built on
    private methods there), so at ``ref_size`` the boxes equal torchvision's exactly (a test checks this
    against the installed torchvision).
    """

    def __init__(self, aspect_ratios: list[list[int]], scales: list[float], ref_size: int) -> None:
        super().__init__()
        self.aspect_ratios, self.scales, self.ref_size = aspect_ratios, scales, int(ref_size)
        self.wh_pairs = [self._wh(k) for k in range(len(aspect_ratios))]

    def _wh(self, k: int) -> Tensor:
        """``[n, 2]`` (width, height) of map ``k``'s priors, as fractions of ``ref_size`` (unclipped)."""
        s_k, s_next = self.scales[k], self.scales[k + 1]
        s_prime = math.sqrt(s_k * s_next)
        pairs = [[s_k, s_k], [s_prime, s_prime]]
        for ar in self.aspect_ratios[k]:
            sq = math.sqrt(ar)
            w, h = s_k * sq, s_k / sq
            pairs.extend([[w, h], [h, w]])
        return torch.as_tensor(pairs, dtype=torch.float32)

    def num_anchors_per_location(self) -> list[int]:
        """Priors per feature-map position: 2 squares + 2 per aspect ratio."""
        return [2 + 2 * len(r) for r in self.aspect_ratios]

    def grid_boxes(
        self, grid_sizes: list[list[int]], image_size: list[int], dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """``[A, 4]`` (cx, cy, w, h) of every prior, fractions of the ``image_size`` (h, w) input."""
        boxes = []
        for k, (fh, fw) in enumerate(grid_sizes):
            shifts_x = ((torch.arange(0, fw) + 0.5) / fw).to(dtype=dtype)
            shifts_y = ((torch.arange(0, fh) + 0.5) / fh).to(dtype=dtype)
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y) * len(self.wh_pairs[k]), dim=-1).reshape(-1, 2)
            wh = self.wh_pairs[k].clamp(min=0, max=1).repeat((fh * fw), 1)
            boxes.append(torch.cat((shifts, wh), dim=1))
        out = torch.cat(boxes, dim=0)
        h, w = int(image_size[0]), int(image_size[1])
        if (h, w) == (self.ref_size, self.ref_size):
            return out
        f = torch.tensor([self.ref_size / w, self.ref_size / h], dtype=dtype)
        return torch.cat([out[:, :2], out[:, 2:] * f], dim=1)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        """Per image, ``[A, 4]`` xyxy priors in pixels of the batch's (resized, padded) input."""
        grid_sizes = [fm.shape[-2:] for fm in feature_maps]
        image_size = image_list.tensors.shape[-2:]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        boxes = self.grid_boxes(grid_sizes, image_size, dtype=dtype).to(device)
        x_y_size = torch.tensor([image_size[1], image_size[0]], device=boxes.device)
        return [torch.cat([(boxes[:, :2] - 0.5 * boxes[:, 2:]) * x_y_size,
                           (boxes[:, :2] + 0.5 * boxes[:, 2:]) * x_y_size], -1)
                for _ in image_list.image_sizes]

    def extra_repr(self) -> str:
        return f"aspect_ratios={self.aspect_ratios}, scales={self.scales}, ref_size={self.ref_size}"

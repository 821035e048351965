"""The FE train/test gap: training losses on one fixed batch with FE on (as training sees it) and off (the
network test time meets).

FE runs only in training, so a detector whose heads rely on it meets different features at test time. A gap
(loss with FE off minus loss with FE on) that stays large over training measures that reliance. Training logs
it to ``RUN/fe_gap.csv`` (:data:`FE_GAP_FIELDS`) at every validation of an FE run (:mod:`cmbfe.train`); the
study computes it for a finished run (:mod:`cmbfe.study.mechanism`). Both use :func:`fe_gap_batch`.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from cmbfe.data import SliceDataset, Target, targets_to
from cmbfe.models import CMBDetector, split_losses

FE_GAP_BATCH = 8
FE_GAP_FIELDS = ["iteration", "alpha", "loss_fe_on", "loss_fe_off", "cls_fe_on", "cls_fe_off", "bbox_fe_on",
                 "bbox_fe_off"]


def fe_gap_batch(ds: SliceDataset, n: int = FE_GAP_BATCH) -> list[tuple[Tensor, Target]]:
    """The fixed batch of :func:`fe_gap`: the first ``n`` CMB slices of the training pool ``ds``, drawn with
    seeds ``0..n-1`` (augmentation and window as in training; seeded draws leave the training stream's RNG
    untouched)."""
    pos = [i for i, im in enumerate(ds.images) if ds.has_cmb(im)][:n]
    return [ds[(i, i)] for i in pos]


@torch.no_grad()
def fe_gap(core: CMBDetector, fixed: list[tuple[Tensor, Target]], device: torch.device) -> dict[str, float]:
    """Training losses of a copy of ``core`` on the batch ``fixed`` with FE switched on and off, in train mode
    (batch statistics; the copy leaves ``core``'s BatchNorm buffers untouched). Returns the
    :data:`FE_GAP_FIELDS` except ``iteration``: ``alpha`` (FE strength now) and, for ``on``/``off``, the
    total, classification and box-regression losses."""
    model = copy.deepcopy(core).train()
    images = [im.to(device) for im, _ in fixed]
    targets = targets_to([t for _, t in fixed], device)
    row: dict[str, float] = {"alpha": float(model.fe.strength)}
    for on in (True, False):
        model.fe.enabled = on
        total, bbox, cls = split_losses(model(images, targets))
        tag = "on" if on else "off"
        row |= {f"loss_fe_{tag}": float(total), f"bbox_fe_{tag}": float(bbox), f"cls_fe_{tag}": float(cls)}
    return row

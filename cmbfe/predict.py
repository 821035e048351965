"""``cmbfe predict``: run a trained detector over every slice of a split and write COCO detections.

Usage::

    cmbfe predict --run RUN --split test [--data PRE] --out DETS.json [--batch-size 8] [--device auto]

Output: a COCO results list ``[{image_id, category_id: 1, bbox: [x, y, w, h], score}, ...]`` with boxes in
the pixel frame of the PNG (not the resized network input), clipped to the image. ``RUN`` is a training
run folder (``config.yaml`` + ``model.pt``, see :mod:`cmbfe.train`; loaded by :func:`cmbfe.modelfolder.load`);
``PRE`` defaults to the run config's ``pre_path()``. The results are written by :mod:`cmbfe.cocoresults`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from cmbfe import modelfolder
from cmbfe.cocoresults import coco_results, write_coco_results
from cmbfe.data import SliceDataset, collate_fn
from cmbfe.runtime import apply_thread_env, resolve_device


def detections_to_coco(output: dict[str, torch.Tensor], image_id: int, width: int, height: int) -> list[dict]:
    """One image's model output (``boxes`` xyxy px, ``scores``) -> COCO results (xywh px, clipped to the
    ``width`` x ``height`` image; :func:`cmbfe.cocoresults.coco_results`)."""
    boxes = output["boxes"].detach().float().cpu().reshape(-1, 4)
    scores = output["scores"].detach().float().cpu().reshape(-1)
    return coco_results(boxes, scores, image_id, clip_wh=(width, height))


@torch.inference_mode()
def predict(
    model: nn.Module,
    pre_dir: Path | str,
    split: str,
    *,
    input: str = "gray3",
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    workers: int = 0,
    dataset: SliceDataset | None = None,
) -> list[dict[str, Any]]:
    """COCO results for every image of ``PRE/annotations/{split}.json`` (see module docstring).

    ``model`` is put in ``eval()`` mode (FE is then inactive) and restored to its previous mode afterwards.
    ``dataset`` reuses an already built :class:`SliceDataset` (e.g. with its image cache) instead of reading
    ``split`` again.
    """
    apply_thread_env()
    device = torch.device(device)
    ds = dataset if dataset is not None else SliceDataset(pre_dir, split, input=input, negatives_ratio=None)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_fn)
    size = {int(im["id"]): (int(im["width"]), int(im["height"])) for im in ds.images}
    was_training = model.training
    model.eval()
    # channels_last convolutions (oneDNN) run ~1.7x faster on this CPU (SSD-512, width 1/8, one thread); the
    # model's memory format is restored afterwards, so a model validated during training trains on unchanged
    # (in channels_last when train.channels_last_cpu put it there)
    cpu = device.type == "cpu"
    restore = torch.channels_last if is_channels_last(model) else torch.contiguous_format
    if cpu:
        with torch.inference_mode(False):  # parameters stay normal tensors (training may go on with them)
            model.to(memory_format=torch.channels_last)
    results: list[dict[str, Any]] = []
    try:
        for images, targets in loader:
            outputs = model([im.to(device) for im in images])
            for out, t, im in zip(outputs, targets, images):
                w, h = size.get(t["image_id"], (im.shape[-1], im.shape[-2]))
                results.extend(detections_to_coco(out, t["image_id"], w, h))
    finally:
        if cpu:
            with torch.inference_mode(False):
                model.to(memory_format=restore)
        model.train(was_training)
    return results


def is_channels_last(model: torch.nn.Module) -> bool:
    """Whether ``model``'s convolution weights are in channels_last memory format (judged on the first 4-D
    weight with more than one input channel and a spatial kernel, where the two formats differ)."""
    for w in model.parameters():
        if w.dim() == 4 and w.shape[1] > 1 and w.shape[2] * w.shape[3] > 1:
            return bool(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous())
    return False


def main(argv: list[str] | None = None) -> int:
    """``cmbfe predict --run RUN --split SPLIT [--data PRE] --out DETS.json``."""
    ap = argparse.ArgumentParser(prog="cmbfe predict", description=__doc__.split("\n\n")[0].replace("``", ""))
    ap.add_argument("--run", required=True, type=Path, help="training run folder (config.yaml, model.pt)")
    ap.add_argument("--split", default="test", help="train | val | test (PRE/annotations/SPLIT.json)")
    ap.add_argument("--data", type=Path, default=None, help="PRE folder (default: the run config's data/pre)")
    ap.add_argument("--out", required=True, type=Path, help="COCO results JSON to write")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    run = modelfolder.load(args.run, device=device)
    pre = args.data if args.data is not None else run.cfg.pre_path()
    t0 = time.perf_counter()
    dets = predict(run.model, pre, args.split, input=run.cfg.model.input, batch_size=args.batch_size,
                   device=device)
    write_coco_results(args.out, dets)
    print(
        f"cmbfe predict: {len(dets)} detections on '{args.split}' in {time.perf_counter() - t0:.1f} s "
        f"-> {args.out}"
    )
    return 0

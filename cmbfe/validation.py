"""Validation during training: a model's metrics on the val split (or on a fixed subset of it) and the rows of
``RUN/val.csv`` (:mod:`cmbfe.train`).

``val.csv`` columns (:data:`VAL_FIELDS`): ``iteration``, the metrics of :data:`VAL_METRICS` (IoU / centre
matching of ``cfg.eval``; AP is VOC all-point), ``fp_per_cmb``, ``froc_mean``, ``n_dets``, ``seconds`` (of
that validation), ``subset`` (1: the fixed subset of ``train.val_subset`` slices,
:func:`cmbfe.data.val_subset`; 0: the whole split) and ``slices`` (how many val slices were scored).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmbfe import config as C
from cmbfe.data import SliceDataset
from cmbfe.evaluate import dets_from_coco, evaluate, gt_from_coco
from cmbfe.predict import predict

VAL_METRICS = ["ap_voc", "ap_voc07", "sensitivity", "precision", "precision_at_sensitivity_0.9"]
VAL_FIELDS = ["iteration", *VAL_METRICS, "fp_per_cmb", "froc_mean", "n_dets", "seconds", "subset", "slices"]


def split_metrics(dets: list[dict[str, Any]], dataset: SliceDataset, cfg: C.Config) -> dict[str, Any]:
    """Metrics (``cmbfe.evaluate``, ``cfg.eval``'s matching) of COCO results ``dets`` on the images of
    ``dataset`` (detections on other images are left out: a subset scored from the whole split's pass)."""
    ids = {int(im["id"]) for im in dataset.images}
    dets = [d for d in dets if int(d["image_id"]) in ids]
    gt = gt_from_coco(dataset.coco, str(dataset.data.split_path(dataset.split)))
    res = evaluate(
        gt, dets_from_coco(dets, gt), match=cfg.eval.match, iou=cfg.eval.iou, radius_mm=cfg.eval.radius_mm
    )
    return res["metrics"]


def validate_split(
    model: nn.Module, dataset: SliceDataset, cfg: C.Config, device: torch.device
) -> dict[str, Any]:
    """Predict on ``dataset`` (the val split, or a subset of it) and return its metrics (``cmbfe.evaluate``)
    with the COCO results under ``"detections"``."""
    kw = {"input": dataset.input, "batch_size": cfg.train.batch_size, "device": device, "dataset": dataset}
    dets = predict(model, dataset.pre_dir, dataset.split, **kw)
    return {**split_metrics(dets, dataset, cfg), "detections": dets}


def csv_value(v: Any) -> Any:
    """A CSV cell: empty for None and NaN."""
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else v


def val_row(m: dict[str, Any], it: int, seconds: float, ds: SliceDataset, subset: bool) -> dict[str, Any]:
    """One ``val.csv`` row of metrics ``m`` at iteration ``it`` on ``ds`` (``subset``: the fixed subset)."""
    row = {k: m.get(k) for k in VAL_FIELDS}
    row.update(iteration=it, seconds=round(seconds, 3), subset=int(subset), slices=len(ds))
    return {k: csv_value(v) for k, v in row.items()}


def csv_header(path: Path, fields: list[str], append: bool) -> list[str]:
    """The columns to write: ``fields``, or the header of the file a resumed run appends to (a run started
    before a column existed keeps its file's columns)."""
    if append and path.is_file():
        with open(path, newline="") as f:
            head = next(csv.reader(f), None)
        if head:
            return head
    return fields

"""COCO detection results, the one writer: ``[{image_id, category_id: 1, bbox: [x, y, w, h], score, ...}]``.

Boxes come in as ``xyxy`` in pixels of the image (continuous, no "+1") and are written as COCO ``xywh``
through :func:`cmbfe.boxes.xyxy_to_xywh`, to 3 decimals; scores to 6 decimals; boxes without area are left
out. ``cmbfe predict`` (a split) and ``cmbfe detect`` (``detections.json`` of a scan, with ``slice_index``
and ``lesion_id`` per detection) write through here; :func:`cmbfe.evaluate.dets_from_coco` and pycocotools'
``loadRes`` read the result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cmbfe.boxes import xyxy_to_xywh
from cmbfe.utils import atomic_write_json

CATEGORY_ID = 1  # the one category: CMB
BOX_DECIMALS = 3
SCORE_DECIMALS = 6


def coco_results(boxes_xyxy: Any, scores: Any, image_ids: int | Sequence[int] | np.ndarray, *,
                 clip_wh: tuple[float, float] | None = None,
                 extra: Mapping[str, Sequence[Any] | np.ndarray] | None = None) -> list[dict[str, Any]]:
    """COCO results of ``N`` detections: ``boxes_xyxy`` ``[N, 4]`` px (array or CPU tensor), ``scores``
    ``[N]``, ``image_ids`` one id for all or one per detection.

    ``clip_wh`` ``(width, height)`` clips the boxes to the image first; ``extra`` adds per-detection fields
    (``name -> N values``; numpy values become Python ones) after ``score``. A box whose width or height is
    not positive (after clipping) is left out, with its ``extra`` values.
    """
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4).copy()
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(s) != len(b):
        raise ValueError(f"{len(b)} boxes but {len(s)} scores")
    ids = np.broadcast_to(np.asarray(image_ids, dtype=np.int64), (len(b),))
    if clip_wh is not None:
        b[:, 0::2] = b[:, 0::2].clip(0.0, float(clip_wh[0]))
        b[:, 1::2] = b[:, 1::2].clip(0.0, float(clip_wh[1]))
    xywh = xyxy_to_xywh(b)
    keep = np.flatnonzero((xywh[:, 2] > 0) & (xywh[:, 3] > 0))
    cols = {k: np.asarray(v) for k, v in (extra or {}).items()}
    for k, v in cols.items():
        if len(v) != len(b):
            raise ValueError(f"extra field '{k}': {len(v)} values for {len(b)} boxes")
    out = []
    for n in keep.tolist():
        rec = {"image_id": int(ids[n]), "category_id": CATEGORY_ID,
               "bbox": [round(v, BOX_DECIMALS) for v in xywh[n].tolist()],
               "score": round(float(s[n]), SCORE_DECIMALS)}
        for k, v in cols.items():
            rec[k] = v[n].item()
        out.append(rec)
    return out


def write_coco_results(path: str | Path, results: list[dict[str, Any]]) -> Path:
    """Write a COCO results list to ``path`` (compact JSON, atomically)."""
    atomic_write_json(Path(path), results, indent=None)
    return Path(path)

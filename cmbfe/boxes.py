"""Box format conversions, the one place they are written: ``xyxy`` (internal, continuous pixels, no "+1")
and COCO ``xywh``.

Both functions take ``[N, 4]`` boxes, a torch tensor (the result keeps its dtype and device) or anything
``numpy.asarray`` reads (the result is a float64 array), and return new boxes; the input is not modified.
Dependency-free within cmbfe.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _copy(b: Any) -> Any:
    if hasattr(b, "clone"):  # torch.Tensor
        return b.reshape(-1, 4).clone()
    return np.array(b, dtype=np.float64).reshape(-1, 4)


def xywh_to_xyxy(b: Any) -> Any:
    """COCO ``[x, y, w, h]`` -> ``[x0, y0, x1, y1]`` (``x1 = x + w``)."""
    out = _copy(b)
    out[:, 2:] = out[:, :2] + out[:, 2:]
    return out


def xyxy_to_xywh(b: Any) -> Any:
    """``[x0, y0, x1, y1]`` -> COCO ``[x, y, w, h]`` (``w = x1 - x0``)."""
    out = _copy(b)
    out[:, 2:] = out[:, 2:] - out[:, :2]
    return out

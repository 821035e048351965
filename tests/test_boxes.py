"""xyxy <-> COCO xywh, the one conversion, for numpy arrays, lists and torch tensors."""

from __future__ import annotations

import numpy as np
import torch

from cmbfe.boxes import xywh_to_xyxy, xyxy_to_xywh


def test_numpy_and_lists_round_trip():
    xywh = [[1, 2, 3, 4], [0.5, 0.25, 0.0, 2.0]]
    xyxy = xywh_to_xyxy(xywh)
    assert xyxy.dtype == np.float64
    np.testing.assert_array_equal(xyxy, [[1, 2, 4, 6], [0.5, 0.25, 0.5, 2.25]])
    np.testing.assert_array_equal(xyxy_to_xywh(xyxy), xywh)
    assert xywh_to_xyxy([]).shape == (0, 4)


def test_torch_keeps_dtype_and_leaves_the_input_alone():
    b = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float32)
    out = xywh_to_xyxy(b)
    assert out.dtype == torch.float32 and out.tolist() == [[1.0, 2.0, 4.0, 6.0]]
    assert b.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert xyxy_to_xywh(out.double()).dtype == torch.float64
    assert xywh_to_xyxy(torch.zeros(0, 4)).shape == (0, 4)

"""cmbfe: cerebral microbleed detection on SWI with SSD and ground-truth feature enhancement.

Conventions used throughout the package:
- volumes are numpy arrays indexed ``[slice, row, col]`` (z, y, x);
- boxes are ``xyxy`` in continuous pixel coordinates of a slice (no "+1"), COCO JSON is ``xywh``;
- physical coordinates are millimetres in the DICOM patient frame (LPS).
"""

__version__ = "0.1.0"

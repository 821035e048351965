"""The preprocessed-data folder ("PRE", written by ``cmbfe preprocess``): its paths and its split files.

The one home of the PRE layout (docs/design.md, "Files on disk"); every module reaches the folder's files
through :class:`DataDir`::

    PRE/images/<patient>/z%04d.png|jpg        8-bit slices (a COCO image's ``file_name`` is relative to it)
    PRE/annotations/<split>.json              COCO per split (train, val, test; ``all`` for unlabelled input)
    PRE/annotations/<split>_geometric.json    val/test again with the geometric label model's boxes
                                              (written when ``preprocess.labels`` is not geometric)
    PRE/splits.csv, lesions.csv, mimics.csv   patient -> split; the 3D CMBs and mimics (labelled input)
    PRE/slice_objects.csv                     per-slice boxes of CMBs and mimics (xyxy px)
    PRE/preprocess.json                       config, summary, versions

:meth:`DataDir.write_split` writes a split file, :meth:`DataDir.coco` reads one (the only reader: an error
names the file). :meth:`DataDir.true_cmbs` sets the true 3D CMBs of ``lesions.csv`` beside a split's boxes.
Geometry (:class:`Geometry`) is in mm and px: ``pixel_spacing_mm`` is ``(dy, dx)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cmbfe.errors import InputError
from cmbfe.utils import atomic_write_json

SPLITS: tuple[str, ...] = ("train", "val", "test")
"""The labelled splits, in order."""


def split_name(split: str, *, geometric: bool = False) -> str:
    """Stem of a split file: ``<split>`` or ``<split>_geometric``."""
    return f"{split}_geometric" if geometric else split


@dataclass(frozen=True)
class Geometry:
    """Slice geometry of a split's first image: pixel spacing ``(dy, dx)`` mm, matrix side (px, the larger of
    width and height) and slice thickness (mm, None where the COCO file has none)."""

    pixel_spacing_mm: tuple[float, float]
    matrix: int
    slice_mm: float | None


@dataclass(frozen=True, init=False)
class DataDir:
    """A PRE folder at ``root`` (need not exist yet: the writer builds one). ``os.fspath(d)`` is ``root``."""

    root: Path

    def __init__(self, root: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "root", Path(root))

    def __fspath__(self) -> str:
        return str(self.root)

    def __str__(self) -> str:
        return str(self.root)

    @property
    def images(self) -> Path:
        """``PRE/images`` (the root of every COCO ``file_name``)."""
        return self.root / "images"

    @property
    def annotations(self) -> Path:
        """``PRE/annotations`` (the split files)."""
        return self.root / "annotations"

    @property
    def slice_objects(self) -> Path:
        """``PRE/slice_objects.csv`` (labelled input only)."""
        return self.root / "slice_objects.csv"

    @property
    def splits_csv(self) -> Path:
        """``PRE/splits.csv`` (labelled input only)."""
        return self.root / "splits.csv"

    @property
    def lesions_csv(self) -> Path:
        """``PRE/lesions.csv``: every true 3D CMB (labelled input only)."""
        return self.root / "lesions.csv"

    @property
    def manifest(self) -> Path:
        """``PRE/preprocess.json``."""
        return self.root / "preprocess.json"

    def split_path(self, split: str, *, geometric: bool = False) -> Path:
        """``PRE/annotations/<split>.json`` (``<split>_geometric.json`` with ``geometric``)."""
        return self.annotations / f"{split_name(split, geometric=geometric)}.json"

    def has_split(self, split: str, *, geometric: bool = False) -> bool:
        """Whether the split file exists."""
        return self.split_path(split, geometric=geometric).is_file()

    def image_path(self, file_name: str) -> Path:
        """The slice of a COCO image's ``file_name``."""
        return self.images / file_name

    def coco(self, split: str, *, geometric: bool = False) -> dict[str, Any]:
        """The COCO dict of a split (``annotations`` defaults to ``[]``); :class:`InputError` naming the file
        when it is missing, not JSON or has no ``images``."""
        path = self.split_path(split, geometric=geometric)
        if not path.is_file():
            raise InputError(f"{path}: COCO annotation file not found (run 'cmbfe preprocess' first?)")
        try:
            coco = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
            raise InputError(f"{path}: not a COCO file (no 'images' list)")
        coco.setdefault("annotations", [])
        return coco

    def write_split(self, split: str, coco: dict[str, Any], *, geometric: bool = False) -> Path:
        """Write a split file atomically (compact JSON); returns its path."""
        path = self.split_path(split, geometric=geometric)
        atomic_write_json(path, coco, indent=None)
        return path

    def true_cmbs(self, split: str) -> pd.DataFrame:
        """Every true 3D CMB of the split's patients (``lesions.csv`` rows of the patients ``splits.csv``
        puts in ``split``), boxed or not, with a column ``boxed``: whether the label model gave it a box on a
        slice of the split file (a CMB too faint or small for the annotator label model has none).
        :class:`InputError` naming the file when ``splits.csv`` or ``lesions.csv`` is missing."""
        for path in (self.splits_csv, self.lesions_csv):
            if not path.is_file():
                raise InputError(f"{path}: not found (unlabelled data or not a preprocessed folder)")
        patients = set(pd.read_csv(self.splits_csv, dtype={"patient_id": str}).query("split == @split")
                       ["patient_id"])
        les = pd.read_csv(self.lesions_csv, dtype={"patient_id": str})
        les = les[les["patient_id"].isin(patients)].reset_index(drop=True)
        coco = self.coco(split)
        pid = {im["id"]: str(im["patient_id"]) for im in coco["images"]}
        boxed = {(pid[a["image_id"]], int(a["lesion_id"])) for a in coco["annotations"] if "lesion_id" in a}
        les["boxed"] = [(p, int(i)) in boxed for p, i in zip(les["patient_id"], les["lesion_id"])]
        return les

    def training_geometry(self, split: str = "train") -> Geometry:
        """:class:`Geometry` of the split's first image; :class:`InputError` naming the file when the split
        is missing or its first image lacks ``pixel_spacing_mm``/``width``/``height``."""
        coco = self.coco(split)
        path = self.split_path(split)
        try:
            im = coco["images"][0]
            dy, dx = (float(v) for v in im["pixel_spacing_mm"])
            matrix = int(max(im["width"], im["height"]))
            slice_mm = float(im["slice_mm"]) if im.get("slice_mm") is not None else None
        except (IndexError, KeyError, TypeError, ValueError):
            raise InputError(f"{path}: no image with pixel_spacing_mm, width and height") from None
        return Geometry((dy, dx), matrix, slice_mm)

    def manifest_dict(self) -> dict[str, Any]:
        """``PRE/preprocess.json`` as a dict; :class:`InputError` naming the file when missing or not JSON."""
        try:
            obj = json.loads(self.manifest.read_text())
        except FileNotFoundError:
            raise InputError(f"{self.manifest}: not found (not a preprocessed folder?)") from None
        except (OSError, ValueError) as e:
            raise InputError(f"{self.manifest}: cannot read ({e})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{self.manifest}: not a JSON object")
        return obj

"""Torch data loading over a preprocessed-data folder (:class:`cmbfe.datadir.DataDir`: slices and COCO files).

A sample is ``(image, target)``: ``image`` a float32 tensor [3, H, W] in [0, 1] (8-bit PNG / 255) in the PNG's
pixel frame; ``target = {"boxes": [N, 4] float32 xyxy pixels, "labels": [N] int64 (all 1 = cmb),
"image_id": int}``. CMB-free slices have ``boxes`` of shape [0, 4].

Inputs (``model.input``): ``gray3`` replicates the slice into 3 channels; ``2.5d`` stacks slices z-1, z, z+1
of the same patient (``PRE/images/PATIENT/z%04d.png`` or ``.jpg``; the end slices repeat themselves).

Training pool: every slice with a CMB plus ``negatives_ratio`` x (number of CMB slices) CMB-free slices drawn
without replacement by a ``numpy`` generator seeded with ``seed`` (all CMB-free slices when
``negatives_ratio`` is None, which is what val/test use).

In-loop validation may use :func:`val_subset`: a fixed subset of the val slices, stratified by patient and by
CMB / CMB-free slice (``train.val_subset``).

Iteration-based training draws from :class:`InfiniteSampler`, which yields ``(index, draw_seed)`` pairs;
the dataset seeds the augmentation of that draw with ``draw_seed`` (see :mod:`cmbfe.augment`), so the stream
of augmented batches depends only on ``(seed, position)`` - not on DataLoader workers - and a resumed run
sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from cmbfe.augment import build_augment, random_window
from cmbfe.boxes import xywh_to_xyxy
from cmbfe.config import Config, InputKind, ModelConfig
from cmbfe.datadir import DataDir
from cmbfe.errors import ConfigError, InputError

INPUTS: tuple[str, ...] = get_args(InputKind)
Target = dict[str, Any]


def read_png(path: Path) -> np.ndarray:
    """One slice as a 2-D uint8 array (grey; RGB is converted); :class:`InputError` naming a missing file."""
    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I"):
                a = np.asarray(im, dtype=np.float32)
                return np.clip(a / 257.0 + 0.5, 0, 255).astype(np.uint8)
            return np.asarray(im.convert("L"), dtype=np.uint8).copy()
    except OSError as e:
        raise InputError(f"{path}: cannot read image ({e})") from None


class _LRU:
    """A tiny LRU cache ``Path -> uint8 array``; ``size`` 0 disables it, < 0 is unbounded."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict[Path, np.ndarray] = OrderedDict()

    def get(self, path: Path) -> np.ndarray:
        if self.size == 0:
            return read_png(path)
        if path in self._d:
            self._d.move_to_end(path)
            return self._d[path]
        a = read_png(path)
        self._d[path] = a
        if 0 < self.size < len(self._d):
            self._d.popitem(last=False)
        return a


def coco_boxes_xyxy(anns: list[dict[str, Any]]) -> Tensor:
    """COCO ``bbox [x, y, w, h]`` list -> float32 [N, 4] xyxy pixels (shape [0, 4] when empty)."""
    return xywh_to_xyxy(torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4))


class SliceDataset(Dataset):
    """Slices of one split of ``pre_dir`` as ``(image [3,H,W] float [0,1], target)`` (see module docstring).

    ``cache``: number of decoded PNG slices kept in memory per process (``-1`` unbounded, ``0`` none); the
    default data set (~2500 slices at 256^2, ~160 MB as uint8) fits in RAM.
    ``window`` > 0: after augmentation, return a random ``window x window`` px window
    (:func:`cmbfe.augment.random_window`, a CMB-holding one with probability ``window_positive``), seeded
    by the draw seed like the augmentation.
    """

    def __init__(
        self,
        pre_dir: Path | str,
        split: str,
        *,
        input: str = "gray3",
        augment: Callable[..., Any] | None = None,
        negatives_ratio: float | None = None,
        seed: int = 0,
        cache: int = -1,
        window: int = 0,
        window_positive: float = 0.75,
    ) -> None:
        if input not in INPUTS:
            raise ConfigError(f"model.input: {input!r} is not one of {', '.join(INPUTS)}")
        self.pre_dir = Path(pre_dir)
        self.data = DataDir(self.pre_dir)
        self.split = split
        self.input = input
        self.augment = augment
        self.window, self.window_positive = int(window), float(window_positive)
        self.coco = self.data.coco(split)
        self._cache = _LRU(cache)
        by_image: dict[int, list[dict[str, Any]]] = {}
        for a in self.coco["annotations"]:
            by_image.setdefault(int(a["image_id"]), []).append(a)
        self._anns = by_image
        images = sorted(self.coco["images"], key=lambda im: int(im["id"]))
        positives = [im for im in images if self.has_cmb(im)]
        negatives = [im for im in images if not self.has_cmb(im)]
        if negatives_ratio is not None and negatives:
            n = min(len(negatives), round(negatives_ratio * len(positives)))
            pick = np.random.default_rng(seed).choice(len(negatives), size=n, replace=False)
            negatives = [negatives[i] for i in sorted(pick.tolist())]
        self.images: list[dict[str, Any]] = sorted(positives + negatives, key=lambda im: int(im["id"]))
        self.n_positive = len(positives)
        self.n_negative = len(negatives)

    def has_cmb(self, im: dict[str, Any]) -> bool:
        """Whether COCO image ``im`` holds a CMB (an annotation, or ``has_cmb`` set by preprocessing)."""
        return bool(self._anns.get(int(im["id"]))) or bool(im.get("has_cmb", False))

    def __len__(self) -> int:
        return len(self.images)

    def _slice_path(self, im: dict[str, Any], z: int) -> Path:
        own = self.data.image_path(im["file_name"])
        if z == int(im.get("slice_index", z)):
            return own
        return own.parent / f"z{z:04d}{own.suffix}"  # neighbours share the slice's format (png or jpg)

    def load_image(self, index: int) -> Tensor:
        """Image ``index`` of the pool as float32 [3, H, W] in [0, 1] (no augmentation)."""
        im = self.images[index]
        if self.input == "gray3":
            a = self._cache.get(self._slice_path(im, int(im.get("slice_index", 0))))
            t = torch.from_numpy(a).float().div_(255.0)
            return t.unsqueeze(0).expand(3, -1, -1).contiguous()
        if "slice_index" not in im or "n_slices" not in im:
            raise InputError(
                f"{self.data.split_path(self.split)}: image {im['id']} lacks "
                "slice_index/n_slices needed for input '2.5d'"
            )
        z, n = int(im["slice_index"]), int(im["n_slices"])
        zs = [min(max(k, 0), n - 1) for k in (z - 1, z, z + 1)]
        chans = [self._cache.get(self._slice_path(im, k)) for k in zs]
        return torch.from_numpy(np.stack(chans)).float().div_(255.0)

    def target(self, index: int) -> Target:
        """Ground truth of image ``index``: boxes [N,4] xyxy px, labels [N] int64, image_id int."""
        im = self.images[index]
        anns = self._anns.get(int(im["id"]), [])
        boxes = coco_boxes_xyxy(anns)
        return {
            "boxes": boxes,
            "labels": torch.ones(boxes.shape[0], dtype=torch.int64),
            "image_id": int(im["id"]),
        }

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, Target]:
        """``key``: an index, or ``(index, draw_seed)`` from :class:`InfiniteSampler` (seeds augmentation)."""
        if isinstance(key, (tuple, list)):
            index, seed = int(key[0]), int(key[1])
        else:
            index, seed = int(key), None
        image, target = self.load_image(index), self.target(index)
        if self.augment is not None:
            if hasattr(self.augment, "seeded_apply"):
                image, boxes, labels = self.augment.seeded_apply(
                    image, target["boxes"], target["labels"], seed=seed
                )
            else:
                image, boxes = self.augment(image, target["boxes"])
                labels = torch.ones(boxes.shape[0], dtype=torch.int64)
            target = {**target, "boxes": boxes.reshape(-1, 4).float(), "labels": labels}
        if self.window:
            s = seed if seed is not None else int(torch.randint(2**31, (1,)).item())
            g = torch.Generator().manual_seed((s * 6364136223846793005 + 1442695040888963407) % 2**63)
            image, boxes, labels = random_window(
                image, target["boxes"], target["labels"], self.window, g, self.window_positive
            )
            target = {**target, "boxes": boxes, "labels": labels}
        return image, target


def collate_fn(batch: list[tuple[Tensor, Target]]) -> tuple[list[Tensor], list[Target]]:
    """Keep images and targets as lists (the detector takes ``list[Tensor[3,H,W]]``)."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


def targets_to(targets: list[Target], device: torch.device) -> list[Target]:
    """Targets with their tensors moved to ``device`` (non-blocking)."""
    return [
        {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
        for t in targets
    ]


def window_px(model_cfg: ModelConfig, ds: SliceDataset) -> int:
    """Training-window side in slice pixels for ``model.train_crop`` (0: whole slices).

    A window of ``train_crop * W / size`` px is resized to ``train_crop`` network px, the pixel scale of a
    whole ``W``-px slice at ``size``. All images of the split must share one square size.
    """
    if not model_cfg.train_crop:
        return 0
    sizes = {(int(im["width"]), int(im["height"])) for im in ds.images}
    if len(sizes) != 1 or len({*next(iter(sizes))}) != 1:
        raise InputError(f"{ds.data.split_path(ds.split)}: model.train_crop needs square slices of "
                         f"one size, found {sorted(sizes)[:4]}")
    side = next(iter(sizes))[0]
    return max(1, round(model_cfg.train_crop * side / model_cfg.size))


def training_dataset(cfg: Config, pre_dir: Path | str, *, augment: bool = True,
                     negatives: bool = True) -> SliceDataset:
    """The train split of ``pre_dir`` as training draws it (the one place that builds it): ``model.input``,
    ``augment`` section (when enabled), ``train.negatives_ratio`` CMB-free slices drawn with ``train.seed``,
    ``train.cache`` and the ``model.train_crop`` window (:func:`window_px`).

    ``augment=False`` leaves augmentation off, ``negatives=False`` keeps only CMB slices (a fixed batch for
    timing a training step)."""
    tc = cfg.train
    aug = build_augment(cfg.augment) if augment and cfg.augment.enabled else None
    ds = SliceDataset(pre_dir, "train", input=cfg.model.input, augment=aug,
                      negatives_ratio=tc.negatives_ratio if negatives else 0, seed=tc.seed, cache=tc.cache)
    ds.window = window_px(cfg.model, ds)
    return ds


VAL_SUBSET_SEED = 0  # one fixed subset for every run (seed, arm) validated on the same PRE folder


def _largest_remainder(n: int, sizes: list[int]) -> list[int]:
    """``n`` split over strata of ``sizes`` in proportion (largest remainder, ties by order), each <= size."""
    total = sum(sizes)
    quota = [n * k / total for k in sizes]
    out = [int(q) for q in quota]
    order = sorted(range(len(sizes)), key=lambda i: (-(quota[i] - out[i]), i))
    for i in order[: n - sum(out)]:
        out[i] += 1
    return out


def val_subset(ds: SliceDataset, n: int, seed: int = VAL_SUBSET_SEED) -> SliceDataset:
    """A fixed subset of ``n`` slices of ``ds`` for in-loop validation (``ds`` itself when ``n`` <= 0 or
    ``n`` >= ``len(ds)``).

    Stratified slices, not whole patients: the strata are (patient, CMB slice / CMB-free slice), ``n`` is
    apportioned to them in proportion to their sizes (largest remainder) and each stratum's slices are drawn
    without replacement by a ``numpy`` generator seeded with ``seed``. Every patient and the split's CMB to
    CMB-free ratio stay represented: CMB counts per patient are very skewed (negative binomial), so a subset
    of whole patients would hold a lesion mix, and an AP, that may differ much from the whole split's, while a
    stratified subset's AP estimates the whole split's. The copy shares ``ds``'s image cache; its ``coco``
    holds only the chosen images and their annotations. Deterministic in ``(ds, n, seed)``.
    """
    if n <= 0 or n >= len(ds):
        return ds
    strata: dict[tuple[str, bool], list[int]] = {}
    for i, im in enumerate(ds.images):
        strata.setdefault((str(im.get("patient_id", "")), ds.has_cmb(im)), []).append(i)
    keys = sorted(strata)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for key, k in zip(keys, _largest_remainder(n, [len(strata[key]) for key in keys])):
        members = strata[key]
        chosen += [members[j] for j in rng.choice(len(members), size=k, replace=False).tolist()]
    sub = copy.copy(ds)
    sub.images = [ds.images[i] for i in sorted(chosen)]
    ids = {int(im["id"]) for im in sub.images}
    sub.coco = {**ds.coco, "images": list(sub.images),
                "annotations": [a for a in ds.coco["annotations"] if int(a["image_id"]) in ids]}
    sub.n_positive = sum(ds.has_cmb(im) for im in sub.images)
    sub.n_negative = len(sub.images) - sub.n_positive
    return sub


def draw_seed(seed: int, position: int) -> int:
    """Seed of the augmentation of draw ``position`` of the sample stream of run ``seed`` (63-bit int)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(position)]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


class InfiniteSampler(Sampler):
    """Endless batches of ``(index, draw_seed)`` for iteration-based training, sharded for DDP.

    The global stream concatenates permutations of ``range(n)`` (epoch ``e`` uses ``numpy`` generator
    ``(seed, e)``); global batch ``b`` holds stream positions ``[b*B, (b+1)*B)`` with ``B = batch_size *
    world_size``; rank ``r`` gets positions ``b*B + r*batch_size + [0, batch_size)``. ``start_batch`` skips
    the first batches (resume: the iteration to continue from).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
    ) -> None:
        if n < 1:
            raise ValueError("InfiniteSampler: empty data set")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms[epoch] = np.random.default_rng([int(self.seed) & 0xFFFFFFFF, epoch]).permutation(
                self.n
            )
            while len(self._perms) > 2:
                self._perms.popitem(last=False)
        return self._perms[epoch]

    def item(self, position: int) -> tuple[int, int]:
        """``(index, draw_seed)`` at global stream ``position``."""
        epoch, k = divmod(position, self.n)
        return int(self._perm(epoch)[k]), draw_seed(self.seed, position)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        global_b = self.batch_size * self.world_size
        b = self.start_batch
        while True:
            first = b * global_b + self.rank * self.batch_size
            yield [self.item(first + j) for j in range(self.batch_size)]
            b += 1

    def __len__(self) -> int:  # pragma: no cover - endless; DataLoader only needs it for len()
        return 2**62

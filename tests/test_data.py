"""SliceDataset over a tiny hand-made PRE folder: shapes, 2.5d neighbours, negatives, sampler, errors.

``make_pre`` builds the fixture folder (also imported by test_train.py and test_predict.py): 64x64 8-bit PNGs
of a bright disc ("brain") with dark round blobs ("CMBs") and COCO files following docs/design.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmbfe.augment import build_augment
from cmbfe.config import AugmentConfig
from cmbfe.data import InfiniteSampler, SliceDataset, collate_fn
from cmbfe.io import InputError

SIZE = 64


def _slice(rng: np.random.Generator, blobs: list[tuple[float, float, float]]) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    img = np.where((yy - 32) ** 2 + (xx - 32) ** 2 < 29**2, 170.0, 10.0)
    img += rng.normal(0, 4, img.shape)
    for cx, cy, r in blobs:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r**2] = 25.0
    return np.clip(img, 0, 255).astype(np.uint8)


def make_pre(
    root: Path, patients: dict[str, list[str]] | None = None, n_slices: int = 6, seed: int = 0
) -> Path:
    """Write ``root/pre`` with ``images/PATIENT/z%04d.png`` and ``annotations/{split}.json``; return it.

    ``patients`` maps split -> patient ids. In every patient, even slices hold 1-2 blobs (radius 3-4 px),
    odd slices none.
    """
    patients = patients or {"train": ["P01", "P02", "P03"], "val": ["P04"], "test": ["P05"]}
    rng = np.random.default_rng(seed)
    pre = Path(root) / "pre"
    img_id = ann_id = 0
    for split, pids in patients.items():
        coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "cmb"}]}
        for pid in pids:
            (pre / "images" / pid).mkdir(parents=True, exist_ok=True)
            for z in range(n_slices):
                img_id += 1
                blobs = []
                if z % 2 == 0:
                    for _ in range(int(rng.integers(1, 3))):
                        r = float(rng.uniform(3, 4))
                        blobs.append((float(rng.uniform(14, 50)), float(rng.uniform(14, 50)), r))
                Image.fromarray(_slice(rng, blobs)).save(pre / "images" / pid / f"z{z:04d}.png")
                coco["images"].append(
                    {
                        "id": img_id,
                        "file_name": f"{pid}/z{z:04d}.png",
                        "width": SIZE,
                        "height": SIZE,
                        "patient_id": pid,
                        "slice_index": z,
                        "n_slices": n_slices,
                        "pixel_spacing_mm": [0.94, 0.94],
                        "slice_mm": 2.0,
                        "has_cmb": bool(blobs),
                        "mimic_kinds": [],
                    }
                )
                for cx, cy, r in blobs:
                    ann_id += 1
                    coco["annotations"].append(
                        {
                            "id": ann_id,
                            "image_id": img_id,
                            "category_id": 1,
                            "bbox": [cx - r, cy - r, 2 * r, 2 * r],
                            "area": 4 * r * r,
                            "iscrowd": 0,
                            "lesion_id": ann_id,
                        }
                    )
        (pre / "annotations").mkdir(parents=True, exist_ok=True)
        (pre / "annotations" / f"{split}.json").write_text(json.dumps(coco))
    return pre


@pytest.fixture(scope="module")
def pre(tmp_path_factory) -> Path:
    return make_pre(tmp_path_factory.mktemp("data"))


def test_gray3_shapes_and_targets(pre):
    ds = SliceDataset(pre, "train")
    assert len(ds) == 18 and ds.n_positive == 9 and ds.n_negative == 9
    for i in range(len(ds)):
        img, t = ds[i]
        assert img.shape == (3, SIZE, SIZE) and img.dtype == torch.float32
        assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
        assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
        assert t["boxes"].shape[1] == 4 and t["boxes"].dtype == torch.float32
        assert t["labels"].dtype == torch.int64 and len(t["labels"]) == len(t["boxes"])
        assert isinstance(t["image_id"], int)
        if t["image_id"] % 2 == 0:  # odd slices (z = 1, 3, 5) have even ids here: no CMB
            assert t["boxes"].shape == (0, 4)
        else:
            assert len(t["boxes"]) >= 1
            x0, y0, x1, y1 = t["boxes"][0].tolist()
            centre = img[0, int((y0 + y1) / 2), int((x0 + x1) / 2)]
            assert centre < 0.2  # the box sits on a dark blob


def test_25d_stacks_neighbours_and_clamps(pre):
    g = SliceDataset(pre, "val")
    d = SliceDataset(pre, "val", input="2.5d")
    by_z = {im["slice_index"]: i for i, im in enumerate(d.images)}
    n = len(by_z)
    for z, i in by_z.items():
        img = d[i][0]
        assert img.shape == (3, SIZE, SIZE)
        for c, k in enumerate((z - 1, z, z + 1)):
            k = min(max(k, 0), n - 1)
            assert torch.equal(img[c], g[by_z[k]][0][0])


def test_25d_neighbours_of_jpg_slices(pre, tmp_path):
    jpg = tmp_path / "pre"
    for png in (pre / "images").rglob("*.png"):
        out = jpg / "images" / png.relative_to(pre / "images")
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(png).save(out.with_suffix(".jpg"), quality=95)
    (jpg / "annotations").mkdir()
    for f in (pre / "annotations").glob("*.json"):
        coco = json.loads(f.read_text())
        for im in coco["images"]:
            im["file_name"] = im["file_name"].replace(".png", ".jpg")
        (jpg / "annotations" / f.name).write_text(json.dumps(coco))
    g = SliceDataset(jpg, "val")
    d = SliceDataset(jpg, "val", input="2.5d")
    by_z = {im["slice_index"]: i for i, im in enumerate(d.images)}
    for z, i in by_z.items():
        k = min(z + 1, len(by_z) - 1)
        assert torch.equal(d[i][0][2], g[by_z[k]][0][0])  # the next slice, read from its .jpg


def test_negatives_sampled_deterministically(pre):
    a = SliceDataset(pre, "train", negatives_ratio=0.5, seed=3)
    b = SliceDataset(pre, "train", negatives_ratio=0.5, seed=3)
    c = SliceDataset(pre, "train", negatives_ratio=0.5, seed=4)
    ids = [im["id"] for im in a.images]
    assert ids == [im["id"] for im in b.images]
    assert a.n_positive == 9 and a.n_negative == round(0.5 * 9)
    assert len(c) == len(a)
    assert SliceDataset(pre, "train", negatives_ratio=0.0).n_negative == 0
    assert SliceDataset(pre, "train", negatives_ratio=10.0).n_negative == 9


def test_augmented_sample_reproducible_by_draw_seed(pre):
    ds = SliceDataset(pre, "train", augment=build_augment(AugmentConfig(p_affine=1.0, p_blur=1.0)))
    i1, t1 = ds[(0, 123)]
    i2, t2 = ds[(0, 123)]
    i3, _ = ds[(0, 124)]
    assert torch.equal(i1, i2) and torch.equal(t1["boxes"], t2["boxes"])
    assert not torch.equal(i1, i3)
    assert len(t1["labels"]) == len(t1["boxes"])


def test_sampler_shards_and_resumes():
    s = InfiniteSampler(10, 3, seed=1)
    it = iter(s)
    first = [next(it) for _ in range(7)]  # 21 draws: wraps past two epochs
    idx = [i for b in first for i, _ in b]
    assert sorted(idx[:10]) == list(range(10)) and sorted(idx[10:20]) == list(range(10))
    assert next(iter(InfiniteSampler(10, 3, seed=1, start_batch=4))) == first[4]
    r0 = iter(InfiniteSampler(10, 3, seed=1, rank=0, world_size=2))
    r1 = iter(InfiniteSampler(10, 3, seed=1, rank=1, world_size=2))
    glob = iter(InfiniteSampler(10, 6, seed=1))
    for _ in range(3):
        assert next(r0) + next(r1) == next(glob)
    seeds = [sd for b in first for _, sd in b]
    assert len(set(seeds)) == len(seeds)


def test_collate_and_cache(pre):
    ds = SliceDataset(pre, "test", cache=2)
    images, targets = collate_fn([ds[0], ds[1], ds[2]])
    assert len(images) == 3 and len(targets) == 3
    assert len(ds._cache._d) == 2
    assert torch.equal(ds[0][0], images[0])


def test_missing_files_named(pre, tmp_path):
    with pytest.raises(InputError, match=r"annotations/nope.json"):
        SliceDataset(pre, "nope")
    broken = make_pre(tmp_path, {"train": ["X1"]}, n_slices=2)
    (broken / "images" / "X1" / "z0001.png").unlink()
    ds = SliceDataset(broken, "train")
    with pytest.raises(InputError, match=r"X1/z0001.png"):
        [ds[i] for i in range(len(ds))]
    with pytest.raises(InputError, match=r"X1/z0001.png"):
        SliceDataset(broken, "train", input="2.5d")[0]


def test_batches_independent_of_workers(pre):
    from torch.utils.data import DataLoader

    ds = SliceDataset(pre, "train", augment=build_augment(AugmentConfig(p_affine=1.0)))

    def first_batches(workers):
        sampler = InfiniteSampler(len(ds), 3, seed=5, start_batch=2)
        it = iter(DataLoader(ds, batch_sampler=sampler, num_workers=workers, collate_fn=collate_fn))
        return [next(it) for _ in range(2)]

    for (ia, ta), (ib, tb) in zip(first_batches(0), first_batches(2)):
        assert all(torch.equal(a, b) for a, b in zip(ia, ib))
        assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(ta, tb))


def test_window_samples_are_reproducible_and_window_sized(pre):
    ds = SliceDataset(pre, "train", augment=build_augment(AugmentConfig()), negatives_ratio=0, window=32)
    a, ta = ds[(0, 11)]
    b, tb = ds[(0, 11)]
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])
    assert ((ta["boxes"] >= 0) & (ta["boxes"] <= 32)).all() and len(ta["boxes"]) == len(ta["labels"])
    shapes = {ds[(i, i)][0].shape for i in range(len(ds))}
    assert shapes == {(3, 32, 32)}


def test_training_dataset_is_the_training_pool(pre):
    from cmbfe import config as C
    from cmbfe.data import training_dataset

    cfg = C.load(None, ["model.size=256", "model.train_crop=128", "train.negatives_ratio=0.5",
                        "train.seed=3"])
    ds = training_dataset(cfg, pre)
    ref = SliceDataset(pre, "train", negatives_ratio=0.5, seed=3)
    assert [im["id"] for im in ds.images] == [im["id"] for im in ref.images] and ds.n_negative > 0
    assert ds.window == 32 and ds.augment is not None  # 128 network px of a 256-px input, 64-px slices
    plain = training_dataset(cfg, pre, augment=False, negatives=False)
    assert plain.augment is None and plain.n_negative == 0 and plain.window == 32
    image, target = plain[(0, 0)]
    assert image.shape == (3, 32, 32) and target["boxes"].shape[1] == 4


def test_val_subset_is_fixed_and_stratified_by_patient_and_cmb(tmp_path):
    from collections import Counter

    from cmbfe.data import val_subset

    root = make_pre(tmp_path, {"val": ["P01", "P02", "P03"]})  # 3 patients x (3 CMB + 3 CMB-free slices)
    ds = SliceDataset(root, "val")
    sub = val_subset(ds, 8)
    assert len(sub) == 8 and sub is not ds and len(ds) == 18  # the split itself is untouched
    strata = Counter((im["patient_id"], ds.has_cmb(im)) for im in sub.images)
    assert len(strata) == 6 and set(strata.values()) == {1, 2}  # 8 over 6 strata of 3: 1 or 2 each
    assert sub.n_positive + sub.n_negative == 8 and abs(sub.n_positive - sub.n_negative) <= 2
    ids = [im["id"] for im in sub.images]
    assert ids == sorted(ids) and ids == [im["id"] for im in val_subset(ds, 8).images]  # deterministic
    assert [im["id"] for im in sub.coco["images"]] == ids
    want = [a["id"] for a in ds.coco["annotations"] if a["image_id"] in set(ids)]
    assert [a["id"] for a in sub.coco["annotations"]] == want and want
    img, t = sub[0]  # loads like the split: the same images, the shared cache
    assert t["image_id"] == ids[0] and torch.equal(img, ds[[im["id"] for im in ds.images].index(ids[0])][0])
    assert sub._cache is ds._cache
    assert val_subset(ds, 0) is ds and val_subset(ds, 18) is ds and val_subset(ds, 100) is ds
    assert any(a != b for a, b in zip(ids, [im["id"] for im in val_subset(ds, 8, seed=1).images]))

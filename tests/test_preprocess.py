"""Tests of cmbfe.preprocess (N4, normalisation, split, PRE layout, COCO, CLI) and Table 1 on tiny cohorts."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from pycocotools.coco import COCO

from cmbfe import config
from cmbfe.cli import main as cli_main
from cmbfe.datadir import DataDir
from cmbfe.dicom_write import write_dicom_series
from cmbfe.io import InputError
from cmbfe.preprocess import (
    SPLITS,
    head_mask,
    n4,
    normalise,
    preprocess_cohort,
    split_patients,
)
from cmbfe.study.report import box_size_table, table1
from cmbfe.study.tables import write_table
from cmbfe.volume import Lesion, Volume

NZ, N = 10, 48
AFFINE = np.diag([0.9, 0.9, 2.0, 1.0])
LESION_COLS = ["lesion_id", "patient_id", "kind", "location", "i", "j", "k", "x_mm", "y_mm", "z_mm",
               "diameter_mm", "radius_true_mm", "dchi_ppm"]
MIMIC_COLS = ["mimic_id", *LESION_COLS[1:11]]


def phantom(seed: int, nz: int = NZ, n: int = N, bias: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """(data [k, j, i], head mask): an ellipsoidal head at 600 with a linear bias and Rician-like noise."""
    rng = np.random.default_rng(seed)
    _, j, i = np.mgrid[:nz, :n, :n].astype(np.float32)
    head = ((i - n / 2) / (0.4 * n)) ** 2 + ((j - n / 2) / (0.45 * n)) ** 2 < 1
    data = head * 600.0 * (1 + bias * (i / n - 0.5)) + rng.rayleigh(15, head.shape)
    return data.astype(np.float32), head


def make_patient(seed: int, pid: str, n_cmb: int) -> Volume:
    """CMBs on slices 2..4 (dark spheres), mimics (veins/calcifications) on slices 6..9."""
    data, _ = phantom(seed)
    rng = np.random.default_rng(seed + 100)
    lesions = [Lesion(m + 1, (float(rng.uniform(16, 32)), float(rng.uniform(16, 32)), float(2 + m % 3)),
                      float(rng.uniform(2.5, 4.0)), location="lobar") for m in range(n_cmb)]
    mimics = [Lesion(m + 1, (float(rng.uniform(16, 32)), float(rng.uniform(16, 32)), float(6 + m)), 3.0,
                     kind=("vein", "calcification")[m % 2], location="cortex") for m in range(4)]
    k, j, i = np.mgrid[:NZ, :N, :N]
    for o in lesions + mimics:
        ci, cj, ck = o.centre_vox
        r2 = ((i - ci) * 0.9) ** 2 + ((j - cj) * 0.9) ** 2 + ((k - ck) * 2) ** 2
        data[r2 <= (o.diameter_mm / 2) ** 2] = 80.0
    return Volume(np.round(data), AFFINE.copy(), pid, lesions, mimics)


def write_patient(raw: Path, vol: Volume) -> None:
    d = raw / vol.patient_id
    write_dicom_series(vol, d / "dicom", uid_seed=vol.patient_id)
    for name, objs, cols in (("lesions.csv", vol.lesions, LESION_COLS),
                             ("mimics.csv", vol.mimics, MIMIC_COLS)):
        rows = [[o.lesion_id, vol.patient_id, o.kind, o.location, *o.centre_vox, *vol.vox_to_mm(o.centre_vox),
                 o.diameter_mm, 0.5, 1.0][: len(cols)] for o in objs]
        pd.DataFrame(rows, columns=cols).to_csv(d / name, index=False)


def make_raw(raw: Path, n_patients: int = 6) -> Path:
    for p in range(n_patients):
        write_patient(raw, make_patient(p, f"SYN-{p + 1:04d}", n_cmb=0 if p == n_patients - 1 else 3 + p))
    return raw


def tiny_cfg(**pre) -> config.Config:
    sets = {"n4_iterations": [5, 5], "n4_shrink": 2, "workers": 1,
            "split_ratios": {"train": 3, "val": 1, "test": 2}}
    sets.update(pre)
    return config.from_dict({"preprocess": sets})


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return make_raw(tmp_path_factory.mktemp("raw") / "RAW")


@pytest.fixture(scope="module")
def pre(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "PRE"
    preprocess_cohort(raw, out, tiny_cfg(), progress=False)
    return out


# ---------------------------------------------------------------- building blocks


def test_n4_removes_a_smooth_bias():
    data, head = phantom(0, nz=12, bias=0.6)
    out = n4(data, (2.0, 0.9, 0.9), (10, 10), 2)
    cv = lambda x: x[head].std() / x[head].mean()
    assert out.shape == data.shape and out.dtype == np.float32
    assert cv(out) < 0.5 * cv(data)


def test_n4_thin_stacks_still_correct():
    for nz in (1, 3):  # ANTs alone is a no-op once shrinking leaves < 2 slices
        data, head = phantom(0, nz=nz, bias=0.6)
        out = n4(data, (2.0, 0.9, 0.9), (10, 10), 2)
        assert out[head].std() / out[head].mean() < 0.7 * data[head].std() / data[head].mean()


def test_head_mask_keeps_dark_interior_and_normalise_range():
    data, head = phantom(1)
    data[5, 20:24, 20:24] = 0.0  # a dark CMB-like hole inside the head
    m = head_mask(data)
    assert m[5, 21, 21] and not m[0, 0, 0]
    assert (m == head).mean() > 0.97
    u8 = normalise(data, m, (0.5, 99.5))
    assert u8.dtype == np.uint8 and u8.min() == 0 and u8.max() == 255


def test_split_58_patients_exact_and_stratified():
    pids = [f"P{i:02d}" for i in range(58)]
    has = {p: i % 10 != 0 for i, p in enumerate(pids)}  # 6 CMB-free patients
    s = split_patients(pids, has, {"train": 33, "val": 8, "test": 17}, seed=0)
    counts = {k: sum(v == k for v in s.values()) for k in SPLITS}
    assert counts == {"train": 33, "val": 8, "test": 17}
    for k in SPLITS:
        assert any(has[p] for p in pids if s[p] == k)
    assert s == split_patients(list(reversed(pids)), has, {"train": 33, "val": 8, "test": 17}, seed=0)
    assert s != split_patients(pids, has, {"train": 33, "val": 8, "test": 17}, seed=1)
    few = split_patients(pids[:5], {p: p == "P01" or p == "P02" or p == "P03" for p in pids[:5]},
                         {"train": 3, "val": 1, "test": 1}, seed=0)
    assert {few[p] for p in ("P01", "P02", "P03")} == set(SPLITS)  # every split gets a CMB patient


# ---------------------------------------------------------------- the PRE layout


def test_layout_and_images(pre, raw):
    assert sorted(p.name for p in pre.iterdir()) == ["annotations", "images", "lesions.csv", "mimics.csv",
                                                     "preprocess.json", "slice_objects.csv", "splits.csv"]
    assert sorted(p.name for p in (pre / "annotations").iterdir()) == [
        "test.json", "test_geometric.json", "train.json", "val.json", "val_geometric.json"]  # + geometric boxes
    for pid in ("SYN-0001", "SYN-0006"):
        files = sorted((pre / "images" / pid).iterdir())
        assert [f.name for f in files] == [f"z{k:04d}.png" for k in range(NZ)]
    lesions = pd.read_csv(pre / "lesions.csv")
    assert len(lesions) == sum(3 + p for p in range(5))
    assert {"radius_true_mm", "dchi_ppm"} <= set(lesions.columns)  # raw columns kept
    raw_les = pd.read_csv(raw / "SYN-0002" / "lesions.csv")
    mine = lesions[lesions["patient_id"] == "SYN-0002"].reset_index(drop=True)
    assert np.allclose(mine[["x_mm", "y_mm", "z_mm"]], raw_les[["x_mm", "y_mm", "z_mm"]], atol=1e-3)
    assert set(pd.read_csv(pre / "mimics.csv")["kind"]) == {"vein", "calcification"}
    meta = json.loads((pre / "preprocess.json").read_text())
    assert len(meta["patients"]) == 6 and meta["versions"]["pydicom"]
    assert all(p["seconds"]["n4"] >= 0 for p in meta["patients"])


def test_coco_validity(pre):
    splits = pd.read_csv(pre / "splits.csv")
    assert splits["patient_id"].is_unique
    assert splits["split"].value_counts().to_dict() == {"train": 3, "test": 2, "val": 1}
    objs = pd.read_csv(pre / "slice_objects.csv")
    all_ids, n_ann, patients_seen = set(), 0, {}
    for s in SPLITS:
        coco = COCO(str(pre / "annotations" / f"{s}.json"))
        ids = [im["id"] for im in coco.dataset["images"]]
        assert len(ids) == len(set(ids)) and not (set(ids) & all_ids)
        all_ids |= set(ids)
        for im in coco.dataset["images"]:
            patients_seen.setdefault(im["patient_id"], set()).add(s)
            assert (pre / "images" / im["file_name"]).is_file()
            assert {"patient_id", "slice_index", "n_slices", "pixel_spacing_mm", "slice_mm", "has_cmb",
                    "mimic_kinds", "width", "height"} <= set(im)
            assert im["has_cmb"] == bool(coco.getAnnIds(imgIds=im["id"]))
        for a in coco.dataset["annotations"]:
            w, h = a["bbox"][2:]
            assert w > 0 and h > 0 and a["category_id"] == 1 and a["iscrowd"] == 0 and "lesion_id" in a
        n_ann += len(coco.dataset["annotations"])
        pos = [im for im in coco.dataset["images"] if im["has_cmb"]]
        neg = [im for im in coco.dataset["images"] if not im["has_cmb"]]
        if s == "train":
            assert all(not im["has_cmb"] for im in neg)
        else:  # enough mimic-only slices exist: exactly as many negatives as CMB slices
            assert len(neg) == len(pos) > 0 and all(im["mimic_kinds"] for im in neg)
        ss = splits.set_index("patient_id")["split"]
        assert all(ss[im["patient_id"]] == s for im in coco.dataset["images"])
    assert all(len(v) == 1 for v in patients_seen.values())  # no patient in two splits
    assert n_ann == int((objs["kind"] == "cmb").sum())  # annotations = per-slice CMB boxes


def test_train_keeps_cmb_free_brain_slices(pre):
    train = json.loads((pre / "annotations" / "train.json").read_text())
    n_patients = len({im["patient_id"] for im in train["images"]})
    assert len(train["images"]) == n_patients * NZ  # every slice of this phantom is a brain slice


def test_table1(pre, tmp_path):
    t = table1(pre)
    assert list(t["split"]) == ["train", "val", "test", "total"]
    assert "patients (this run)" in t.columns and "CMBs (paper, private data)" in t.columns
    assert t.set_index("split").loc["total", "patients (this run)"] == 6
    assert t.set_index("split").loc["train", "CMBs (paper, private data)"] == 845
    total = t.set_index("split").loc["total"]
    assert total["boxes < 2 mm (this run)"] == 0  # annotator labels: no side below 2 mm
    # every true CMB of lesions.csv, boxed or not, per split (issue #17)
    les = pd.read_csv(DataDir(pre).lesions_csv)
    true, unboxed = "true 3D CMBs, lesions.csv (this run)", "true CMBs without a box (this run)"
    assert total[true] == len(les) and total[unboxed] == len(les) - total["3D CMBs (this run)"]
    share = "label model lesion sensitivity: boxed / true CMBs (this run)"
    assert total[share] == pytest.approx(round(total["3D CMBs (this run)"] / len(les), 4))
    one = table1(pre, ("test",))  # one split: no total row
    assert list(one["split"]) == ["test"] and one.iloc[0][true] == len(DataDir(pre).true_cmbs("test"))
    assert total["box side mm, median [IQR] (this run)"].count("[") == 1
    sizes = box_size_table(pre)
    assert {"as labelled", "geometric"} == set(sizes["labels"]) and set(sizes["split"]) == {"train", "val", "test"}
    lab = sizes[sizes["labels"] == "as labelled"]
    assert (lab["< 2 mm"] == 0).all() and (lab[["< 2 mm", "2-3 mm", "3-5 mm", "5-10 mm", ">= 10 mm"]].sum(axis=1)
                                            == lab["boxes"]).all()
    path = write_table(t, "table1_split", tmp_path, caption="Table 1")
    assert path.read_text().startswith("split,")
    assert (tmp_path / "table1_split.md").read_text().startswith("Table 1")


def test_deterministic_and_parallel(pre, raw, tmp_path):
    other = tmp_path / "PRE2"
    preprocess_cohort(raw, other, tiny_cfg(workers=2), progress=False)  # process pool this time
    files = sorted(p.relative_to(pre) for p in pre.rglob("*") if p.is_file() and p.name != "preprocess.json")
    assert files == sorted(p.relative_to(other) for p in other.rglob("*")
                           if p.is_file() and p.name != "preprocess.json")
    for f in files:
        assert (pre / f).read_bytes() == (other / f).read_bytes(), f


def test_unlabelled_dicom_and_jpg(raw, tmp_path):
    src = tmp_path / "plain"
    for pid in ("SYN-0001", "SYN-0002"):
        shutil.copytree(raw / pid / "dicom", src / f"case{pid[-1]}")  # DICOM files directly in the folder
    out = tmp_path / "PRE"
    s = preprocess_cohort(src, out, tiny_cfg(image_format="jpg"), progress=False)
    assert s["mode"] == "dicom" and not (out / "splits.csv").exists()
    coco = json.loads((out / "annotations" / "all.json").read_text())
    assert len(coco["images"]) == 2 * NZ and coco["annotations"] == []
    assert "SYN-000" not in (out / "annotations" / "all.json").read_text()  # ids from folders, not PatientID
    assert (out / "images" / "case1" / "z0000.jpg").is_file()
    with pytest.raises(InputError, match="splits.csv"):
        table1(out)


def _boxes_by_patient(pre: Path) -> dict[tuple[str, int], list]:
    out: dict[tuple[str, int], list] = {}
    for split in SPLITS:
        coco = json.loads((pre / "annotations" / f"{split}.json").read_text())
        im = {i["id"]: (i["patient_id"], i["slice_index"]) for i in coco["images"]}
        for a in coco["annotations"]:
            out.setdefault(im[a["image_id"]], []).append([round(v, 4) for v in a["bbox"]])
    return {k: sorted(v) for k, v in out.items()}


def test_centroid_list_labels_dicom_folders(raw, pre, tmp_path):
    src, rows = tmp_path / "plain", []
    pids = ("SYN-0001", "SYN-0002", "SYN-0003", "SYN-0006")  # SYN-0006 has no CMB: absent from the list
    for pid in pids:
        shutil.copytree(raw / pid / "dicom", src / pid)
        les = pd.read_csv(raw / pid / "lesions.csv")
        rows += [{"patient": pid, "x": r.i, "y": r.j, "z": r.k, "x_mm": r.x_mm, "y_mm": r.y_mm, "z_mm": r.z_mm,
                  "diameter_mm": r.diameter_mm} for r in les.itertuples()]
    df = pd.DataFrame(rows)
    df[["patient", "x", "y", "z", "diameter_mm"]].to_csv(tmp_path / "vox.csv", index=False)
    df[["patient", "x_mm", "y_mm", "z_mm", "diameter_mm"]].rename(
        columns={"x_mm": "x", "y_mm": "y", "z_mm": "z"}).to_csv(tmp_path / "mm.csv", index=False)
    want = {k: v for k, v in _boxes_by_patient(pre).items() if k[0] in pids}
    for name, units in (("vox", "vox"), ("mm", "mm")):
        out = tmp_path / f"PRE-{name}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = preprocess_cohort(src, out, tiny_cfg(), progress=False, centroids=tmp_path / f"{name}.csv",
                                  centroid_units=units)
        assert s["mode"] == "centroids" and sum(s["splits"].values()) == len(pids)
        assert _boxes_by_patient(out) == want  # the same boxes as from the synthetic lesions.csv
    args = ["preprocess", "--input", str(src), "--out", str(tmp_path / "PRE-cli"), "--no-progress",
            "--centroids", str(tmp_path / "mm.csv"), "--centroid-units", "mm",
            "--set", "preprocess.n4_iterations=[3]", "--set", "preprocess.workers=1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli_main(args) == 0
    assert _boxes_by_patient(tmp_path / "PRE-cli") == want
    # a patient the folder lacks, and a centroid outside the volume: named, nothing written
    df.loc[[0], ["patient", "x", "y", "z"]].assign(patient="nobody").to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(InputError, match="nobody"):
        preprocess_cohort(src, tmp_path / "PRE-bad", tiny_cfg(), progress=False, centroids=tmp_path / "bad.csv")
    pd.DataFrame([{"patient": "SYN-0002", "x": 5, "y": 5, "z": 99}]).to_csv(tmp_path / "out.csv", index=False)
    with pytest.raises(InputError, match="row 1.*outside"):
        preprocess_cohort(src, tmp_path / "PRE-bad", tiny_cfg(), progress=False, centroids=tmp_path / "out.csv")
    assert not (tmp_path / "PRE-bad").exists()
    with pytest.raises(InputError, match="DICOM folders without lesions.csv"):
        preprocess_cohort(raw, tmp_path / "PRE-bad", tiny_cfg(), progress=False, centroids=tmp_path / "vox.csv")


def test_valdo_cohort(tmp_path):
    aff = np.diag([-0.9, 0.9, 2.0, 1.0])
    for s, sub in enumerate(("sub-101", "sub-102")):
        data, _ = phantom(s)
        img = np.transpose(data, (2, 1, 0))[::-1].copy()
        mask = np.zeros(img.shape, np.uint8)
        mask[20:23, 20:23, 3:5] = 1
        d = tmp_path / "valdo" / sub
        d.mkdir(parents=True)
        nib.save(nib.Nifti1Image(img, aff), d / f"{sub}_space-T2S_desc-masked_T2S.nii.gz")
        nib.save(nib.Nifti1Image(mask, aff), d / f"{sub}_space-T2S_CMB.nii.gz")
    out = tmp_path / "PRE"
    cfg = tiny_cfg(split_ratios={"train": 1, "val": 0, "test": 1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = preprocess_cohort(tmp_path / "valdo", out, cfg, progress=False)
    msgs = [str(w.message) for w in caught]
    assert "split val has no patients" in msgs and any("mimic-only negative" in m for m in msgs)
    assert s["mode"] == "valdo" and s["splits"] == {"train": 1, "val": 0, "test": 1}
    train = json.loads((out / "annotations" / "train.json").read_text())
    boxes = sorted(a["bbox"] for a in train["annotations"])
    assert boxes == [[20.0, 25.0, 3.0, 3.0]] * 2  # NIfTI x 20..22 -> i; y 20..22 -> rows 47-22..47-20


# ---------------------------------------------------------------- CLI and bad input


def test_cli_success_and_refusals(raw, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(config, "REPO_ROOT", tmp_path / "repo")  # where results/, figures/, runs/ would go
    out = tmp_path / "out" / "PRE"
    args = ["preprocess", "--input", str(raw), "--out", str(out), "--no-progress",
            "--set", "preprocess.n4_iterations=[3]", "--set", "preprocess.workers=1"]
    assert cli_main(args) == 0
    assert "patients per split" in capsys.readouterr().out
    # the command writes under --out only: nothing beside it, nothing in the package's tree
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.parent.iterdir()] == ["PRE"]
    assert cli_main(args) == 2  # exists: refused without --overwrite
    assert cli_main([*args, "--overwrite"]) == 0
    assert cli_main([*args, "--overwrite", "--set", "preprocess.nope=1"]) == 2
    assert cli_main([*args, "--overwrite", "--set", "preprocess.n4_shrink=0"]) == 2


def test_cli_bad_input_leaves_nothing(raw, tmp_path):
    bad = tmp_path / "RAW"
    shutil.copytree(raw, bad)
    (bad / "SYN-0003" / "dicom" / "IM_0004.dcm").write_bytes(b"garbage, not DICOM")
    out = tmp_path / "out" / "PRE"
    args = ["preprocess", "--input", str(bad), "--out", str(out), "--no-progress",
            "--set", "preprocess.n4_iterations=[3]", "--set", "preprocess.workers=1"]
    assert cli_main(args) == 2
    assert not out.exists() and list(out.parent.iterdir()) == []
    empty = ["preprocess", "--input", str(tmp_path / "empty"), "--out", str(out), "--no-progress"]
    assert cli_main(empty) == 2  # no such folder
    (tmp_path / "empty").mkdir()
    assert cli_main(empty) == 2  # no patient folder in it
    assert not out.exists()
    # skipping the bad file: a warning, and the (now gapped) series is refused rather than mis-placed
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert cli_main([*args, "--on-bad-file", "skip"]) == 2
    assert not out.exists()
    (bad / "SYN-0003" / "dicom" / "IM_0004.dcm").unlink()
    (bad / "SYN-0004" / "lesions.csv").unlink()
    with pytest.raises(InputError, match="lesions.csv missing for SYN-0004"):
        preprocess_cohort(bad, out, tiny_cfg(), progress=False)


def test_geometric_label_option_keeps_sphere_cross_sections(raw, tmp_path):
    out = tmp_path / "PRE_geo"
    preprocess_cohort(raw, out, tiny_cfg(labels="geometric"), progress=False)
    assert sorted(p.name for p in (out / "annotations").iterdir()) == ["test.json", "train.json", "val.json"]
    les = pd.read_csv(out / "lesions.csv").set_index(["patient_id", "lesion_id"])["diameter_mm"]
    for s in SPLITS:
        coco = json.loads((out / "annotations" / f"{s}.json").read_text())
        pid = {im["id"]: im["patient_id"] for im in coco["images"]}
        for a in coco["annotations"]:  # spheres centred on a slice: the box is the full diameter there
            assert a["bbox"][2] == pytest.approx(les[(pid[a["image_id"]], a["lesion_id"])] / 0.9, abs=1e-3)

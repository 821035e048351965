"""Preprocessing (paper section 2.1): N4 bias correction, 8-bit slices, patient-level split, COCO files.

``cmbfe preprocess --input RAW --out PRE`` writes the PRE layout of docs/design.md. RAW may be
- the synthetic layout (``RAW/<patient>/dicom/*.dcm`` + ``lesions.csv`` [+ ``mimics.csv``]);
- any folder of DICOM series, one sub-folder per patient (``<patient>/*.dcm`` or ``<patient>/dicom/``),
  without labels: images only, plus ``annotations/all.json`` listing every slice (no boxes);
- VALDO pairs (``sub-XXX_space-T2S_desc-masked_T2S.nii.gz`` + ``sub-XXX_space-T2S_CMB.nii.gz``);
- a folder of DICOM series as above plus a centroid list (``--centroids CSV``: ``patient, x, y, z``
  [, ``diameter_mm``], patient = folder name, voxel or mm coordinates): labelled, each CMB a sphere
  of its diameter (default 5 mm) around its centroid; patients absent from the list have no CMBs.
Output patient ids are the folder (or VALDO subject) names, never DICOM tags (PHI).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cmbfe import config
from cmbfe.boxes import xyxy_to_xywh
from cmbfe.config import Config, PreprocessConfig
from cmbfe.datadir import SPLITS, DataDir, split_name
from cmbfe.errors import InputError
from cmbfe.io import _read_csv, find_valdo_pairs, load_patient, read_centroids, read_dicom_series, read_valdo
from cmbfe.labels import lesion_boxes
from cmbfe.runtime import package_versions
from cmbfe.utils import atomic_path, atomic_write_json
from cmbfe.volume import Volume

LESION_COLUMNS = ["lesion_id", "patient_id", "kind", "location", "i", "j", "k", "x_mm", "y_mm", "z_mm",
                  "diameter_mm"]
MIMIC_COLUMNS = ["mimic_id", *LESION_COLUMNS[1:]]
# N4's output depends (in the last bits) on ITK's thread count, which ITK fixes at its first use in a
# process: one thread per process makes PRE byte-identical on every machine; workers give parallelism.
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")


def otsu_threshold(x: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of the values ``x`` (a 256-bin histogram)."""
    x = np.asarray(x, float).ravel()
    hist, edges = np.histogram(x, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = w0 * w1 * (m0 / w0 - (m0[-1] - m0) / w1) ** 2
    if not (w1 > 0).any():
        return float(x.min())
    return float(centres[int(np.nanargmax(np.where(w1 > 0, var, np.nan)))])


def head_mask(data: np.ndarray) -> np.ndarray:
    """Boolean head mask ``[slice, row, col]``: Otsu threshold, in-plane opening, the largest 3D
    component, holes filled slice by slice (dark CMBs, veins and sinuses inside the head stay in)."""
    from scipy import ndimage

    m = data > otsu_threshold(data[:: max(1, data.shape[0] // 16)])
    m = ndimage.binary_opening(m, structure=np.ones((1, 3, 3), bool))
    lab, n = ndimage.label(m)
    if n == 0:
        return np.ones(data.shape, bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    m = lab == int(np.argmax(sizes))
    for k in range(m.shape[0]):
        m[k] = ndimage.binary_fill_holes(m[k])
    return m


def n4(vol_data: np.ndarray, spacing: tuple[float, float, float], iterations: tuple[int, ...] | list[int],
       shrink: int, mask: np.ndarray | None = None) -> np.ndarray:
    """ANTs N4 bias-field correction of ``vol_data`` ``[slice, row, col]`` (spacing ``(dz, dy, dx)`` mm).

    ``iterations`` per fitting level (e.g. ``(20, 20, 10)``), ``shrink`` the ANTs shrink factor, tolerance
    1e-7. The field is fitted inside ``mask`` (default :func:`head_mask`) and divided out of the whole
    volume (float32 out, same intensity scale). Thin stacks: the shrink factor is lowered so >= 3 shrunk
    slices remain (ANTs silently does nothing otherwise); 1-2 slices are corrected one 2D slice at a time.
    """
    import ants

    x = np.asarray(vol_data, dtype=np.float32)
    if mask is None:
        mask = head_mask(x)
    if mask.sum() < 64:
        warnings.warn("N4: head mask has fewer than 64 voxels; bias correction skipped", stacklevel=2)
        return x.copy()
    offset = float(max(0.0, -x.min()) + 1e-3 * max(float(np.abs(x).max()), 1.0))
    conv = {"iters": [int(i) for i in iterations], "tol": 1e-7}
    dz, dy, dx = (float(s) for s in spacing)

    def field(arr: np.ndarray, msk: np.ndarray, sp: tuple[float, ...], s: int) -> np.ndarray:
        img = ants.from_numpy(arr + offset, spacing=sp)
        mimg = ants.from_numpy(msk.astype(np.float32), spacing=sp)
        b = ants.n4_bias_field_correction(img, mask=mimg, shrink_factor=s, convergence=conv,
                                          return_bias_field=True)
        return np.maximum(b.numpy(), 1e-6)

    if x.shape[0] <= 2:
        bias = np.stack([field(x[k], mask[k], (dy, dx), shrink) if mask[k].sum() >= 64
                         else np.ones_like(x[k]) for k in range(x.shape[0])])
    else:
        bias = field(x, mask, (dz, dy, dx), min(int(shrink), max(1, x.shape[0] // 3)))
    return (x / bias).astype(np.float32)


def normalise(data: np.ndarray, mask: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Map intensities to uint8: the ``percentiles`` (low, high) inside ``mask`` become 0 and 255."""
    vals = data[mask] if mask.any() else data.ravel()
    lo, hi = (float(v) for v in np.percentile(vals, percentiles))
    if hi <= lo:
        hi = lo + 1.0
    return np.round(np.clip((data - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


def _apportion(n: int, weights: list[float]) -> list[int]:
    """Split ``n`` into integers proportional to ``weights`` (largest remainder; ties by order)."""
    w = np.asarray(weights, float)
    if n == 0 or w.sum() <= 0:
        return [0] * len(w)
    q = n * w / w.sum()
    out = np.floor(q).astype(int)
    for i in sorted(range(len(w)), key=lambda i: (-(q[i] - out[i]), i))[: n - int(out.sum())]:
        out[i] += 1
    return out.tolist()


def split_patients(patients: list[str], has_cmb: dict[str, bool], ratios: dict[str, float],
                   seed: int) -> dict[str, str]:
    """Patient-level split ``{patient: split}``: sizes by largest remainder of ``ratios`` (58 patients at
    33/8/17 give exactly 33/8/17), stratified so CMB patients spread in proportion and every non-empty
    split gets at least one when there are enough; shuffled deterministically by ``seed``."""
    totals = _apportion(len(patients), [ratios[s] for s in SPLITS])
    cmb = sorted(p for p in patients if has_cmb.get(p))
    free = sorted(p for p in patients if not has_cmb.get(p))
    c = _apportion(len(cmb), totals)
    if len(cmb) >= sum(t > 0 for t in totals):
        for s in range(len(SPLITS)):
            if totals[s] > 0 and c[s] == 0:
                c[max(range(len(SPLITS)), key=lambda i: (c[i], -i))] -= 1
                c[s] += 1
    rng = np.random.default_rng(seed)
    cmb = [cmb[i] for i in rng.permutation(len(cmb))]
    free = [free[i] for i in rng.permutation(len(free))]
    out: dict[str, str] = {}
    for s, name in enumerate(SPLITS):
        out.update({p: name for p in cmb[: c[s]] + free[: totals[s] - c[s]]})
        cmb, free = cmb[c[s]:], free[totals[s] - c[s]:]
    return out


def _discover(raw: Path, centroids: dict[str, Any] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """(mode, jobs): mode ``synthetic`` (labelled DICOM), ``dicom`` (images only), ``centroids``
    (DICOM labelled by a centroid list, ``centroids`` = {csv, units, diameter_mm}), ``valdo`` or
    ``valdo-images``; one job per patient with its output id and input paths."""
    if not raw.is_dir():
        raise InputError(f"{raw}: input folder not found")
    pairs = find_valdo_pairs(raw)
    if centroids is not None:
        if pairs:
            raise InputError(f"{raw}: --centroids labels DICOM folders; VALDO data brings its own masks")
        mode, jobs = _discover(raw)
        if mode != "dicom":
            raise InputError(f"{raw}: --centroids needs DICOM folders without lesions.csv "
                             f"(found {mode} data)")
        table = _read_csv(Path(centroids["csv"]), ("patient", "x", "y", "z"))
        listed = {str(p) for p in table["patient"]}
        unknown = sorted(listed - {j["patient_id"] for j in jobs})
        if unknown:
            raise InputError(f"{centroids['csv']}: patients {unknown[:5]} have no folder in {raw} "
                             "(the patient column names the patient folders)")
        return "centroids", [{**j, "kind": "centroids", "centroids": centroids} for j in jobs]
    if pairs:
        unmasked = [sub for sub, _, m in pairs if m is None]
        if unmasked and len(unmasked) != len(pairs):
            raise InputError(f"{raw}: CMB masks missing for {', '.join(unmasked)} "
                             "(all subjects or none need one)")
        return ("valdo-images" if unmasked else "valdo"), [
            {"patient_id": sub, "kind": "valdo", "image": str(i), "mask": str(m) if m else None}
            for sub, i, m in pairs]
    subs = sorted(p for p in raw.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subs:
        raise InputError(f"{raw}: no patient folders (expected RAW/<patient>/dicom/*.dcm, "
                         "RAW/<patient>/*.dcm or VALDO sub-XXX_space-T2S_desc-masked_T2S.nii.gz files)")
    unlabelled = [s.name for s in subs if not (s / "lesions.csv").is_file()]
    if unlabelled and len(unlabelled) != len(subs):
        raise InputError(f"{raw}: lesions.csv missing for {', '.join(unlabelled)} "
                         "(all patients or none need one)")
    return ("dicom" if unlabelled else "synthetic"), [
        {"patient_id": s.name, "kind": "dicom" if unlabelled else "synthetic", "folder": str(s),
         "dicom": str(s / "dicom" if (s / "dicom").is_dir() else s)} for s in subs]


def _object_rows(objs: list, vol: Volume, pid: str, raw: list[dict] | None, id_col: str) -> list[dict]:
    """CSV rows of 3D objects: the raw CSV's columns (if any) with ids, positions and patient refreshed."""
    rows = []
    for n, o in enumerate(objs):
        xyz = np.round(vol.vox_to_mm(np.array(o.centre_vox)), 3)
        i, j, k = (round(v, 3) for v in o.centre_vox)
        rows.append({**(raw[n] if raw is not None else {}), id_col: o.lesion_id, "patient_id": pid,
                     "kind": o.kind, "location": o.location, "i": i, "j": j, "k": k, "x_mm": float(xyz[0]),
                     "y_mm": float(xyz[1]), "z_mm": float(xyz[2]), "diameter_mm": round(o.diameter_mm, 4)})
    return rows


def _process_patient(job: dict[str, Any], pcfg: PreprocessConfig, images_dir: str, on_bad_file: str) -> dict:
    """Read, N4-correct, normalise and write one patient's slices; return its boxes and metadata."""
    from PIL import Image

    t0, pid = time.perf_counter(), job["patient_id"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        raw_les = raw_mim = None
        if job["kind"] == "synthetic":
            vol = load_patient(job["folder"], on_bad_file=on_bad_file)
            raw_les = pd.read_csv(Path(job["folder"]) / "lesions.csv").to_dict("records")
            if (Path(job["folder"]) / "mimics.csv").is_file():
                raw_mim = pd.read_csv(Path(job["folder"]) / "mimics.csv").to_dict("records")
        elif job["kind"] == "valdo":
            vol = read_valdo(job["image"], job["mask"], patient_id=pid, allow_empty=True)
        else:
            vol = read_dicom_series(job["dicom"], on_bad_file=on_bad_file)
            if job["kind"] == "centroids":
                c = job["centroids"]
                vol.lesions = read_centroids(c["csv"], {pid: vol}, units=c["units"],
                                             default_diameter_mm=c["diameter_mm"], only=pid).get(pid, [])
        t1 = time.perf_counter()
        mask = head_mask(vol.data)
        u8 = normalise(n4(vol.data, vol.spacing_mm, pcfg.n4_iterations, pcfg.n4_shrink, mask=mask), mask,
                       pcfg.clip_percentiles)
        t2 = time.perf_counter()
        out = Path(images_dir) / pid
        out.mkdir(parents=True, exist_ok=True)
        for k in range(u8.shape[0]):
            if pcfg.image_format == "jpg":
                Image.fromarray(u8[k], mode="L").save(out / f"z{k:04d}.jpg", quality=95)
            else:
                Image.fromarray(u8[k], mode="L").save(out / f"z{k:04d}.png")
        t3 = time.perf_counter()
    kinds = {m.lesion_id: m.kind for m in vol.mimics}
    return {
        "patient_id": pid, "shape": list(vol.shape), "spacing_mm": list(vol.spacing_mm),
        "brain": (mask.mean(axis=(1, 2)) >= pcfg.brain_min_fraction).tolist(),
        "cmb_boxes": lesion_boxes(u8, vol.lesions, vol.spacing_mm, pcfg.labels),
        "cmb_boxes_geometric": lesion_boxes(u8, vol.lesions, vol.spacing_mm, "geometric"),
        "mimic_boxes": {k: [(i, kinds[i], b) for i, b in v]
                        for k, v in lesion_boxes(u8, vol.mimics, vol.spacing_mm, pcfg.labels).items()},
        "lesions": _object_rows(vol.lesions, vol, pid, raw_les, "lesion_id"),
        "mimics": _object_rows(vol.mimics, vol, pid, raw_mim, "mimic_id"),
        "seconds": {"read": round(t1 - t0, 3), "n4": round(t2 - t1, 3), "write": round(t3 - t2, 3),
                    "total": round(t3 - t0, 3)},
        "warnings": [f"{pid}: {w.message}" for w in caught],
    }


def _init_worker() -> None:
    import ants  # noqa: F401 - once per worker, so per-patient timings exclude its ~3 s import


def _run_jobs(jobs: list[dict], pcfg: PreprocessConfig, images: Path, on_bad_file: str,
              progress: bool) -> list:
    """Run :func:`_process_patient` over ``jobs`` (in ``pcfg.workers`` processes); results by patient id."""
    from tqdm import tqdm

    results = []
    with tqdm(total=len(jobs), desc="preprocess", unit="patient", disable=not progress) as bar:
        if pcfg.workers <= 1 or len(jobs) == 1:
            for job in jobs:
                results.append(_process_patient(job, pcfg, str(images), on_bad_file))
                bar.update()
        else:
            n = min(pcfg.workers, len(jobs))
            ctx = multiprocessing.get_context("spawn")  # ITK threads are not fork-safe
            with ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker) as ex:
                futs = [ex.submit(_process_patient, j, pcfg, str(images), on_bad_file) for j in jobs]
                try:
                    for fut in as_completed(futs):
                        results.append(fut.result())
                        bar.update()
                except BaseException:
                    for f in futs:  # do not wait for the queued patients after an error
                        f.cancel()
                    raise
    return sorted(results, key=lambda r: r["patient_id"])


def _coco(res: list[dict], split_of: dict[str, str], pcfg: PreprocessConfig,
          names: tuple[str, ...] = SPLITS) -> tuple[dict, list]:
    """COCO dicts per split of ``names`` (one ``all`` without boxes when unlabelled, i.e. ``split_of`` empty)
    and warnings. ``train`` holds CMB and brain slices; any other split CMB slices plus mimic-only negatives
    (``val_negatives_ratio`` for val, ``test_negatives_ratio`` for the others). Image ids are global and
    stable (1.. over sorted patients and slices); annotation ids run over the splits in order."""
    ext = "jpg" if pcfg.image_format == "jpg" else "png"
    pools = {s: {"pos": [], "brain": [], "mimic": []} for s in (*names, "all")}
    next_id, notes = 1, []
    for r in res:
        (nz, ny, nx), (dz, dy, dx) = r["shape"], r["spacing_mm"]
        g = pools[split_of.get(r["patient_id"], "all")]
        for k in range(nz):
            kinds = sorted({kind for _, kind, _ in r["mimic_boxes"].get(k, [])})
            im = {"id": next_id, "file_name": f"{r['patient_id']}/z{k:04d}.{ext}", "width": nx, "height": ny,
                  "patient_id": r["patient_id"], "slice_index": k, "n_slices": nz,
                  "pixel_spacing_mm": [round(dy, 6), round(dx, 6)], "slice_mm": round(dz, 6),
                  "has_cmb": bool(r["cmb_boxes"].get(k)), "mimic_kinds": kinds}
            next_id += 1
            if im["has_cmb"]:
                g["pos"].append(im)
            g["brain"] += [im] if not im["has_cmb"] and (r["brain"][k] or not split_of) else []
            g["mimic"] += [im] if not im["has_cmb"] and kinds else []
    chosen = {} if split_of else {"all": pools["all"]["brain"]}
    if split_of and "train" in names:
        chosen["train"] = pools["train"]["pos"] + pools["train"]["brain"]
    evaluated = [s for s in names if s != "train"] if split_of else []
    for s in evaluated:
        pos, cand = pools[s]["pos"], pools[s]["mimic"]
        want = round((pcfg.val_negatives_ratio if s == "val" else pcfg.test_negatives_ratio) * len(pos))
        if want > len(cand):
            notes.append(f"{s}: {want} mimic-only negative slices wanted, only {len(cand)} exist; all taken")
        rng = np.random.default_rng([pcfg.split_seed, SPLITS.index(s) if s in SPLITS else len(SPLITS)])
        pick = rng.choice(len(cand), size=min(want, len(cand)), replace=False).tolist() if cand else []
        chosen[s] = pos + [cand[i] for i in sorted(pick)]
    out, ann_id = {}, 1
    boxes = {(r["patient_id"], k): v for r in res for k, v in r["cmb_boxes"].items()}
    for s, ims in chosen.items():
        ims = sorted(ims, key=lambda im: im["id"])
        out[s], ann_id = _coco_split(s, ims, boxes, ann_id)
    if split_of and pcfg.labels != "geometric":  # the same images with the geometric boxes, for comparison
        geo = {(r["patient_id"], k): v for r in res for k, v in r["cmb_boxes_geometric"].items()}
        for s in evaluated:
            name = split_name(s, geometric=True)
            out[name], _ = _coco_split(f"{s} (geometric boxes)", out[s]["images"], geo, 1)
    return out, notes


def _coco_split(name: str, ims: list[dict], boxes: dict, ann_id: int) -> tuple[dict, int]:
    """One COCO dict: ``ims`` with their boxes (``{(patient, slice): [(lesion_id, xyxy)]}``, written as
    COCO ``xywh``); annotation ids from ``ann_id``. Returns the dict and the next free id."""
    anns = []
    for im in ims:
        for lid, box in boxes.get((im["patient_id"], im["slice_index"]), []):
            x, y, w, h = xyxy_to_xywh([box])[0].tolist()
            anns.append({"id": ann_id, "image_id": im["id"], "category_id": 1, "iscrowd": 0,
                         "bbox": [round(x, 4), round(y, 4), round(w, 4), round(h, 4)],
                         "area": round(w * h, 4), "lesion_id": int(lid)})
            ann_id += 1
    return {"info": {"description": f"cmbfe preprocess, split {name}", "version": "1"}, "images": ims,
            "annotations": anns, "categories": [{"id": 1, "name": "cmb", "supercategory": "lesion"}]}, ann_id


def _write_tables(pre: DataDir, res: list[dict], split_of: dict[str, str]) -> None:
    """splits.csv, lesions.csv, mimics.csv and slice_objects.csv of a labelled cohort."""
    tmp = pre.root
    splits = pd.DataFrame(sorted(split_of.items()), columns=["patient_id", "split"])
    splits.to_csv(pre.splits_csv, index=False)
    for name, key, base in (("lesions.csv", "lesions", LESION_COLUMNS),
                            ("mimics.csv", "mimics", MIMIC_COLUMNS)):
        rows = [row for r in res for row in r[key]]
        extra = sorted({c for row in rows for c in row} - set(base))
        pd.DataFrame(rows, columns=base + extra).to_csv(tmp / name, index=False)
    rows = []
    for r in res:
        for k in sorted(set(r["cmb_boxes"]) | set(r["mimic_boxes"])):
            objs = [("cmb", i, b) for i, b in r["cmb_boxes"].get(k, [])]
            objs += [(kind, i, b) for i, kind, b in r["mimic_boxes"].get(k, [])]
            rows += [(r["patient_id"], k, kind, i, *(round(v, 4) for v in b)) for kind, i, b in objs]
    cols = ["patient_id", "slice_index", "kind", "object_id", "x0", "y0", "x1", "y1"]
    pd.DataFrame(rows, columns=cols).to_csv(pre.slice_objects, index=False)


def preprocess_cohort(raw_dir: str | Path, out_dir: str | Path, cfg: Config, *, overwrite: bool = False,
                      on_bad_file: str = "fail", progress: bool = True, centroids: str | Path | None = None,
                      centroid_units: str = "vox", centroid_diameter_mm: float = 5.0,
                      split: str | None = None) -> dict:
    """Preprocess every patient of ``raw_dir`` into the PRE layout of docs/design.md at ``out_dir``.

    Patients run in parallel (``cfg.preprocess.workers`` processes). ``out_dir`` is built in a temp
    sibling and renamed at the end, so an error leaves nothing behind; an existing non-empty
    ``out_dir`` is refused unless ``overwrite``. ``centroids``: a CSV labelling DICOM folders (see the
    module docstring; ``centroid_units`` ``vox`` or ``mm``, ``centroid_diameter_mm`` where the CSV has
    no ``diameter_mm``). ``split``: every patient of labelled input goes to this one split (e.g. ``holdout``,
    built as the test split is), instead of the train/val/test split. Returns a summary (mode, patients,
    per-split counts).
    """
    raw, out = Path(raw_dir).resolve(), Path(out_dir).resolve()
    pcfg = config.check(cfg.preprocess, "preprocess")  # as at load, for a config changed in code
    if out.is_relative_to(raw):
        raise InputError(f"{out}: output folder must not be inside the input folder {raw}")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: exists and is not empty (use --overwrite to replace it)")
    if split is not None and (not split.isidentifier() or split == "all"):
        raise ValueError(f"split must be a name such as 'holdout' (not 'all'), not {split!r}")
    names = (split,) if split else SPLITS
    t0 = time.perf_counter()
    cent = None
    if centroids is not None:
        if centroid_units not in ("vox", "mm"):
            raise ValueError(f"centroid_units must be 'vox' or 'mm', not {centroid_units!r}")
        if not centroid_diameter_mm > 0:
            raise ValueError(f"centroid_diameter_mm must be > 0, not {centroid_diameter_mm!r}")
        cent = {"csv": str(Path(centroids).resolve()), "units": centroid_units,
                "diameter_mm": centroid_diameter_mm}
    mode, jobs = _discover(raw, cent)
    with atomic_path(out) as tmp:
        pre = DataDir(tmp)
        pre.images.mkdir(parents=True)
        res = _run_jobs(jobs, pcfg, pre.images, on_bad_file, progress)
        split_of: dict[str, str] = {}
        if mode in ("synthetic", "valdo", "centroids"):
            has_cmb = {r["patient_id"]: bool(r["cmb_boxes"]) for r in res}
            split_of = ({p: split for p in has_cmb} if split else
                        split_patients(list(has_cmb), has_cmb, pcfg.split_ratios, pcfg.split_seed))
            _write_tables(pre, res, split_of)
        cocos, notes = _coco(res, split_of, pcfg, names)
        for name, obj in cocos.items():
            pre.write_split(name, obj)
        notes = [w for r in res for w in r["warnings"]] + notes
        notes += [f"split {s} has no patients" for s in names if split_of and s not in split_of.values()]
        for n in notes:
            warnings.warn(n, stacklevel=2)
        summary = {"mode": mode, "patients": len(res),
                   "splits": {s: sum(v == s for v in split_of.values()) for s in names} if split_of else {},
                   "images": {k: len(v["images"]) for k, v in cocos.items()},
                   "annotations": {k: len(v["annotations"]) for k, v in cocos.items()},
                   "seconds": round(time.perf_counter() - t0, 3)}
        patients = [{"patient_id": r["patient_id"], "split": split_of.get(r["patient_id"], ""),
                     "shape": r["shape"], "spacing_mm": [round(v, 6) for v in r["spacing_mm"]],
                     "n_cmb": len(r["lesions"]), "n_mimics": len(r["mimics"]),
                     "n_cmb_slices": len(r["cmb_boxes"]), "seconds": r["seconds"]} for r in res]
        atomic_write_json(pre.manifest, {
            "created_by": "cmbfe preprocess", "input": str(raw), "config": cfg.to_dict(),
            "config_hash": cfg.hash(), "summary": summary, "versions": package_versions(), "warnings": notes,
            "itk_threads": os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"),
            "patients": patients})
    summary["out_dir"] = str(out)
    return summary


def main(argv: list[str] | None = None) -> int:
    """``cmbfe preprocess --input DIR --out DIR [--params FILE] [--set k=v] [--overwrite]
    [--on-bad-file skip|fail] [--centroids CSV [--centroid-units vox|mm]]``; writes only under ``--out``."""
    ap = argparse.ArgumentParser(prog="cmbfe preprocess", description=__doc__.splitlines()[0])
    ap.add_argument("--input", required=True, type=Path,
                    help="RAW folder (synthetic, DICOM per patient, VALDO)")
    ap.add_argument("--out", required=True, type=Path, help="PRE folder to create")
    ap.add_argument("--params", default=None, help="profile name (smoke|default|paper) or YAML file")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override, e.g. preprocess.workers=4")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    ap.add_argument("--on-bad-file", choices=("fail", "skip"), default="fail",
                    help="non-DICOM/truncated files: fail (default) or skip with a warning")
    ap.add_argument("--centroids", type=Path, default=None,
                    help="CSV of CMB centroids (patient, x, y, z[, diameter_mm]) labelling DICOM folders")
    ap.add_argument("--centroid-units", choices=("vox", "mm"), default="vox",
                    help="x, y, z as voxel (col, row, slice) or LPS mm")
    ap.add_argument("--centroid-diameter-mm", type=float, default=5.0,
                    help="diameter of CMBs whose row has no diameter_mm")
    ap.add_argument("--split", default=None, metavar="NAME",
                    help="every patient into this one split (built as test is), e.g. holdout")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.split is not None and (not args.split.isidentifier() or args.split == "all"):
        ap.error(f"--split: a name such as holdout (not 'all'), not {args.split!r}")
    cfg = config.load(args.params, args.set)
    s = preprocess_cohort(args.input, args.out, cfg, overwrite=args.overwrite, on_bad_file=args.on_bad_file,
                          progress=not args.no_progress, centroids=args.centroids,
                          centroid_units=args.centroid_units, centroid_diameter_mm=args.centroid_diameter_mm,
                          split=args.split)
    print(f"preprocessed {s['patients']} patients ({s['mode']}) into {s['out_dir']} in {s['seconds']:.1f} s; "
          f"images {s['images']}, boxes {s['annotations']}"
          + (f"; patients per split {s['splits']}" if s["splits"] else ""))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Timing of ``cmbfe evaluate`` maths on a synthetic test set.

10,000 slices (100 patients x 100 slices), ~4,000 CMB boxes in 3D lesions, 100,000 detections; times
JSON parsing + validation, matching + all metrics (IoU and centre rules), and 1,000 patient-bootstrap
resamples. Targets: evaluation <= 5 s, 1,000 resamples <= 30 s. Run:
``.venv/bin/python benchmarks/bench_metrics.py [--slices 10000] [--dets 100000] [--boot 1000]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def synthetic_coco(
    n_slices: int = 10_000, n_dets: int = 100_000, per_patient: int = 100, seed: int = 0
) -> tuple[dict, list[dict]]:
    """COCO GT dict + results list: lesions span 1-3 adjacent slices; ~40 % of dets jitter a GT box."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for k in range(n_slices):
        images.append(
            {
                "id": k + 1,
                "file_name": f"P{k // per_patient:04d}/z{k % per_patient:04d}.png",
                "width": 256,
                "height": 256,
                "patient_id": f"P{k // per_patient:04d}",
                "slice_index": k % per_patient,
                "n_slices": per_patient,
                "pixel_spacing_mm": [0.5, 0.5],
                "slice_mm": 2.0,
                "has_cmb": False,
                "mimic_kinds": [],
            }
        )
    n_les = n_slices // 5
    start = rng.integers(0, n_slices, n_les)
    for les, s0 in enumerate(start):
        x, y, w = rng.uniform(10, 230), rng.uniform(10, 230), rng.uniform(4, 12)
        for k in range(s0, min(s0 + rng.integers(1, 4), (s0 // per_patient + 1) * per_patient)):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": int(k + 1),
                    "category_id": 1,
                    "bbox": [x, y, w, w],
                    "area": w * w,
                    "iscrowd": 0,
                    "lesion_id": int(les),
                }
            )
            images[k]["has_cmb"] = True
    gtb = np.array([a["bbox"] for a in anns])
    gti = np.array([a["image_id"] for a in anns])
    n_near = int(0.4 * n_dets)
    pick = rng.integers(0, len(anns), n_near)
    near = gtb[pick] + rng.normal(0, 1.0, (n_near, 4)) * [1, 1, 0.3, 0.3]
    far_img = rng.integers(1, n_slices + 1, n_dets - n_near)
    wf = rng.uniform(4, 12, n_dets - n_near)
    far = np.column_stack([rng.uniform(0, 240, (n_dets - n_near, 2)), wf, wf])
    boxes = np.vstack([near, far])
    boxes[:, 2:] = np.abs(boxes[:, 2:])
    imgs = np.concatenate([gti[pick], far_img])
    scores = np.concatenate([rng.beta(5, 2, n_near), rng.beta(2, 5, n_dets - n_near)])
    dets = [
        {
            "image_id": int(i),
            "category_id": 1,
            "bbox": [round(float(v), 3) for v in b],
            "score": round(float(s), 5),
        }
        for i, b, s in zip(imgs, boxes, scores)
    ]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "cmb"}]}, dets


@contextlib.contextmanager
def timer(label: str, extra: list[str] | None = None) -> Iterator[list[str]]:
    """Print wall and process-CPU seconds of the block (CPU time is robust to a busy machine)."""
    notes: list[str] = [] if extra is None else extra
    w0, c0 = time.perf_counter(), time.process_time()
    yield notes
    w, c = time.perf_counter() - w0, time.process_time() - c0
    print(f"{label}: {w:.2f} s wall, {c:.2f} s CPU {' '.join(notes)}".rstrip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=10_000)
    ap.add_argument("--dets", type=int, default=100_000)
    ap.add_argument("--boot", type=int, default=1000)
    args = ap.parse_args()
    from cmbfe import evaluate as E
    from cmbfe import metrics as M
    from cmbfe import stats

    gt_obj, det_obj = synthetic_coco(args.slices, args.dets)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    gt = E.gt_from_coco(gt_obj)
    dets = E.dets_from_coco(det_obj, gt)
    print(f"synthetic set: {gt.n_images} slices, {gt.n_patients} patients, {gt.n_gt} CMB boxes, "
          f"{gt.n_lesions} lesions, {len(dets.scores)} detections")
    with tempfile.TemporaryDirectory() as tmp:
        gp, dp = Path(tmp) / "gt.json", Path(tmp) / "dets.json"
        gp.write_text(json.dumps(gt_obj))
        dp.write_text(json.dumps(det_obj))
        argv = ["--gt", str(gp), "--dets", str(dp), "--out", str(Path(tmp) / "m.json"), "--bootstrap", "0"]
        label = "cmbfe evaluate end to end (read + validate + metrics + write JSON/CSV; target <= 5 s)"
        with timer(label), contextlib.redirect_stdout(None):
            assert E.main(argv) == 0
    for rule in ("iou", "centre"):
        with timer(f"match + all metrics, {rule} rule") as notes:
            m = M.match(gt, dets, rule=rule, iou=0.5, radius_mm=2.5)
            out, _ = M.summarise(gt, dets, m)
            notes.append(f"(AP {out['ap_voc']:.4f}, FROC mean {out['froc_mean']:.4f})")
    m = M.match(gt, dets)
    d = stats.prepare(gt, dets, m)
    with timer(f"bootstrap_ci, {args.boot} resamples (target <= 30 s)") as notes:
        ci = stats.bootstrap_ci(d, n=args.boot, seed=0)["ap_voc"]
        notes.append(f"(AP {ci['estimate']:.4f} [{ci['lo']:.4f}, {ci['hi']:.4f}])")
    with timer(f"paired_bootstrap, {args.boot} resamples"):
        stats.paired_bootstrap(d, d, n=args.boot, seed=0)

if __name__ == "__main__":
    main()
